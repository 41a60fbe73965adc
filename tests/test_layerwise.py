"""SparseGPT and Wanda through fastprune.prune: calibration forms, masks and weights
against the per-layer functions on independently gathered Hessians, and bad input."""
import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune.criteria import SparseGPT, Wanda
from fastprune.second_order.sparsegpt import sparsegpt_prune, wanda_prune


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 20)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def hessians_by_hand(model, batches):
    """2/n X^T X of each Linear's inputs, gathered with plain hooks (float64)."""
    xs = {n: [] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = {}
    for n, parts in xs.items():
        x = torch.cat(parts).double()
        out[f"{n}.weight"] = 2 / len(x) * x.T @ x
    return out


@pytest.fixture
def calib():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 20, (4, 12), generator=gen) for _ in range(3)]


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_through_prune_matches_the_layer_function(calib, pattern):
    model = TokenModel().double()
    ref = copy.deepcopy(model)
    hs = hessians_by_hand(ref, calib)
    sparsity = 0.5
    masks = fastprune.prune(model, SparseGPT(block_size=8, sequential=False), sparsity, data=calib, pattern=pattern,
                            progress=False)
    for name, h in hs.items():
        w = ref.get_submodule(name[:-7]).weight
        want_w, want_keep, _ = sparsegpt_prune(w, h, sparsity, pattern, block_size=8)
        assert torch.equal(masks[name], want_keep), name
        torch.testing.assert_close(model.get_submodule(name[:-7]).weight, want_w, rtol=1e-9, atol=1e-12)
        # The sweep reconstructs the layer's outputs better than dropping the same weights.
        x = torch.linalg.cholesky(h + 1e-9 * torch.eye(len(h), dtype=h.dtype))
        err = lambda v: float(((v - w) @ x).square().sum())  # noqa: E731
        assert err(want_w) <= err(w * want_keep) + 1e-12
    report = fastprune.sparsity_report(model, print_table=False)["global"]
    assert report["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_wanda_through_prune_prunes_each_row(calib):
    model = TokenModel().double()
    hs = hessians_by_hand(copy.deepcopy(model), calib)
    before = {n: model.get_submodule(n[:-7]).weight.detach().clone() for n in hs}
    masks = fastprune.prune(model, Wanda(sequential=False), 0.5, data=calib, progress=False)
    for name, h in hs.items():
        _, want = wanda_prune(before[name], h, 0.5)
        assert torch.equal(masks[name], want)
        assert bool(((~masks[name]).sum(1) == round(0.5 * masks[name].shape[1])).all())
        assert torch.equal(model.get_submodule(name[:-7]).weight, before[name] * want)  # no update


def test_calibration_forms(calib):
    one_tensor = torch.cat(calib)
    dicts = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in calib]
    pairs = [(b, b) for b in calib]
    results = []
    for data in (one_tensor, dicts, pairs):
        model = TokenModel().double()
        torch.manual_seed(0)
        results.append(fastprune.prune(model, Wanda(sequential=False), 0.5, data=data, progress=False))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_layerwise_bad_input_changes_nothing(calib):
    model = TokenModel().double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Linear layers"):
        fastprune.prune(nn.Sequential(nn.Conv1d(3, 4, 2)), SparseGPT(), 0.5, data=[torch.randn(2, 3, 5)],
                        progress=False)
    with pytest.raises(fastprune.NonFiniteError):
        bad = TokenModel().double()
        bad.emb.weight.data[0] = float("nan")
        fastprune.prune(bad, SparseGPT(sequential=False), 0.5, data=[torch.zeros(2, 4, dtype=torch.long)],
                        progress=False)
    with pytest.raises(ValueError, match="never reached"):
        fastprune.prune(model, SparseGPT(sequential=False), 0.5, data=[], progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="rank-deficient"):
        fastprune.prune(model, SparseGPT(sequential=False), 0.5, data=[torch.randint(0, 20, (1, 3))], progress=False)


def test_tied_head_is_pruned_once(calib):
    model = TokenModel().double()
    model.head.weight = model.emb.weight
    masks = fastprune.prune(model, SparseGPT(block_size=8, sequential=False), 0.5, data=calib, progress=False)
    assert "head.weight" in masks and model.emb.weight_mask is model.head.weight_mask


