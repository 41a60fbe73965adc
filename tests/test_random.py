"""ERK densities and Random(distribution="erk")."""
import math

import pytest
import torch
from torch import nn

import fastprune
from fastprune.criteria import Random, erk_densities

SHAPES = {"conv1.weight": (16, 3, 3, 3), "conv2.weight": (32, 16, 3, 3), "fc1.weight": (256, 512),
          "fc2.weight": (10, 256)}


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_erk_total_and_cap(density):
    dens = erk_densities(SHAPES, density)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    total = sum(dens[n] * numel[n] for n in SHAPES) / sum(numel.values())
    assert total == pytest.approx(density, rel=1e-12)
    assert all(0.0 <= d <= 1.0 + 1e-12 for d in dens.values())


def test_erk_proportional_to_dims_ratio_below_cap():
    dens = erk_densities(SHAPES, 0.1)
    assert dens["fc2.weight"] == 1.0  # the small classifier would exceed 1 and is capped
    free = [n for n in SHAPES if dens[n] < 1.0]
    ratios = {n: dens[n] * math.prod(SHAPES[n]) / sum(SHAPES[n]) for n in free}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-12)


def test_erk_bad_density():
    with pytest.raises(ValueError, match="density"):
        erk_densities(SHAPES, 1.5)


def test_random_erk_prunes_to_erk_layer_sparsities():
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    fastprune.prune(model, Random(seed=0, distribution="erk"), 0.9, min_keep=0, progress=False)
    report = fastprune.sparsity_report(model, print_table=False)
    expected = erk_densities({n: tuple(model.get_submodule(n[:-7]).weight.shape) for n in report["layers"]}, 0.1)
    for n, row in report["layers"].items():
        assert row["nonzero"] == round(expected[n] * row["numel"])
    assert report["global"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert report["layers"]["4.weight"]["sparsity"] < report["layers"]["2.weight"]["sparsity"]


def test_random_bad_distribution():
    with pytest.raises(ValueError, match="uniform"):
        Random(distribution="normal")


def test_uniform_random_layer_scope_is_uniform():
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
    masks = fastprune.prune(model, Random(seed=5), 0.8, scope="layer", min_keep=0, progress=False)
    for m in masks.values():
        assert int(m.sum()) == round(0.2 * m.numel())
    # Random scores are independent of the weights: kept positions look uniform.
    assert 0.15 < masks["0.weight"][:, :32].float().mean() < 0.25
    assert torch.is_tensor(masks["0.weight"])
