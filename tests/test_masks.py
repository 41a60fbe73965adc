"""Interop of fastprune masks with torch.nn.utils.prune, state_dict and deepcopy."""
import copy
import io

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastprune
from fastprune.criteria import Magnitude


def test_reparametrisation_matches_torch(mlp):
    x = torch.randn(8, 20)
    masks = fastprune.prune(mlp, Magnitude(), 0.7, progress=False)
    layer = mlp[0]
    assert torch_prune.is_pruned(mlp)
    assert isinstance(layer.weight_orig, nn.Parameter) and "weight" not in layer._parameters
    assert layer.weight_mask.dtype == torch.bool
    assert torch.equal(layer.weight_mask, masks["0.weight"])
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    # The forward hook masks the weight: a changed orig shows through only where kept.
    with torch.no_grad():
        layer.weight_orig.add_(1.0)
    mlp(x)
    assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)
    assert (layer.weight[~layer.weight_mask] == 0).all()


def test_pruned_gradients_are_zero(mlp):
    fastprune.prune(mlp, Magnitude(), 0.5, progress=False)
    mlp(torch.randn(4, 20)).sum().backward()
    layer = mlp[2]
    assert (layer.weight_orig.grad[~layer.weight_mask] == 0).all()
    assert layer.weight_orig.grad[layer.weight_mask].abs().sum() > 0


def test_torch_remove_and_remove_masks(mlp):
    fastprune.prune(mlp, Magnitude(), 0.6, progress=False)
    expected = mlp[0].weight.detach().clone()
    torch_prune.remove(mlp[0], "weight")
    assert torch.equal(mlp[0].weight, expected) and not hasattr(mlp[0], "weight_mask")
    fastprune.remove_masks(mlp)
    assert not torch_prune.is_pruned(mlp)
    assert fastprune.sparsity_report(mlp, print_table=False)["global"]["sparsity"] > 0.55


def test_state_dict_round_trip(mlp):
    fastprune.prune(mlp, Magnitude(), 0.8, progress=False)
    buffer = io.BytesIO()
    torch.save(mlp.state_dict(), buffer)
    fresh = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4))
    buffer.seek(0)
    fastprune.load_pruned_state_dict(fresh, torch.load(buffer))
    x = torch.randn(5, 20)
    assert torch.equal(fresh(x), mlp(x))
    for a, b in zip(mlp.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_deepcopy(mlp):
    fastprune.prune(mlp, Magnitude(), 0.5, progress=False)
    twin = copy.deepcopy(mlp)
    x = torch.randn(3, 20)
    assert torch.equal(twin(x), mlp(x))
    fastprune.prune(twin, Magnitude(), 0.9, progress=False)
    assert fastprune.sparsity_report(mlp, print_table=False)["global"]["sparsity"] == 0.5


def test_update_of_torch_float_mask_keeps_dtype_and_pruned(mlp):
    torch_prune.l1_unstructured(mlp[0], "weight", amount=0.3)
    before = mlp[0].weight_mask.clone()
    fastprune.prune(mlp, Magnitude(), 0.6, scope="layer", progress=False)
    assert mlp[0].weight_mask.dtype == torch.float32
    assert (mlp[0].weight_mask[before == 0] == 0).all()
    # And torch pruning on top of a fastprune mask keeps both.
    torch_prune.random_unstructured(mlp[2], "weight", amount=0.2)
    assert fastprune.sparsity_report(mlp, print_table=False)["layers"]["2.weight"]["sparsity"] > 0.6


def test_scores_feed_torch_global_unstructured(mlp):
    twin = copy.deepcopy(mlp)
    params = {name: p for name, p in mlp.named_parameters() if name.endswith("weight")}
    scores = Magnitude().scores(mlp, {n: p.detach() for n, p in params.items()})
    torch_prune.global_unstructured([(mlp.get_submodule(n.rsplit(".", 1)[0]), "weight") for n in params],
                                    pruning_method=torch_prune.L1Unstructured, amount=0.75,
                                    importance_scores={(mlp.get_submodule(n.rsplit(".", 1)[0]), "weight"): s
                                                       for n, s in scores.items()})
    ours = fastprune.prune(twin, Magnitude(), 0.75, min_keep=0, progress=False)
    for n, mask in ours.items():
        module = mlp.get_submodule(n.rsplit(".", 1)[0])
        assert torch.equal(module.weight_mask.bool(), mask)


def test_report_table(mlp, capsys):
    fastprune.prune(mlp, Magnitude(), 0.5, scope="layer", progress=False)
    report = fastprune.sparsity_report(mlp)
    out = capsys.readouterr().out
    assert "0.weight" in out and "global" in out and "50.00%" in out
    assert report["layers"]["2.weight"] == {"numel": 480, "nonzero": 240, "sparsity": 0.5}
