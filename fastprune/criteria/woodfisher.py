"""Optimal Brain Surgeon criteria with a blocked inverse empirical Fisher:
WoodFisher (Singh & Alistarh, 2020) and its gradient-aware variant WoodTaylor."""
from __future__ import annotations

import math

import torch

from ..blocks import per_sample_gradients
from ..distributed import all_gather_rows, all_reduce_sum, resolve_group
from ..inverse import FisherInverse, _check_budget, _check_damp
from ..masks import get_mask, split_param_name
from ..obs import obs_scores, obs_update
from ..stream import SampleStream
from .base import Criterion

__all__ = ["WoodFisher", "WoodTaylor"]

# Per-sample gradients are formed this many bytes at a time.
_CHUNK_BYTES = 256 << 20


def _positive_int(value, name: str, allow_none: bool = False):
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return value


class WoodFisher(Criterion):
    """OBS pruning with the blocked inverse empirical Fisher (WoodFisher).

    At each pruning step it draws ``num_grads`` gradients from ``data`` (each the
    mean over ``fisher_mini_batch`` samples; later steps continue through ``data``
    and cycle), forms F_b = damp I + (1/N) sum_n g_n[b] g_n[b]^T over blocks of
    ``block_size`` consecutive weights (``None``: the whole tensor is one block),
    scores w_q^2 / (2 [F^-1]_qq), and after the masks are chosen moves the
    surviving weights to compensate:

    * ``update=True``: d = -F^-1 sum_{q in Q} (w_q / [F^-1]_qq) e_q per block (WoodFisher's rule);
    * ``update="group"``: the exact constrained minimiser d = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q
      (costs a |Q| x |Q| solve per block, so best with small blocks or many steps);
    * ``update=False``: OBS ranking only, no compensation.

    The inverse is exact: a batched Cholesky when N >= block size, otherwise the
    low-rank form (I - W^T W) / damp that never forms a B x B matrix. Use with
    ``fastprune.prune(model, WoodFisher(...), sparsity, data=loader, loss_fn=...,
    steps=k)``; more steps keep the quadratic model local and usually help a lot.
    With torch.distributed initialised, each rank draws ``num_grads`` gradients from
    its own data and the inverse is that of all of them (blocks reduced, low-rank
    gradient sets gathered).

    Args:
        block_size: weights per block, or None for whole-tensor blocks.
        num_grads: gradients per step (N).
        damp: dampening added to the Fisher diagonal (> 0).
        update: True, "group" or False (see above).
        fisher_mini_batch: samples averaged into each gradient.
        max_memory: bytes the Fisher inverse may use (default: half the free memory).
    """

    requires_data = True
    _gradient_term = False

    def __init__(self, block_size: int | None = 128, num_grads: int = 1000, damp: float = 1e-5,
                 update: bool | str = True, fisher_mini_batch: int = 1, max_memory: int | None = None):
        if update not in (True, False, "group"):
            raise ValueError(f"update must be True, False or 'group', got {update!r}")
        self.block_size = _positive_int(block_size, "block_size", allow_none=True)
        self.num_grads = _positive_int(num_grads, "num_grads")
        self.damp = _check_damp(damp)
        self.update = update
        self.fisher_mini_batch = _positive_int(fisher_mini_batch, "fisher_mini_batch")
        self.max_memory = max_memory
        self._stream: SampleStream | None = None
        self._pending: dict[str, tuple[FisherInverse, torch.Tensor | None]] = {}

    def _samples(self, data):
        if self._stream is None or self._stream.data is not data:
            self._stream = SampleStream(data)
        return self._stream.take(self.num_grads * self.fisher_mini_batch)

    def _block(self, numel: int) -> int:
        return numel if self.block_size is None else min(self.block_size, numel)

    def _check_memory(self, params, device) -> None:
        n, need = self.num_grads, 0
        for w in params.values():
            b = self._block(w.numel())
            need += 4 * math.ceil(w.numel() / b) * (2 * n * b + 2 * n * n if n < b else 4 * b * b)
        _check_budget(need, self.max_memory, device, f"WoodFisher with num_grads={n} and block_size={self.block_size}",
                      "use a smaller block_size, or fewer num_grads than block_size for the low-rank path")

    def _collect(self, model, params, alive, x, y, loss_fn):
        """{name: FisherInverse} and the mean gradients, from per-sample gradients formed
        in chunks; only alive weights enter the inverses (pruned ones have zero gradients)."""
        m = self.fisher_mini_batch
        group = resolve_group()
        # With torch.distributed every rank brings its own num_grads gradients: N is their total.
        n = self.num_grads * (1 if group is None else torch.distributed.get_world_size(group))
        if group is not None and len(x) != self.num_grads * m:
            raise ValueError(f"with torch.distributed each rank needs num_grads * fisher_mini_batch = "
                             f"{self.num_grads * m} samples, this rank's data gave {len(x)}")
        modules = [name.rpartition(".")[0] for name in params]
        total = sum(w.numel() for w in params.values())
        chunk = max(m, (_CHUNK_BYTES // (4 * total * m)) * m)
        slots = {k: FisherInverse.slots(w.numel(), self._block(w.numel()), alive[k], w.device)
                 for k, w in params.items()}
        lowrank = {k: n < slots[k][0].shape[1] for k in params}
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in params if lowrank[k]}
        blocks: dict[str, torch.Tensor] = {}
        grad_sum: dict[str, torch.Tensor] = {}
        for s0 in range(0, len(x), chunk):
            ps = per_sample_gradients(model, x[s0:s0 + chunk], y[s0:s0 + chunk], loss_fn, modules=modules)
            for k, g in ps.items():
                if m > 1:
                    g = g.view(-1, m, g.shape[1]).mean(1)
                grad_sum[k] = g.sum(0) if k not in grad_sum else grad_sum[k] + g.sum(0)
                if lowrank[k]:
                    kept[k].append(g)
                    continue
                gs = FisherInverse.gather_slots(g, self._block(g.shape[1]), *slots[k])  # (nb, c, K)
                if k not in blocks:
                    blocks[k] = gs.new_zeros(gs.shape[0], gs.shape[2], gs.shape[2])
                blocks[k].baddbmm_(gs.transpose(1, 2), gs)
        # Same keys and shapes on every rank: one reduction covers the blocks and gradient sums.
        all_reduce_sum([blocks[k] for k in params if k in blocks] + [grad_sum[k] for k in params], group)
        invs = {}
        for k, w in params.items():
            b = self._block(w.numel())
            if lowrank[k]:
                parts = kept.pop(k)
                grads = all_gather_rows(parts[0] if len(parts) == 1 else torch.cat(parts), group)
                invs[k] = FisherInverse.from_grads(grads, self.damp, b, alive[k], self.max_memory)
            else:
                invs[k] = FisherInverse.from_blocks(blocks.pop(k).div_(n), self.damp, w.numel(), b, slots[k],
                                                    self.max_memory)
        return invs, {k: v / n for k, v in grad_sum.items()}

    def scores(self, model, params, data=None, loss_fn=None):
        if not params:
            return {}
        self._check_memory(params, next(iter(params.values())).device)
        x, y = self._samples(data)
        alive = {k: get_mask(*split_param_name(model, k)) for k in params}
        invs, grads = self._collect(model, params, alive, x, y, loss_fn)
        self._pending, out = {}, {}
        for k, w in params.items():
            newton = invs[k].mul(grads[k]) if self._gradient_term else None
            self._pending[k] = (invs[k], newton)
            out[k] = obs_scores(invs[k], w.flatten(), newton).view_as(w)
        return out

    def compensate(self, model, params, old_masks, new_masks):
        pending, self._pending = self._pending, {}
        if self.update is False:
            return None
        out = {}
        for k, w in params.items():
            inv, newton = pending[k]
            keep = new_masks[k].flatten().bool()
            alive = torch.ones_like(keep) if old_masks.get(k) is None else old_masks[k].flatten().bool()
            d = obs_update(inv, w.flatten(), alive & ~keep, newton, self.update == "group", self.max_memory)
            out[k] = ((w.flatten() + d) * keep).view_as(w).to(w.dtype)
        return out


class WoodTaylor(WoodFisher):
    """WoodFisher with the gradient term of the quadratic model: scores
    (w_q - [F^-1 g]_q)^2 / (2 [F^-1]_qq) with g the mean gradient of the same
    samples, and the update adds the Newton step -F^-1 g. Same arguments."""

    _gradient_term = True
