"""SparseGPT and Wanda on Hugging Face model families, each a tiny random config built
here: Llama (RMSNorm, rotary, grouped KV heads, tied embeddings), GPT-2 (Conv1D, whose
weight is transposed), OPT and BERT. The reference prunes block by block by hand: the
model's own forward (no captured arguments) with the earlier blocks' pruned weights
written, hooks gathering each layer's inputs, and the per-layer functions."""
import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune.criteria import SparseGPT, Wanda
from fastprune.criteria.layerwise import block_layers, find_blocks
from fastprune.second_order.sparsegpt import sparsegpt_prune, wanda_prune

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def opt():
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                 num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


FAMILIES = {"llama": (llama, "model.layers"), "gpt2": (gpt2, "transformer.h"),
            "opt": (opt, "model.decoder.layers"), "bert": (bert, "bert.encoder.layer")}


def build(family):
    torch.manual_seed(0)
    model = FAMILIES[family][0]().double().eval()
    model.config.use_cache = getattr(model.config, "use_cache", False)
    return model


@pytest.fixture
def calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (3, 16), generator=gen) for _ in range(4)]


def rows(module, weight):
    return weight.T if isinstance(module, Conv1D) else weight


def gather_inputs(model, names, batches):
    """{name: every input row of that layer} over the model's own forwards of ``batches``
    (dicts of keyword arguments)."""
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    extra = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
    with torch.no_grad():
        for b in batches:
            model(**b, **extra)
    for h in hooks:
        h.remove()
    return {n: torch.cat(parts) for n, parts in xs.items()}


def prune_by_hand(model, names, batches, solve):
    """Each named layer pruned by ``solve(weight (out, in), 2/n X^T X)`` and written."""
    for n, x in gather_inputs(model, names, batches).items():
        m = model.get_submodule(n)
        with torch.no_grad():
            m.weight.copy_(rows(m, solve(rows(m, m.weight), 2 / len(x) * x.T @ x)))


def by_hand(model, calib, layers, solve):
    """Block after block: the block's layers pruned from their inputs in the model's own
    forward, written before the next block."""
    for block in find_blocks(model):
        mine = [n for n in layers if any(model.get_submodule(n) is m for m in block.modules())]
        prune_by_hand(model, mine, [{"input_ids": b} for b in calib], solve)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,pattern", [("sparsegpt", None), ("sparsegpt", "2:4"), ("wanda", None)])
def test_family_matches_a_block_by_block_reference(family, method, pattern, calib):
    model = build(family)
    ref = copy.deepcopy(model)
    layers, skipped = block_layers(model)
    blocks_name = FAMILIES[family][1]
    assert find_blocks(model) is model.get_submodule(blocks_name)
    assert layers and all(n.startswith(blocks_name + ".") for n in layers)
    assert all(isinstance(model.get_submodule(n), (nn.Linear, Conv1D)) for n in layers)
    assert not skipped
    if method == "sparsegpt":
        criterion = SparseGPT(block_size=8, progress=False)
        solve = lambda w, h: sparsegpt_prune(w, h, 0.5, pattern, block_size=8)[0]  # noqa: E731
    else:
        criterion = Wanda(progress=False)
        solve = lambda w, h: wanda_prune(w, h, 0.5, pattern)[0]  # noqa: E731
    masks = fastprune.prune(model, criterion, 0.5, data=calib, pattern=pattern, progress=False)
    assert sorted(masks) == sorted(f"{n}.weight" for n in layers)
    by_hand(ref, calib, layers, solve)
    for n in layers:
        got, want = model.get_submodule(n).weight.detach(), ref.get_submodule(n).weight.detach()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=n)
        m = model.get_submodule(n)
        keep = rows(m, masks[f"{n}.weight"])
        if pattern:
            assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), n
        else:
            assert int((~keep).sum()) == pytest.approx(keep.numel() / 2, abs=keep.shape[0] // 2 + 1), n
    # The pruned model still runs, finite.
    with torch.no_grad():
        assert bool(model(input_ids=calib[0]).logits.isfinite().all())


def test_llama_tie_survives_and_embeddings_stay_dense(calib):
    model = build("llama")
    emb = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    masks = fastprune.prune(model, SparseGPT(block_size=8, progress=False), 0.5, data=calib, progress=False)
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) for n in masks)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)
    # The tie also survives a save and load of the pruned model.
    fastprune.remove_masks(model)
    again = build("llama")
    again.load_state_dict(model.state_dict())
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_shared_hessians_equal_one_per_matrix_and_true_sequential_differs(calib):
    results = {}
    for share, true_seq in [(True, False), (False, False), (True, True)]:
        model = build("llama")
        crit = SparseGPT(block_size=8, share_hessians=share, true_sequential=true_seq, progress=False)
        fastprune.prune(model, crit, 0.5, data=calib, progress=False)
        results[share, true_seq] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if share and not true_seq:
            attn = "model.layers.0.self_attn"
            assert sorted(crit.report[f"{attn}.q_proj.weight"]["shared_with"]) == [f"{attn}.k_proj.weight",
                                                                                  f"{attn}.v_proj.weight"]
            assert crit.report["model.layers.0.mlp.gate_proj.weight"]["shared_with"] == [
                "model.layers.0.mlp.up_proj.weight"]
    for n, p in results[True, False].items():
        torch.testing.assert_close(p, results[False, False][n], rtol=1e-10, atol=1e-12, msg=n)
    # True sequential: q/k/v as before in block 0, but o_proj sees the pruned q/k/v.
    a, b = results[True, False], results[True, True]
    q = "model.layers.0.self_attn.q_proj.weight_orig"
    assert torch.equal(a[q], b[q])
    assert not torch.equal(a["model.layers.0.self_attn.o_proj.weight_orig"],
                           b["model.layers.0.self_attn.o_proj.weight_orig"])


