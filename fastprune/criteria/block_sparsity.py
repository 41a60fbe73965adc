"""Non-uniform sparsity across a model's blocks for the layer-wise criteria: a list of
per-block sparsities the user brings, or OWL (Yin et al., 2024, "Outlier Weighed
Layerwise sparsity"), which prunes less where the Wanda metric |W_ij| ||x_j|| has more
outliers. Either way the mean over the prunable weights is the step's target."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..validate import real

__all__ = ["outlier_ratio", "owl_allocation", "scaled_allocation", "check_block_sparsity"]


def outlier_ratio(metrics: Sequence[torch.Tensor], m: float) -> float:
    """The fraction of a block's Wanda metric entries (all its layers together) above
    ``m`` times their mean."""
    flat = torch.cat([t.reshape(-1).float() for t in metrics])
    return float((flat > m * flat.mean()).float().mean())


def _weighted_shift(values: list[float], sizes: list[int], target: float) -> list[float]:
    mean = sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
    return [v - mean + target for v in values]


def owl_allocation(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """OWL's per-block sparsities: the outlier ratios scaled to [0, 2 lam], and each block's
    density their value shifted so the mean (weighted by each block's prunable weights)
    is ``1 - sparsity``; blocks with more outliers keep more."""
    low, high = min(ratios), max(ratios)
    spread = [0.0 if high == low else (r - low) / (high - low) * 2 * lam for r in ratios]
    density = _weighted_shift(spread, sizes, 1 - sparsity)
    return _checked([1 - d for d in density], f"OWL with lambda={lam:g} around sparsity {sparsity:g}",
                    "lower owl_lambda")


def scaled_allocation(relative: Sequence[float], sizes: list[int], sparsity: float) -> list[float]:
    """``relative`` block sparsities scaled so their weighted mean is ``sparsity``."""
    mean = sum(v * n for v, n in zip(relative, sizes)) / sum(sizes)
    if mean == 0:
        raise ValueError("block_sparsity is all zeros: nothing to scale to the target")
    return _checked([v * sparsity / mean for v in relative], f"block_sparsity scaled to the step's sparsity "
                    f"{sparsity:g}", "flatten the list or lower the target")


def _checked(values: list[float], what: str, hint: str) -> list[float]:
    bad = [f"{v:.3f}" for v in values if not 0 <= v < 1]
    if bad:
        raise ValueError(f"{what} gives block sparsities {bad} outside [0, 1); {hint}")
    return values


def check_block_sparsity(value, blocks: int | None = None):
    """Validates ``block_sparsity`` (None, ``"owl"`` or a list of sparsities in [0, 1),
    one per block when ``blocks`` is known)."""
    if value is None or value == "owl":
        return value
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"block_sparsity must be None, 'owl' or a list of per-block sparsities, got {value!r}")
    values = [real(v, "block_sparsity entry", 0, 1, high_open=True) for v in value]
    if blocks is not None and len(values) != blocks:
        raise ValueError(f"block_sparsity has {len(values)} entries but the model has {blocks} blocks")
    return values
