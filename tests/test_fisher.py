"""fisher_diag, FisherBlocks and per_sample_gradients against torch.func per-sample gradients."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprune
from fastprune.errors import NonFiniteError
from fastprune.stats import formulas
from torchfunc_reference import diag_and_grad, per_sample_grads


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def assert_stats(model, x, y, loss=None, batch=5, **kwargs):
    diag, grad = fastprune.fisher_diag(model, batches(x, y, batch), loss, return_grad=True, progress=False,
                                       **kwargs)
    ref_diag, ref_grad = diag_and_grad(model, x, y, None if isinstance(loss, str) or loss is None else loss)
    assert list(diag) == [k for k, p in model.named_parameters()]
    for k in ref_diag:
        torch.testing.assert_close(diag[k], ref_diag[k], rtol=1e-10, atol=1e-12, msg=k)
        torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-10, atol=1e-12, msg=k)


class Tokens(nn.Module):
    """Linear over (N, A, B, in) inputs: per-sample gradients sum over the sequence dims."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.fc(x)))).mean((1, 2))


def test_linear_2d_and_non_contiguous():
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = torch.randn(7, 13, dtype=torch.float64).t()  # (13, 7), non-contiguous
    assert_stats(model, x, torch.randint(0, 3, (13,)))


class Residual(nn.Module):
    """A layer's output written in place downstream (as ReLU(inplace=True) does, or
    torchvision's `out += identity`, here scaled so that its gradient differs)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.in_place = True

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.in_place:
            out *= 2.0  # in place on fc2's captured output
            out += x
        else:
            out = out * 2.0 + x
        return self.head(out)


def test_outputs_written_in_place_downstream_on_every_call():
    # The captured gradient edge is fc2's node, not its output tensor: the in-place writes
    # rebase the tensor only. Each call must equal torch.func.
    torch.manual_seed(0)
    model = Residual().double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    for _ in range(2):
        assert_stats(model, x, y, batch=4)


def test_a_model_that_starts_writing_in_place_later():
    torch.manual_seed(0)
    model = Residual().double()
    model.in_place = False
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    assert_stats(model, x, y, batch=4)
    model.in_place = True
    assert_stats(model, x, y, batch=4)


def test_passes_refuse_a_loss_that_writes_the_shared_output_in_place():
    # Several Fisher passes share one forward: a loss scaling the output in place would
    # hand the next pass scaled values (and gradients), silently.
    from fastprune.stats.capture import run_passes
    from fastprune.stats.plan import plan_stats
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def loss(out, t):
        return F.cross_entropy(out.mul_(0.5), t, reduction="none")
    passes = run_passes(model, plan_stats(model), x, loss, lambda out: iter([(y, None, "a"), (y, None, "b")]), 5)
    with pytest.raises(RuntimeError, match="modified the model's output in place.*out of place"):
        list(passes)
    one = run_passes(model, plan_stats(model), x, loss, lambda out: iter([(y, None, "a")]), 5)
    assert [tag for tag, _, _ in one] == ["a"]  # one pass: nothing sees the written values later


def test_linear_4d_inputs_and_layernorm():
    model = Tokens().double()
    assert_stats(model, torch.randn(9, 3, 2, 5, dtype=torch.float64), torch.randint(0, 3, (9,)), batch=4)


def test_batch_of_one():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    assert_stats(model, torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,)), batch=1)


def conv_model(conv, in_shape):
    with torch.no_grad():
        n_out = conv(torch.zeros(1, *in_shape)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3)).double()


CONV2D = [dict(stride=s, padding=p, dilation=d, groups=g, bias=b)
          for s, p, d, g, b in itertools.product([1, 2], [0, 2], [1, 2], [1, 2], [True, False])]


def conv_route(monkeypatch, route):
    """Forces the weight's route: one grouped backward convolution ("direct"), im2col +
    GEMMs, or the conv_grad_bias_sq op ("implicit", CPU)."""
    monkeypatch.setattr(formulas, "DIRECT_CONV_MAX_FAN_IN", 1 << 30 if route == "direct" else -1)
    monkeypatch.setattr(formulas, "IMPLICIT_CONV_MIN_CHANNELS", 1 if route == "implicit" else 1 << 30)


ROUTES = ["direct", "im2col", "implicit"]


@pytest.mark.parametrize("cfg", CONV2D + [dict(padding="same", dilation=2), dict(padding="same", groups=6),
                                          dict(padding=1, padding_mode="circular"),
                                          dict(padding=(1, 2), padding_mode="reflect", stride=(2, 1))])
@pytest.mark.parametrize("route", ROUTES)
def test_conv2d_grid(cfg, route, monkeypatch):
    conv_route(monkeypatch, route)
    conv = nn.Conv2d(6, 4 if cfg.get("groups", 1) != 6 else 6, (3, 2) if cfg.get("padding") != "same" else 4, **cfg)
    model = conv_model(conv, (6, 9, 8))
    assert_stats(model, torch.randn(7, 6, 9, 8, dtype=torch.float64), torch.randint(0, 3, (7,)))


@pytest.mark.parametrize("route", ROUTES)
def test_conv_non_contiguous_input(route, monkeypatch):
    conv_route(monkeypatch, route)
    model = conv_model(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9, 7))
    x = torch.randn(5, 4, 7, 9, dtype=torch.float64).transpose(2, 3)  # (5, 4, 9, 7), non-contiguous
    assert_stats(model, x, torch.randint(0, 3, (5,)))


def test_conv_sums_over_several_sample_tiles(monkeypatch):
    # A budget of about two samples' unfolded input: the sums run over tiles of 2 and a ragged last one.
    conv_route(monkeypatch, "im2col")
    monkeypatch.setattr(formulas, "_SUM_TILE_BYTES", 2 * 6 * 3 * 2 * 7 * 7 * 4)
    conv = nn.Conv2d(6, 4, (3, 2), bias=True)
    model = conv_model(conv, (6, 9, 8))
    assert_stats(model, torch.randn(7, 6, 9, 8, dtype=torch.float64), torch.randint(0, 3, (7,)), batch=7)


@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, padding=1, dilation=2), dict(padding=(2, 1), stride=(1, 2)),
                                 dict(padding=1, padding_mode="circular", bias=False)])
@pytest.mark.parametrize("tiles", [1, 3])
def test_conv_stem_direct_route(cfg, tiles, monkeypatch):
    # Few inputs per filter and many positions: the diagonal's sums use the direct per-sample
    # route (over one tile, or three of 3, 3 and 1 samples) instead of im2col.
    conv = nn.Conv2d(3, 4, 3, **cfg)
    assert conv.weight[0].numel() <= formulas.DIRECT_CONV_MAX_FAN_IN
    if tiles > 1:  # 4 bytes per weight, 3 samples per tile
        monkeypatch.setattr(formulas, "_SUM_TILE_BYTES", 3 * 4 * conv.weight.numel())
    calls = []
    direct = formulas.ConvFormula.per_sample_weight
    monkeypatch.setattr(formulas.ConvFormula, "per_sample_weight",
                        lambda self, c, s0, s1: calls.append(s1 - s0) or direct(self, c, s0, s1))
    model = conv_model(conv, (3, 20, 22))
    assert_stats(model, torch.randn(7, 3, 20, 22, dtype=torch.float64), torch.randint(0, 3, (7,)), batch=7)
    expected = [7] if tiles == 1 else [3, 3, 1]
    assert calls[-len(expected):] == expected  # after the 2-sample probe of stats.verify


@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, padding=1, dilation=2), dict(groups=5, padding="same"),
                                 dict(padding=2, padding_mode="replicate", bias=False)])
@pytest.mark.parametrize("route", ROUTES)
def test_conv1d(cfg, route, monkeypatch):
    conv_route(monkeypatch, route)
    model = conv_model(nn.Conv1d(5, 5, 3, **cfg), (5, 11))
    assert_stats(model, torch.randn(6, 5, 11, dtype=torch.float64), torch.randint(0, 3, (6,)))


def test_cnn_with_default_routes(monkeypatch):
    # The benchmark CNN's layout at a small size: 3->32 (direct route's fan-in, but 32 channels:
    # the op), 32->64 and 64->64 stride 2 (the op), and a conv shared by two calls, whose
    # per-sample gradient sums both calls before squaring (not the op).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
            self.c3, self.shared = nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 1)
            self.head = nn.Linear(64, 3)

        def forward(self, x):
            h = torch.relu(self.c3(F.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)))
            h = self.shared(torch.tanh(self.shared(h)))
            return self.head(h.mean((2, 3)))
    used = []
    op = formulas._ops.conv_grad_bias_sq
    monkeypatch.setattr(formulas._ops, "conv_grad_bias_sq", lambda x, *a: used.append(x.shape[1]) or op(x, *a))
    torch.manual_seed(0)
    model = Net().double()
    assert_stats(model, torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,)), batch=3)
    assert used == [3, 32, 64] * 3  # c1, c2, c3 (never the shared conv) in the probe and two batches


def test_batchnorm_eval_and_embedding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4, padding_idx=0)
            self.conv = nn.Conv1d(4, 6, 2)
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 3)

        def forward(self, ids):
            h = self.bn(self.conv(self.emb(ids).transpose(1, 2)))
            return self.fc(h.mean(2))

    model = Net().double()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    ids = torch.randint(0, 11, (8, 6))
    ids[0, :3] = 4  # repeated tokens within a sample
    ids[1, 0] = 0  # padding
    assert_stats(model, ids, torch.randint(0, 3, (8,)))


def test_norm_formulas_over_several_sample_chunks(monkeypatch):
    # A budget of two samples' activations: BatchNorm2d and LayerNorm run over chunks of 2, 2, 1.
    monkeypatch.setattr(formulas, "_SUM_TILE_BYTES", 2 * 4 * 5 * 5 * 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.LayerNorm([5, 5]),
                          nn.Flatten(), nn.Linear(100, 3)).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    assert formulas._sample_chunks(torch.zeros(5, 4, 5, 5, dtype=torch.float64)) == [(0, 2), (2, 4), (4, 5)]
    assert_stats(model, torch.randn(10, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (10,)))


def test_weight_sharing():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    assert_stats(Twice().double(), torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,)))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(5) + 0.5)

    def forward(self, x):
        return x * self.s


def test_fallback_path_warns_and_is_exact():
    model = nn.Sequential(Scale(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="torch.func"):
        assert_stats(model, x, y)
    with pytest.raises(ValueError, match="no exact per-sample formula"):
        fastprune.fisher_diag(model, [(x, y)], strict=True, progress=False)


def test_mse_loss_and_custom_callable():
    model = nn.Sequential(nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    mse = lambda o, t: F.mse_loss(o, t, reduction="none").mean(1)  # noqa: E731
    diag = fastprune.fisher_diag(model, [(x, y)], "mse", progress=False)
    ref, _ = diag_and_grad(model, x, y, mse)
    for k in ref:
        torch.testing.assert_close(diag[k], ref[k])
    assert_stats(model, x, y, mse)


def test_true_fisher_is_expectation_over_classes():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    diag = fastprune.fisher_diag(model, [(x, torch.zeros(6, dtype=torch.long))], fisher="true", progress=False)
    probs = model(x).softmax(1).detach()
    expected = {}
    for c in range(3):
        ps = per_sample_grads(model, x, torch.full((6,), c))
        for k, g in ps.items():
            expected[k] = expected.get(k, 0) + (probs[:, c].view(-1, *[1] * (g.dim() - 1)) * g.square()).mean(0)
    for k in expected:
        torch.testing.assert_close(diag[k], expected[k])


def test_mc_fisher_converges_to_true_fisher():
    model = nn.Sequential(nn.Linear(3, 3)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    data = [(x, torch.zeros(4, dtype=torch.long))]
    true = fastprune.fisher_diag(model, data, fisher="true", progress=False)
    mc = fastprune.fisher_diag(model, data, fisher="mc", mc_samples=3000, progress=False)
    for k in true:
        torch.testing.assert_close(mc[k], true[k], rtol=0.1, atol=1e-3)
    again = fastprune.fisher_diag(model, data, fisher="mc", mc_samples=3, seed=1, progress=False)
    assert all(torch.equal(again[k], fastprune.fisher_diag(model, data, fisher="mc", mc_samples=3, seed=1,
                                                          progress=False)[k]) for k in again)


def test_pruned_weights_have_zero_stats_and_max_samples():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    masks = fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, progress=False)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    diag, grad = fastprune.fisher_diag(model, batches(x, y, 4), return_grad=True, max_samples=7, progress=False)
    assert set(diag) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    ref_diag, ref_grad = diag_and_grad(model, x[:7], y[:7])
    for k, mask in masks.items():
        assert (diag[k][~mask] == 0).all() and (grad[k][~mask] == 0).all()
        torch.testing.assert_close(diag[k], ref_diag[k + "_orig"] * mask)
        torch.testing.assert_close(grad[k], ref_grad[k + "_orig"] * mask)


def test_bfloat16_model_accumulates_in_float32():
    model = nn.Sequential(nn.Linear(8, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    ref, _ = diag_and_grad(model, x, y)
    diag = fastprune.fisher_diag(model.bfloat16(), [(x.bfloat16(), y)], progress=False)
    assert diag["0.weight"].dtype == torch.float32
    torch.testing.assert_close(diag["0.weight"], ref["0.weight"], rtol=0.1, atol=1e-3)


def test_modules_filter():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    diag = fastprune.fisher_diag(model, [(torch.randn(3, 4), torch.tensor([0, 1, 1]))], modules=["2"],
                                 progress=False)
    assert set(diag) == {"2.weight", "2.bias"}


# --- blocks and raw per-sample gradients -----------------------------------------------------

@pytest.mark.parametrize("block", [5, 16, 200])
def test_fisher_blocks_match_explicit(block):
    model = conv_model(nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), (3, 8, 8))
    model.append(nn.ReLU())
    x, y = torch.randn(9, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (9,))
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.3, progress=False)
    fb = fastprune.FisherBlocks(model, block)
    for xb, yb in batches(x, y, 4):
        fb.accumulate(xb, yb)
    assert fb.num_samples == 9 and fb.names == ["0.weight", "3.weight"]
    ps = per_sample_grads(model, x, y)
    for name in fb.names:
        mask = model.get_submodule(name[:-7]).weight_mask.flatten().double()
        g = ps[name + "_orig"].reshape(9, -1) * mask
        nb = -(-g.shape[1] // block)
        g = F.pad(g, (0, nb * block - g.shape[1])).view(9, nb, block)
        torch.testing.assert_close(fb.blocks(name), torch.einsum("nbi,nbj->bij", g, g) / 9)


def test_per_sample_gradients_and_block_fallback():
    model = nn.Sequential(nn.Conv3d(2, 2, 2), nn.Flatten(), nn.Linear(2 * 8, 3)).double()
    x, y = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastprune.per_sample_gradients(model, x, y)
        fb = fastprune.FisherBlocks(model, 8)
        fb.accumulate(x, y)
    ps = per_sample_grads(model, x, y)
    for k, v in got.items():
        torch.testing.assert_close(v, ps[k].reshape(4, -1))
    g = ps["0.weight"].reshape(4, -1).view(4, 4, 8)
    torch.testing.assert_close(fb.blocks("0.weight"), torch.einsum("nbi,nbj->bij", g, g) / 4)


# --- errors ----------------------------------------------------------------------------------

def test_scalar_loss_is_rejected():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="one loss per sample"):
        fastprune.fisher_diag(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))],
                              lambda o, t: F.cross_entropy(o, t), progress=False)


def test_batchnorm_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    with pytest.raises(ValueError, match="model.eval"):
        fastprune.fisher_diag(model, data, progress=False)
    with pytest.raises(ValueError, match="model.eval"):
        fastprune.FisherBlocks(model, 4)
    diag = fastprune.fisher_diag(model, data, bn="eval", progress=False)
    assert model[1].training and set(diag) >= {"1.weight", "1.bias"}


def test_non_finite_gradients_name_the_module():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[1, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="'0.weight'"):
        fastprune.fisher_diag(model, [(x, torch.tensor([0, 1, 0, 1]))], progress=False)
    with pytest.raises(NonFiniteError, match="'0.weight'"):
        fastprune.FisherBlocks(model, 3).accumulate(x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(NonFiniteError, match="'0.weight'"):
        fastprune.per_sample_gradients(model, x, torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(fisher="exact"), "fisher must be"),
    (dict(fisher="mc", mc_samples=0), "mc_samples"),
    (dict(fisher="true", loss_fn="mse"), "predictive"),
    (dict(loss_fn="hinge"), "unknown loss"),
    (dict(modules=["nope"]), "unknown module"),
    (dict(bn="train"), "bn must be"),
])
def test_argument_errors(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        fastprune.fisher_diag(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], progress=False, **kwargs)


def test_block_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="block_size"):
        fastprune.FisherBlocks(model, 0)
    fb = fastprune.FisherBlocks(model, 4)
    with pytest.raises(ValueError, match="no samples"):
        fb.blocks("0.weight")
    with pytest.raises(KeyError, match="collected tensors"):
        fb.blocks("1.weight")


def test_input_shape_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="no samples"):
        fastprune.fisher_diag(model, [], progress=False)
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        fastprune.fisher_diag(model, [x], progress=False)
    with pytest.raises(TypeError, match="loss_fn must be"):
        fastprune.fisher_diag(model, [(x, y)], loss_fn=3, progress=False)
    frozen = nn.Sequential(nn.Linear(3, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastprune.fisher_diag(frozen, [(x, y)], progress=False)


@pytest.mark.parametrize("route", ["direct", "grouped-op"])
@pytest.mark.parametrize("cfg", [dict(kernel_size=(3, 2), **cfg) for cfg in CONV2D if cfg["groups"] == 1] +
                         [dict(kernel_size=4, padding="same", dilation=2),
                          dict(kernel_size=3, padding=(1, 2), padding_mode="reflect", stride=(2, 1)),
                          dict(kernel_size=3, stride=2, padding=1, dilation=2, one_d=True),
                          dict(kernel_size=3, groups=3)])
def test_conv_per_sample_weight_routes(cfg, route, monkeypatch):
    # The direct (grouped backward convolution) route only runs for narrow filters; force either one.
    monkeypatch.setattr(formulas, "DIRECT_CONV_MAX_FAN_IN", 1 << 30 if route == "direct" else -1)
    cfg = dict(cfg)
    one_d = cfg.pop("one_d", False)
    conv = (nn.Conv1d if one_d else nn.Conv2d)(3, 6 if cfg.get("groups") == 3 else 4, **cfg)
    shape = (3, 11) if one_d else (3, 9, 8)
    model = conv_model(conv, shape)
    x, y = torch.randn(5, *shape, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = fastprune.per_sample_gradients(model, x, y)
    fb = fastprune.FisherBlocks(model, 7)
    fb.accumulate(x, y)
    ps = per_sample_grads(model, x, y)["0.weight"].reshape(5, -1)
    torch.testing.assert_close(got["0.weight"], ps)
    nb = -(-ps.shape[1] // 7)
    g = F.pad(ps, (0, nb * 7 - ps.shape[1])).view(5, nb, 7)
    torch.testing.assert_close(fb.blocks("0.weight"), torch.einsum("nbi,nbj->bij", g, g) / 5)


def test_memory_budgets_raise_before_any_work():
    """The torch.func fallback (PReLU here) and per_sample_gradients materialise N x
    params; an over-budget request raises with the numbers before computing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 3)).eval()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    warnings.simplefilter("ignore")  # the one-time fallback warning (tested elsewhere); pytest restores filters
    fastprune.fisher_diag(model, [(x, y)], progress=False)  # the default budget fits
    # 2 x 32 samples x 16 PReLU weights x 4 bytes = 4096 bytes for the fallback
    with pytest.raises(MemoryError, match=r"torch.func fallback for \['1.weight'\] on a batch of 32 .*smaller batches"):
        fastprune.fisher_diag(model, [(x, y)], progress=False, max_memory=4095)
    fastprune.fisher_diag(model, [(x, y)], progress=False, max_memory=4096)
    with pytest.raises(MemoryError, match="per-sample gradients of 32 samples"):
        fastprune.per_sample_gradients(model, x, y, max_memory=1000)
    assert fastprune.per_sample_gradients(model, x, y)["0.weight"].shape == (32, 128)