def test_true_sequential_matches_a_stage_by_stage_reference(calib):
    model, ref = build("llama"), build("llama")
    fastprune.prune(model, SparseGPT(block_size=8, true_sequential=True, progress=False), 0.5, data=calib,
                    progress=False)
    stages = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for i in range(3):
        for stage in stages:
            names = [f"model.layers.{i}.{s}" for s in stage]
            by_hand_stage(ref, calib, names)
    for n, p in model.named_parameters():
        if n.endswith("_orig"):
            torch.testing.assert_close(p.detach() * dict(model.named_buffers())[n[:-5] + "_mask"],
                                       ref.get_parameter(n[:-5]).detach(), rtol=1e-7, atol=1e-9, msg=n)


def by_hand_stage(model, calib, names):
    prune_by_hand(model, names, [{"input_ids": b} for b in calib],
                  lambda w, h: sparsegpt_prune(w, h, 0.5, block_size=8)[0])


def test_dict_batches_with_attention_mask_and_padding(calib):
    # Padded sequences: the attention mask is one of the captured keyword arguments.
    model, ref = build("llama"), build("llama")
    batches = []
    for b in calib:
        mask = torch.ones_like(b)
        mask[0, :5] = 0
        batches.append({"input_ids": b, "attention_mask": mask, "labels": b})
    fastprune.prune(model, Wanda(progress=False), 0.5, data=batches, progress=False)
    layers = block_layers(ref)[0]
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    for block in find_blocks(ref):
        mine = [n for n in layers if any(ref.get_submodule(n) is m for m in block.modules())]
        prune_by_hand(ref, mine, inputs, lambda w, h: wanda_prune(w, h, 0.5)[0])
    for n in layers:
        torch.testing.assert_close(model.get_submodule(n).weight.detach(), ref.get_submodule(n).weight.detach(),
                                   rtol=1e-7, atol=1e-9, msg=n)


def test_frozen_inference_model_and_failure_in_a_late_block_changes_nothing(calib):
    model = build("gpt2")
    model.requires_grad_(False)  # loaded for inference: no gradients are needed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    def poison(module, args, kwargs):  # the last block's inputs, after two blocks are pruned
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden * float("nan")
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = model.transformer.h[2].register_forward_pre_hook(poison, with_kwargs=True)
    with pytest.raises(fastprune.NonFiniteError):
        fastprune.prune(model, SparseGPT(block_size=8, progress=False), 0.5, data=calib, progress=False)
    handle.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    masks = fastprune.prune(model, SparseGPT(block_size=8, progress=False), 0.5, data=calib, progress=False)
    assert len(masks) == 12


def test_pattern_that_does_not_divide_and_no_blocks_errors(calib):
    model = build("llama")
    with pytest.raises(ValueError, match="multiple of"):
        fastprune.prune(model, SparseGPT(progress=False), 1 - 3 / 7, data=calib, pattern="3:7", progress=False)
    with pytest.raises(ValueError, match="blocks= must name"):
        fastprune.prune(model, SparseGPT(blocks="lm_head", progress=False), 0.5, data=calib, progress=False)


def test_true_sequential_in_one_pass_for_one_calibration_batch(calib):
    # One (B, L) tensor: every layer is pruned inside a single forward of its block.
    model, ref = build("llama"), build("llama")
    crit = SparseGPT(block_size=8, true_sequential=True, progress=False)
    fastprune.prune(model, crit, 0.5, data=torch.cat(calib), progress=False)
    stages = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for i in range(3):
        for stage in stages:
            by_hand_stage(ref, calib, [f"model.layers.{i}.{s}" for s in stage])
    for n in block_layers(ref)[0]:
        torch.testing.assert_close(model.get_submodule(n).weight.detach(), ref.get_submodule(n).weight.detach(),
                                   rtol=1e-7, atol=1e-9, msg=n)
    assert sorted(crit.report["model.layers.1.self_attn.k_proj.weight"]["shared_with"]) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
