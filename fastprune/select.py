"""Turning scores into masks: one global threshold or one per tensor, exact counts,
deterministic ties, already-pruned weights kept pruned and ``min_keep`` honoured."""
from __future__ import annotations

import math

import torch

from ._ops import kth_smallest

__all__ = ["keep_counts", "threshold_masks", "parse_pattern", "nm_masks"]


def keep_counts(numels: list[int], min_keep: int | float) -> list[int]:
    """Weights each tensor must keep: an int count, or a fraction in (0, 1) of its size."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or min_keep < 0:
        raise ValueError(f"min_keep must be a count >= 0 or a fraction in (0, 1), got {min_keep!r}")
    if isinstance(min_keep, float) and min_keep < 1.0:
        return [math.ceil(min_keep * n) for n in numels]
    if isinstance(min_keep, float) and not min_keep.is_integer():
        raise ValueError(f"min_keep={min_keep} is neither a fraction in (0, 1) nor a whole count")
    return [min(int(min_keep), n) for n in numels]


def _prepare(score: torch.Tensor, mask: torch.Tensor | None, keep: int) -> torch.Tensor:
    """Already-pruned weights sort first (-inf); the ``keep`` best survivors last (+inf)."""
    score = score if mask is None else score.masked_fill(~mask.bool(), -math.inf)
    alive = score.numel() if mask is None else int(mask.count_nonzero())
    protect = min(keep, alive)
    if protect > 0:
        # Out of place: the criterion's tensor may be shared (e.g. a user's cached scores).
        score = score.flatten().index_fill(0, score.flatten().topk(protect).indices, math.inf).view_as(score)
    return score


def _masks_at(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks pruning exactly the ``k`` lowest scores; ties go in (tensor, flat index) order."""
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    threshold, num_less = kth_smallest(scores, k)
    ties_left = k - num_less
    masks = []
    for s in scores:
        pruned = s < threshold
        if ties_left > 0:
            tied = s == threshold
            n_tied = int(tied.count_nonzero())
            if n_tied > ties_left:
                tied &= tied.flatten().cumsum(0).view_as(tied) <= ties_left
                n_tied = ties_left
            pruned |= tied
            ties_left -= n_tied
        masks.append(~pruned)
    return masks


def threshold_masks(scores: list[torch.Tensor], masks: list[torch.Tensor | None], keep: list[int],
                    sparsity: list[float] | float) -> list[torch.Tensor]:
    """Keep-masks for one pruning step.

    ``sparsity`` is one float (one global threshold over all tensors) or one float
    per tensor (each thresholded on its own). Counts are rounded like
    ``torch.nn.utils.prune``; a step never prunes fewer weights than are already
    pruned, and never more than ``keep`` allows (the caller checks that first).
    """
    prepared = [_prepare(s, m, c) for s, m, c in zip(scores, masks, keep)]
    pruned_now = [0 if m is None else m.numel() - int(m.count_nonzero()) for m in masks]
    if isinstance(sparsity, float):
        k = max(round(sparsity * sum(s.numel() for s in prepared)), sum(pruned_now))
        return _masks_at(prepared, k)
    return [_masks_at([s], max(round(sp * s.numel()), p))[0]
            for s, sp, p in zip(prepared, sparsity, pruned_now)]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M) with 0 < N < M."""
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except (AttributeError, ValueError):
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return n, m


def nm_masks(scores: list[torch.Tensor], masks: list[torch.Tensor | None], names: list[str], n: int,
             m: int) -> list[torch.Tensor]:
    """Keep-masks with the ``n`` best of every ``m`` consecutive weights along each
    row of ``weight.flatten(1)`` (the input dimension); already-pruned weights stay
    pruned, so such a group may keep fewer. Ties keep the lower index."""
    out = []
    for score, mask, name in zip(scores, masks, names):
        row = score[0].numel() if score.dim() > 1 else score.numel()
        if row % m:
            raise ValueError(f"pattern {n}:{m} needs the input dimension of {name!r} ({row} weights per output) "
                             f"to be a multiple of {m}; exclude it with modules= or use unstructured sparsity")
        s = score if mask is None else score.masked_fill(~mask.bool(), -math.inf)
        groups = s.reshape(-1, m)
        best = groups.argsort(dim=1, descending=True, stable=True)[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, best, True).view_as(score)
        out.append(keep if mask is None else keep & mask.bool())
    return out
