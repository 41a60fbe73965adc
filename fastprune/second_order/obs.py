"""Optimal Brain Surgeon statistics and weight updates over blocked inverse Fishers.

For the local quadratic model L(w + d) ~ L(w) + g^T d + 1/2 d^T F d, removing
weight q (d_q = -w_q) at least cost gives the saliency
(w_q - [F^-1 g]_q)^2 / (2 [F^-1]_qq) and the update
d = -F^-1 g - F^-1 e_q (w_q - [F^-1 g]_q) / [F^-1]_qq; with g = 0 these are OBS /
WoodFisher's w_q^2 / (2 [F^-1]_qq) and d = -F^-1 e_q w_q / [F^-1]_qq.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory import check_budget
from ..profiling import phase
from .inverse import FisherInverse, first_true

__all__ = ["obs_scores", "obs_update"]


def obs_scores(inv: FisherInverse, w: torch.Tensor, newton: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency of every weight of the flattened ``w``; ``newton`` = F^-1 g adds the
    gradient term (WoodTaylor)."""
    r = w.to(inv.diag().dtype) if newton is None else w - newton
    return r.square() / (2 * inv.diag())


def obs_update(inv: FisherInverse, w: torch.Tensor, pruned: torch.Tensor, newton: torch.Tensor | None = None,
               group: bool = False, max_memory: int | None = None) -> torch.Tensor:
    """The weight change d (flattened) that compensates removing ``pruned`` (bool, flat).

    ``group=False`` sums the single-weight OBS updates (WoodFisher's rule);
    ``group=True`` solves, per block, the exact constrained minimiser
    d = -F^-1 g - F^-1[:, Q] (F^-1[Q, Q])^-1 (w_Q - [F^-1 g]_Q).
    """
    with phase("update"):
        w = w.to(inv.diag().dtype)
        r = w if newton is None else w - newton
        if group:
            d = -_group_step(inv, r, pruned, max_memory)
        else:
            d = -inv.mul(torch.where(pruned, r / inv.diag(), torch.zeros_like(r)))
        return d if newton is None else d - newton


def _group_step(inv: FisherInverse, r: torch.Tensor, pruned: torch.Tensor, max_memory: int | None) -> torch.Tensor:
    """F^-1[:, Q] (F^-1[Q, Q])^-1 r_Q per block, padding blocks to the largest |Q|."""
    nb, b = inv.num_blocks, inv.block_size
    pad = nb * b - inv.numel
    index, valid = first_true(F.pad(pruned, (0, pad)).view(nb, b))
    k = index.shape[1]
    if k == 0:
        return torch.zeros_like(r)
    check_budget(r.element_size() * nb * (b * k + 2 * k * k), max_memory, r.device,
                  f"the group OBS update of up to {k} weights in each of {nb} block(s) of {b}",
                  "use update=True (independent updates) or a smaller block_size / more steps")
    cols = inv.columns(index) * valid.unsqueeze(1)  # (nb, B, K)
    core = cols.gather(1, index.unsqueeze(2).expand(-1, -1, k))  # (nb, K, K) = F^-1[Q, Q]
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    core = torch.where(both, core, torch.diag_embed((~valid).to(core.dtype)))  # identity on padding
    rq = F.pad(r, (0, pad)).view(nb, b).gather(1, index) * valid
    lam = torch.linalg.solve(core, rq.unsqueeze(2))
    return (cols @ lam).reshape(-1)[: inv.numel]
