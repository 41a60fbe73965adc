"""fastprune.prune: scopes, exact counts, min_keep, steps, target selection and errors."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastprune
from fastprune.criteria import Criterion, Magnitude, Random
from fastprune.errors import NonFiniteError


def layer_sparsity(model):
    return {n: v["sparsity"] for n, v in fastprune.sparsity_report(model, print_table=False)["layers"].items()}


def global_sparsity(model):
    return fastprune.sparsity_report(model, print_table=False)["global"]["sparsity"]


def model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


class Const(Criterion):
    """Returns fixed scores (to test ties and bad criteria)."""

    def __init__(self, fn):
        self.fn = fn

    def scores(self, model, params, data=None, loss_fn=None):
        return {n: self.fn(w) for n, w in params.items()}


def test_global_magnitude_equals_torch_global_unstructured(cnn):
    ref = copy.deepcopy(cnn)
    masks = fastprune.prune(cnn, Magnitude(), 0.83, min_keep=0, progress=False)
    targets = [(m, "weight") for m in (ref.conv1, ref.conv2, ref.seq, ref.fc)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=0.83)
    for (module, _), name in zip(targets, ["conv1.weight", "conv2.weight", "seq.weight", "fc.weight"]):
        assert torch.equal(module.weight_mask.bool(), masks[name])
    assert not hasattr(cnn.bn, "weight_mask") and not hasattr(cnn.conv1, "bias_mask")


def test_layer_scope_equals_torch_l1_unstructured(cnn):
    ref = copy.deepcopy(cnn)
    masks = fastprune.prune(cnn, Magnitude(), 0.6, scope="layer", min_keep=0, progress=False)
    for name in masks:
        module = ref.get_submodule(name.rsplit(".", 1)[0])
        torch_prune.l1_unstructured(module, "weight", amount=0.6)
        assert torch.equal(module.weight_mask.bool(), masks[name]), name


def test_global_differs_per_layer_but_hits_total(mlp):
    fastprune.prune(mlp, Magnitude(), 0.9, progress=False)
    per_layer = layer_sparsity(mlp)
    assert global_sparsity(mlp) == pytest.approx(0.9, abs=1 / 1144)
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01


def test_ties_break_in_tensor_then_index_order(mlp):
    masks = fastprune.prune(mlp, Const(torch.zeros_like), 0.5, min_keep=0, progress=False)
    flat = torch.cat([masks[n].flatten() for n in ["0.weight", "2.weight", "4.weight"]])
    k = round(0.5 * flat.numel())
    assert not flat[:k].any() and flat[k:].all()


def test_min_keep_prevents_layer_collapse(mlp):
    # The last layer's weights are tiny: a global threshold would remove all of them.
    with torch.no_grad():
        mlp[4].weight.mul_(1e-6)
    collapsed = copy.deepcopy(mlp)
    fastprune.prune(collapsed, Magnitude(), 0.9, min_keep=0, progress=False)
    assert layer_sparsity(collapsed)["4.weight"] == 1.0
    fastprune.prune(mlp, Magnitude(), 0.9, min_keep=10, progress=False)
    assert fastprune.sparsity_report(mlp, print_table=False)["layers"]["4.weight"]["nonzero"] == 10
    assert global_sparsity(mlp) == pytest.approx(0.9, abs=1e-3)


def test_min_keep_fraction(mlp):
    with torch.no_grad():
        mlp[4].weight.mul_(1e-6)
    fastprune.prune(mlp, Magnitude(), 0.75, min_keep=0.2, progress=False)
    assert fastprune.sparsity_report(mlp, print_table=False)["layers"]["4.weight"]["nonzero"] == 13  # ceil(0.2*64)


def test_min_keep_keeps_the_best_weights(mlp):
    w = mlp[4].weight.detach().abs().flatten()
    with torch.no_grad():
        mlp[4].weight.mul_(1e-6)
    fastprune.prune(mlp, Magnitude(), 0.9, min_keep=5, progress=False)
    kept = mlp[4].weight_mask.flatten()
    assert torch.equal(kept.nonzero().flatten().sort().values, w.topk(5).indices.sort().values)


def test_steps_follow_geometric_schedule_and_never_revive(mlp):
    seen = []

    class Recording(Magnitude):
        def scores(self, model, params, data=None, loss_fn=None):
            seen.append({n: (w != 0).clone() for n, w in params.items()})
            # Reversed magnitude would revive weights if already-pruned ones were not pinned.
            return {n: -w.abs() for n, w in params.items()}

    fastprune.prune(mlp, Recording(), 0.875, steps=3, progress=False)
    assert len(seen) == 3
    for before, after in zip(seen, seen[1:]):
        for n in before:
            assert not (after[n] & ~before[n]).any()
    assert global_sparsity(mlp) == pytest.approx(0.875, abs=1e-3)
    assert fastprune.geometric_schedule(0.875, 3) == pytest.approx([0.5, 0.75, 0.875])


def test_already_pruned_stay_pruned_at_lower_target(mlp):
    fastprune.prune(mlp, Magnitude(), 0.8, progress=False)
    before = {n: m.clone() for n, m in ((n, mlp.get_submodule(n[:-7]).weight_mask) for n in ["0.weight"])}
    masks = fastprune.prune(mlp, Random(seed=3), 0.5, progress=False)
    assert global_sparsity(mlp) == pytest.approx(0.8, abs=1e-3)
    assert torch.equal(masks["0.weight"], before["0.weight"])


def test_modules_by_name_and_type(cnn):
    masks = fastprune.prune(cnn, Magnitude(), 0.5, modules=["fc", nn.Conv1d], progress=False)
    assert set(masks) == {"fc.weight", "seq.weight"}
    masks = fastprune.prune(cnn, Magnitude(), 0.5, modules="bn", progress=False)
    assert set(masks) == {"bn.weight"}


def test_conv3d_and_single_module():
    conv = nn.Conv3d(2, 3, 3)
    masks = fastprune.prune(conv, Magnitude(), 0.5, progress=False)
    assert set(masks) == {"weight"} and int(masks["weight"].sum()) == conv.weight.numel() // 2


def test_random_is_reproducible(mlp):
    a = fastprune.prune(copy.deepcopy(mlp), Random(seed=1), 0.7, progress=False)
    b = fastprune.prune(copy.deepcopy(mlp), Random(seed=1), 0.7, progress=False)
    c = fastprune.prune(copy.deepcopy(mlp), Random(seed=2), 0.7, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_sparsity_zero_prunes_nothing(mlp):
    masks = fastprune.prune(mlp, Magnitude(), 0.0, progress=False)
    assert all(m.all() for m in masks.values())


# --- errors: each leaves the model exactly as it was -------------------------------------------

class Failing(Magnitude):
    """Raises on the second scoring call, after one step was applied."""

    def __init__(self):
        self.calls = 0

    def scores(self, model, params, data=None, loss_fn=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("criterion failed")
        return super().scores(model, params)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(criterion=Magnitude(), sparsity=1.0), ValueError, r"\[0, 1\)"),
    (dict(criterion=Magnitude(), sparsity=-0.1), ValueError, r"\[0, 1\)"),
    (dict(criterion=Magnitude(), sparsity=0.99, min_keep=100), ValueError, "min_keep allows at most"),
    (dict(criterion=Magnitude(), sparsity=0.99, scope="layer", min_keep=10), ValueError, "min_keep allows"),
    (dict(criterion=Magnitude(), sparsity=0.5, steps=0), ValueError, "steps"),
    (dict(criterion=Magnitude(), sparsity=0.5, scope="row"), ValueError, "scope"),
    (dict(criterion=Magnitude(), sparsity=0.5, modules=["nope"]), ValueError, r"unknown module.*'0', '2'"),
    (dict(criterion=Magnitude(), sparsity=0.5, modules=["1"]), ValueError, "no weight parameter"),
    (dict(criterion=Magnitude(), sparsity=0.5, modules=[nn.Conv2d]), ValueError, "no prunable parameters"),
    (dict(criterion=Magnitude(), sparsity=0.5, min_keep=-1), ValueError, "min_keep"),
    (dict(criterion=Const(lambda w: w.flatten()), sparsity=0.5), ValueError, "shape"),
    (dict(criterion=Const(lambda w: w.abs() / 0), sparsity=0.5), NonFiniteError, "non-finite"),
    (dict(criterion=Const(lambda w: w.abs() * float("nan")), sparsity=0.5), NonFiniteError, "non-finite"),
    (dict(criterion=Failing(), sparsity=0.9, steps=3), RuntimeError, "criterion failed"),
    (dict(criterion="magnitude", sparsity=0.5), TypeError, "Criterion"),
])
def test_errors_leave_model_unchanged(mlp, kwargs, error, match):
    fastprune.prune(mlp, Magnitude(), 0.3, modules=["0"], progress=False)  # one layer already pruned
    state = model_state(mlp)
    x = torch.randn(4, 20)
    out = mlp(x)
    with pytest.raises(error, match=match):
        fastprune.prune(mlp, progress=False, **kwargs)
    assert_same_state(mlp, state)
    assert not hasattr(mlp[2], "weight_mask")
    assert torch.equal(mlp(x), out)


def test_criterion_needing_data_without_data(mlp):
    class NeedsData(Magnitude):
        requires_data = True

    with pytest.raises(ValueError, match="needs data"):
        fastprune.prune(mlp, NeedsData(), 0.5, progress=False)


def test_no_prunable_parameters():
    with pytest.raises(ValueError, match="no prunable parameters"):
        fastprune.prune(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), Magnitude(), 0.5, progress=False)