def test_collector_reuses_its_plan_and_follows_the_model(monkeypatch):
    from fastprune.stats import fisher as fisher_module
    built = []
    real = fisher_module.plan_stats
    monkeypatch.setattr(fisher_module, "plan_stats", lambda *a, **k: built.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 7, dtype=torch.float64), torch.randint(0, 3, (12,))
    collector = fastprune.FisherCollector(model)
    for size in (4, 12, 5):  # several calls, batch sizes and ragged batches
        diag, grad = collector(batches(x, y, size), return_grad=True, progress=False)
        ref_diag, ref_grad = diag_and_grad(model, x, y)
        for k in ref_diag:
            torch.testing.assert_close(diag[k], ref_diag[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-10, atol=1e-12)
    assert len(built) == 1
    # Pruning changes the parameters (weight_orig + mask): a new plan, masked entries zero.
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, progress=False)
    diag = collector(batches(x, y, 4), progress=False)
    assert len(built) == 2 and set(diag) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.all(diag["0.weight"][model[0].weight_mask == 0] == 0)
    assert torch.count_nonzero(diag["0.weight"]) > 0
    # Freezing a parameter drops it from the statistics.
    model[0].bias.requires_grad_(False)
    diag = collector(batches(x, y, 4), progress=False)
    assert len(built) == 3 and "0.bias" not in diag


def test_collector_argument_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="fisher must be one of"):
        fastprune.FisherCollector(model, fisher="exact")
    with pytest.raises(ValueError, match="bn must be 'raise' or 'eval'"):
        fastprune.FisherCollector(model, bn="train")
    with pytest.raises(ValueError, match="unknown loss"):
        fastprune.FisherCollector(model, "hinge")
    collector = fastprune.FisherCollector(model)
    with pytest.raises(ValueError, match="data yielded no samples"):
        collector([(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))], progress=False)


def test_a_loss_that_writes_the_output_in_place():
    # The model's output is the head's captured output: a loss scaling it in place (a
    # temperature) rebases that tensor, not the head's gradient edge.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 7, dtype=torch.float64), torch.randint(0, 3, (12,))

    def loss(out, t):
        return F.cross_entropy(out.mul_(0.5), t, reduction="none")
    for _ in range(2):
        assert_stats(model, x, y, loss=loss, batch=4)
