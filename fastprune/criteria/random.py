"""Random pruning, uniform or with Erdos-Renyi-Kernel (ERK) layer densities."""
from __future__ import annotations

import math

import torch

from ..validate import integer
from .base import Criterion

__all__ = ["Random", "erk_densities"]


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK per-tensor densities with total density ``density``.

    Each tensor's density is proportional to sum(shape) / prod(shape) (Evci et al.,
    "Rigging the Lottery"; Liu et al., "The Unreasonable Effectiveness of Random
    Pruning"). Tensors whose density would exceed 1 are kept dense and the scale is
    re-solved over the rest, so the total is met exactly before rounding.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in free)
        scale = budget / denom if denom > 0 else 0.0
        # Capping a tensor only raises the scale, so every tensor over 1 now stays over 1.
        over = {n for n in free if scale * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}


class Random(Criterion):
    """Random scores, reproducible from ``seed``.

    ``distribution="uniform"`` leaves the per-tensor split to ``scope`` (with
    ``scope="layer"`` every tensor gets the same sparsity). ``distribution="erk"``
    fixes per-tensor sparsities with :func:`erk_densities`, whatever ``scope`` says.
    """

    def __init__(self, seed: int = 0, distribution: str = "uniform"):
        if distribution not in ("uniform", "erk"):
            raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
        self.seed = integer(seed, "seed")
        self.distribution = distribution

    def scores(self, model, params, data=None, loss_fn=None):
        out = {}
        for i, (name, w) in enumerate(params.items()):
            gen = torch.Generator(device=w.device).manual_seed(self.seed * 1_000_003 + i)
            out[name] = torch.rand(w.shape, generator=gen, device=w.device)
        return out

    def allocation(self, params, sparsity):
        if self.distribution == "uniform":
            return None
        dens = erk_densities({n: tuple(w.shape) for n, w in params.items()}, 1.0 - sparsity)
        return {n: 1.0 - d for n, d in dens.items()}