class Block(nn.Module):
    """A decoder-style block called with keyword arguments, as Hugging Face models call theirs."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 16), nn.Linear(16, d)

    def forward(self, hidden, attention_mask=None, position_ids=None):
        scale = 1.0 + 0.1 * position_ids.unsqueeze(-1)
        att = torch.softmax((self.q(hidden) * scale) @ hidden.transpose(1, 2) + attention_mask, -1) @ self.v(hidden)
        hidden = hidden + self.o(att)
        return (hidden + self.down(torch.relu(self.up(hidden))),)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        mask = torch.zeros(h.shape[1], h.shape[1]).triu(1) * -1e9
        pos = torch.arange(h.shape[1]).expand(h.shape[0], -1).to(h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask=mask.to(h.dtype), position_ids=pos)[0]
        return self.head(h)


def test_sequential_blocks_see_the_pruned_models_activations(calib):
    model = Stack().double()
    ref = copy.deepcopy(model)
    dense_state = copy.deepcopy(model.state_dict())
    block_linears = [f"layers.{i}.{n}" for i in range(3) for n in ("q", "v", "o", "up", "down")]
    fastprune.prune(model, SparseGPT(block_size=8), 0.5, data=calib, modules=block_linears, progress=False)
    # By hand: run each block on its inputs, prune its Linears from their Hessians, write
    # them, and feed the pruned block's outputs on.
    with torch.no_grad():
        hs = [ref.emb(b) for b in calib]
        for layer in ref.layers:
            xs = {n: [] for n in ("q", "v", "o", "up", "down")}
            hooks = [getattr(layer, n).register_forward_hook(
                lambda mod, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in xs]
            kw = [dict(attention_mask=(torch.zeros(h.shape[1], h.shape[1]).triu(1) * -1e9).double(),
                       position_ids=torch.arange(h.shape[1]).expand(h.shape[0], -1).double()) for h in hs]
            for h, k in zip(hs, kw):
                layer(h, **k)
            for hook in hooks:
                hook.remove()
            for n, parts in xs.items():
                x = torch.cat(parts)
                lin = getattr(layer, n)
                new, _, _ = sparsegpt_prune(lin.weight, 2 / len(x) * x.T @ x, 0.5, block_size=8)
                lin.weight.copy_(new)
            hs = [layer(h, **k)[0] for h, k in zip(hs, kw)]
    for name in block_linears:
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), ref.get_submodule(name).weight.detach(),
                                   rtol=1e-8, atol=1e-10, msg=name)
    # One shot on the dense model's activations differs from block 2 on, agrees on block 1.
    once = Stack().double()
    once.load_state_dict(dense_state)
    fastprune.prune(once, SparseGPT(block_size=8, sequential=False), 0.5, data=calib, modules=block_linears,
                    progress=False)
    assert torch.equal(once.layers[0].q.weight, model.layers[0].q.weight)
    assert not torch.equal(once.layers[2].q.weight, model.layers[2].q.weight)


def test_blocks_are_found_or_named():
    from fastprune.criteria.layerwise import find_blocks
    model = Stack()
    assert find_blocks(model) is model.layers
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    assert find_blocks(enc) is enc.layers
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) is None
    assert find_blocks(model, "layers") is model.layers
    with pytest.raises(ValueError, match="blocks= must name"):
        find_blocks(model, "head")


def test_sequential_transformer_encoder(calib):
    enc = nn.Sequential()
    enc.add_module("emb", nn.Embedding(20, 8))
    enc.add_module("body", nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                                 2, enable_nested_tensor=False))
    enc = enc.double().eval()
    linears = [f"body.layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    masks = fastprune.prune(enc, SparseGPT(block_size=8), 0.5, data=calib, modules=linears, progress=False)
    assert set(masks) == set(f"{n}.weight" for n in linears)
    with pytest.raises(ValueError, match="out_proj"):  # attention reads it without calling it
        fastprune.prune(enc, Wanda(), 0.6, data=calib, modules=["body.layers.0.self_attn.out_proj"], progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_models_and_batch_second_layers(calib, dtype):
    # Hessians accumulate in float32 whatever the activations; a (T, N, ...) layer's rows are
    # rows all the same, since H sums over every position.
    enc = nn.Sequential()
    enc.add_module("emb", nn.Embedding(20, 8))
    enc.add_module("body", nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2,
                                                 enable_nested_tensor=False))
    enc = enc.to(dtype).eval()
    linears = [f"body.layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    seq_first = [b.t() for b in calib]  # (L, B): batch_first=False all the way through
    masks = fastprune.prune(enc, SparseGPT(block_size=8), 0.5, data=seq_first, modules=linears, progress=False)
    for name in linears:
        w = enc.get_submodule(name).weight
        assert w.dtype == dtype and bool(w.isfinite().all())
        assert float((~masks[f"{name}.weight"]).float().mean()) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="pairs"):
        fastprune.prune(TokenModel(), Wanda(sequential=False), 0.5, data=[(calib[0], calib[0], calib[0])],
                        progress=False)


def test_default_layers_are_the_block_linears(calib):
    from fastprune.criteria.layerwise import block_layers
    enc = nn.Sequential()
    enc.add_module("emb", nn.Embedding(20, 8))
    enc.add_module("body", nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                                 2, enable_nested_tensor=False))
    enc.add_module("head", nn.Linear(8, 20))
    enc = enc.double().eval()
    pruned, skipped = block_layers(enc)
    assert pruned == [f"body.layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    assert skipped == [f"body.layers.{i}.self_attn{s}" for i in range(2) for s in ("", ".out_proj")]
    crit = SparseGPT(block_size=8, progress=False)
    masks = fastprune.prune(enc, crit, 0.5, data=calib, progress=False)
    assert sorted(masks) == sorted(f"{n}.weight" for n in pruned)
    assert crit.report["skipped"] == skipped
    assert crit.report["body.layers.1.linear1.weight"]["block"] == 1
    with pytest.raises(ValueError, match="have none"):
        fastprune.prune(nn.Sequential(nn.Conv1d(3, 4, 2)), SparseGPT(), 0.5, data=[torch.randn(2, 3, 5)],
                        progress=False)


def test_no_block_list_is_an_error_naming_blocks(calib):
    model = TokenModel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks="):
        fastprune.prune(model, SparseGPT(), 0.5, data=calib, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
