"""Per-block sparsity for the layer-wise criteria: a user list and OWL, against a
transcription of OWL's allocation, and bad input."""
import pytest
import torch

import fastprune
from fastprune.criteria import SparseGPT, Wanda
from fastprune.criteria.block_sparsity import owl_allocation, scaled_allocation
from fastprune.criteria.layerwise import block_layers

transformers = pytest.importorskip("transformers")


def llama(layers=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.fixture
def calib():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))


def block_sparsities(model):
    out = []
    for block in model.model.layers:
        pruned = total = 0
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                pruned += int((~m.weight_mask.bool()).sum())
                total += m.weight_mask.numel()
        out.append(pruned / total)
    return out


def test_owl_allocation_transcribes_the_paper():
    ratios = [0.01, 0.05, 0.03, 0.02]
    r = torch.tensor(ratios, dtype=torch.float64)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * 0.08 * 2)
    want = 1 - (r - r.mean() + (1 - 0.7))
    assert owl_allocation(ratios, [10] * 4, 0.7, 0.08) == pytest.approx(want.tolist())
    # Unequal blocks: the mean over the weights is the target.
    got = owl_allocation(ratios, [10, 20, 30, 40], 0.7, 0.08)
    assert sum(g * n for g, n in zip(got, [10, 20, 30, 40])) / 100 == pytest.approx(0.7)
    with pytest.raises(ValueError, match="outside"):
        owl_allocation(ratios, [1] * 4, 0.95, 0.08)
    assert scaled_allocation([0.4, 0.6], [1, 1], 0.25) == pytest.approx([0.2, 0.3])


@pytest.mark.parametrize("criterion", [SparseGPT, Wanda])
def test_a_user_list_sets_each_blocks_sparsity(calib, criterion):
    model = llama()
    crit = criterion(block_sparsity=[0.3, 0.5, 0.5, 0.7], progress=False)
    fastprune.prune(model, crit, 0.5, data=calib, progress=False)
    assert block_sparsities(model) == pytest.approx([0.3, 0.5, 0.5, 0.7], abs=0.02)
    report = fastprune.sparsity_report(model, modules=block_layers(model)[0], print_table=False)
    assert report["global"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_owl_prunes_blocks_with_more_outliers_less(calib):
    model = llama()
    # Block 2's inputs get a few very large features: more outliers of |W| ||x||.
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight[:3] = 40.0
        model.model.layers[2].post_attention_layernorm.weight[:3] = 40.0
    crit = Wanda(block_sparsity="owl", owl_lambda=0.1, progress=False)
    fastprune.prune(model, crit, 0.6, data=calib, progress=False)
    got = block_sparsities(model)
    # Wanda prunes floor(s * cols) of each row: up to 1/32 below the allocation here.
    assert all(0 <= a - g < 1 / 32 + 1e-9 for a, g in zip(crit.report["block_sparsity"], got))
    assert got[2] == pytest.approx(min(got), abs=1e-9) and got[2] < 0.6 - 0.05
    assert max(crit.report["block_sparsity"]) - min(crit.report["block_sparsity"]) == pytest.approx(0.2)
    report = fastprune.sparsity_report(model, modules=block_layers(model)[0], print_table=False)
    assert report["global"]["sparsity"] == pytest.approx(0.6, abs=1 / 32)


def test_bad_block_sparsity_changes_nothing(calib):
    model = llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="4 blocks"):
        fastprune.prune(model, Wanda(block_sparsity=[0.5, 0.5]), 0.5, data=calib, progress=False)
    with pytest.raises(ValueError, match="block_sparsity entry"):
        Wanda(block_sparsity=[0.5, 1.2])
    with pytest.raises(ValueError, match="owl_lambda"):
        Wanda(block_sparsity="owl", owl_lambda=0.7)
    with pytest.raises(ValueError, match="owl_m"):
        SparseGPT(block_sparsity="owl", owl_m=0)
    with pytest.raises(ValueError, match="pattern"):
        fastprune.prune(model, Wanda(block_sparsity="owl"), 0.5, data=calib, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="outside"):
        fastprune.prune(model, Wanda(block_sparsity=[0.1, 0.1, 0.1, 0.9]), 0.8, data=calib, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_several_steps_recalibrate_and_keep_earlier_pruning(calib):
    # Two steps of the geometric schedule: the second sweeps with the first step's zeros
    # fixed, from the pruned model's own activations.
    model = llama()
    pruner = fastprune.Pruner(model, SparseGPT(block_size=8, progress=False), 0.6, data=[calib], steps=2)
    first = pruner.step()
    second = pruner.step()
    for name, keep in second.items():
        assert not bool((keep & ~first[name]).any()), name
        assert float((~keep).float().mean()) == pytest.approx(0.6, abs=0.02), name


def test_refit_lowers_each_layers_reconstruction_error(calib):
    model = llama()
    crit = SparseGPT(block_size=8, refit_iters=30, progress=False)
    fastprune.prune(model, crit, 0.6, data=calib, progress=False)
    layers = [n for n in crit.report if n.endswith(".weight")]
    assert layers and all(crit.report[n]["error"] <= crit.report[n]["error_sweep"] * (1 + 1e-9) for n in layers)
    assert sum(crit.report[n]["error"] for n in layers) < 0.99 * sum(crit.report[n]["error_sweep"] for n in layers)
