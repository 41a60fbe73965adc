"""Layer-wise pruning over 2 Gloo processes (spawned here, 127.0.0.1 only): each rank
calibrates on half of the sequences, and every rank ends with the masks and weights one
process gets on all of them; ranks that disagree fail before any weight changes."""

import pytest
import torch

import fastprune
from gloo import run_ranks
from fastprune.criteria import SparseGPT, Wanda

transformers = pytest.importorskip("transformers")
WORLD = 2
CONFIGS = {"sparsegpt": lambda: SparseGPT(block_size=8, progress=False),
           "sparsegpt-ts": lambda: SparseGPT(block_size=8, true_sequential=True, progress=False),
           "wanda-owl": lambda: Wanda(block_sparsity="owl", progress=False)}


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def sequences():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))


def pruned(kind, data, sparsity=0.5):
    model = llama()
    fastprune.prune(model, CONFIGS[kind](), sparsity, data=data, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _job(rank):
    mine = sequences()[rank::WORLD]
    out = {kind: pruned(kind, mine if kind == "sparsegpt-ts" else list(mine.split(2))) for kind in CONFIGS}
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:  # rank 1 asks for another sparsity: both ranks refuse, the model unchanged
        fastprune.prune(model, SparseGPT(progress=False), 0.5 + 0.1 * rank, data=mine, progress=False)
        out["disagree"] = "no error"
    except ValueError as e:
        out["disagree"] = str(e)
    out["unchanged"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_job, tmp_path_factory.mktemp("ranks"), WORLD)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_union(ranks, kind):
    union = sequences()
    want = pruned(kind, union if kind == "sparsegpt-ts" else [union[r::WORLD][i:i + 2] for r in range(WORLD)
                                                              for i in range(0, 4, 2)])
    for rank in ranks:
        for k, v in want.items():
            torch.testing.assert_close(rank[kind][k], v, rtol=1e-9, atol=1e-11, msg=k)


def test_ranks_that_disagree_fail_before_any_change(ranks):
    for rank in ranks:
        assert "ranks disagree" in rank["disagree"] and "settings" in rank["disagree"]
        assert rank["unchanged"]
