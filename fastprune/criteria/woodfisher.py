"""Optimal Brain Surgeon criteria with a blocked inverse empirical Fisher:
WoodFisher (Singh & Alistarh, 2020) and its gradient-aware variant WoodTaylor."""
from __future__ import annotations

import functools
import math

import torch

from ..distributed import (all_gather_rows, all_gather_spans, all_reduce_sum, block_spans, exchange_columns,
                           resolve_group)
from .._ops import acc_dtype
from ..batches import SampleStream, num_samples, take
from ..memory import check_budget
from ..second_order.inverse import FisherInverse, check_damp
from ..second_order.obs import obs_scores, obs_update
from ..stats.blocks import PerSampleGradients, accumulate_blocks
from .. import validate
from ..validate import integer
from .base import Criterion

__all__ = ["WoodFisher", "WoodTaylor"]

# Per-sample gradients are formed this many bytes at a time.
_CHUNK_BYTES = 64 << 20


def _positive_int(value, name: str, allow_none: bool = False):
    if allow_none and value is None:
        return None
    return integer(value, name, 1, hint=" (or None)" if allow_none else "")


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
    gradient sets gathered). With ``shard_blocks=True`` each rank instead owns a
    contiguous share of every tensor's blocks: one all-to-all per chunk of samples
    sends each per-sample gradient entry to the rank that owns its block, each rank
    accumulates and inverts only its share (about 1/world of the memory), and the
    scores and weight updates are all-gathered. Blocks are independent, so the result
    is the unsharded one up to floating-point summation order.

    Args:
        block_size: weights per block, or None for whole-tensor blocks.
        num_grads: gradients per step (N).
        damp: dampening added to the Fisher diagonal (> 0).
        update: True, "group" or False (see above).
        fisher_mini_batch: samples averaged into each gradient.
        max_memory: bytes the Fisher inverse may use on each rank (default: half the
            free memory).
        shard_blocks: under torch.distributed, split the blocks across ranks (see above).
    """

    requires_data = True
    _gradient_term = False

    def __init__(self, block_size: int | None = 128, num_grads: int = 1000, damp: float = 1e-5,
                 update: bool | str = True, fisher_mini_batch: int = 1, max_memory: int | None = None,
                 shard_blocks: bool = False):
        if update not in (True, False, "group"):
            raise ValueError(f"update must be True, False or 'group', got {update!r}")
        self.block_size = _positive_int(block_size, "block_size", allow_none=True)
        self.num_grads = _positive_int(num_grads, "num_grads")
        self.damp = check_damp(damp)
        self.update = update
        self.fisher_mini_batch = _positive_int(fisher_mini_batch, "fisher_mini_batch")
        self.max_memory = validate.optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
        self.shard_blocks = bool(shard_blocks)
        self._stream: SampleStream | None = None
        self._stream_state: dict | None = None  # from load_state_dict, applied once data is seen

    def _samples(self, data):
        if self._stream is None or self._stream.data is not data:
            self._stream = SampleStream(data)
            if self._stream_state is not None:
                self._stream.load_state_dict(self._stream_state)
                self._stream_state = None
        return self._stream.take(self.num_grads * self.fisher_mini_batch)

    def state_dict(self) -> dict:
        """Where the gradient sampling stopped in ``data``."""
        stream = self._stream.state_dict() if self._stream is not None else self._stream_state
        return {} if stream is None else {"stream": stream}

    def load_state_dict(self, state: dict) -> None:
        self._stream, self._stream_state = None, state.get("stream")

    def _block(self, numel: int) -> int:
        return numel if self.block_size is None else min(self.block_size, numel)

    def _chunk(self, total: int) -> int:
        """Samples whose per-sample gradients (of ``total`` weights) are formed at once."""
        m = self.fisher_mini_batch
        return max(m, (_CHUNK_BYTES // (4 * total * m)) * m)

    def _check_memory(self, params, device, world: int) -> None:
        n, share = self.num_grads * world, world if self.shard_blocks else 1
        total = sum(w.numel() for w in params.values())
        need = 3 * 4 * total * min(self._chunk(total), self.num_grads * self.fisher_mini_batch)  # + two copies
        for w in params.values():
            b = self._block(w.numel())
            need += 4 * math.ceil(math.ceil(w.numel() / b) / share) * (2 * n * b + 2 * n * n if n < b else 4 * b * b)
        hint = "use a smaller block_size, or fewer num_grads than block_size for the low-rank path"
        if world > 1 and not self.shard_blocks:
            hint += ", or shard_blocks=True to split the blocks across the ranks"
        check_budget(need, self.max_memory, device, f"WoodFisher with N={n} gradients and block_size={self.block_size}",
                      hint)

    def _collect(self, step, shards: _Shards, x, y):
        """{name: FisherInverse of this rank's share of the blocks} and the mean gradients
        over that share, from per-sample gradients formed in chunks; only alive weights
        enter the inverses (pruned ones have zero gradients)."""
        m, group, params = self.fisher_mini_batch, shards.group, step.params
        shard = shards.sharded
        # With torch.distributed every rank brings its own num_grads gradients: N is their total.
        n = self.num_grads * shards.world
        if group is not None and num_samples(x, y) != self.num_grads * m:
            raise ValueError(f"with torch.distributed each rank needs num_grads * fisher_mini_batch = "
                             f"{self.num_grads * m} samples, this rank's data gave {num_samples(x, y)}")
        chunk = self._chunk(sum(w.numel() for w in params.values()))
        alive = {k: None if a is None else shards.share(k, a).bool() for k, a in step.masks.items()}
        slots = {k: FisherInverse.slots(c1 - c0, self._block(params[k].numel()), alive[k], params[k].device)
                 for k, (c0, c1) in shards.own.items()}
        lowrank = {k: n < slots[k][0].shape[1] for k in params}
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in params if lowrank[k]}
        blocks: dict[str, torch.Tensor] = {}
        grad_sum: dict[str, torch.Tensor] = {}
        per_sample = PerSampleGradients(step.model, step.loss_fn, [t.name.rpartition(".")[0] for t in step.targets])
        for s0 in range(0, num_samples(x, y), chunk):
            ps = per_sample(take(x, s0, s0 + chunk), take(y, s0, s0 + chunk))
            ps = {k: ps[k] if m == 1 else ps[k].view(-1, m, ps[k].shape[1]).mean(1) for k in params}
            # Sharded: every rank's gradients, restricted to the columns of this rank's blocks.
            sources = [dict(zip(params, part)) for part in
                       exchange_columns(list(ps.values()), list(shards.spans.values()), group)] if shard else [ps]
            del ps
            for part in sources:
                for k, g in part.items():
                    grad_sum[k] = g.sum(0) if k not in grad_sum else grad_sum[k] + g.sum(0)
                    if lowrank[k]:
                        kept[k].append(g)
                        continue
                    if k not in blocks:
                        k_slots = slots[k][0].shape[1]
                        blocks[k] = g.new_zeros(slots[k][0].shape[0], k_slots, k_slots, dtype=acc_dtype(g.dtype))
                    accumulate_blocks(blocks[k], g, self._block(params[k].numel()), slots[k])
        if not shard:  # same keys and shapes on every rank: one reduction covers blocks and gradient sums
            all_reduce_sum([blocks[k] for k in params if k in blocks] + [grad_sum[k] for k in params], group)
        invs = {}
        for k, w in params.items():
            b, (c0, c1) = self._block(w.numel()), shards.own[k]
            if c1 == c0:  # more ranks than blocks: this rank owns none of this tensor
                invs[k] = None
            elif lowrank[k]:
                parts = kept.pop(k)
                grads = parts[0] if len(parts) == 1 else torch.cat(parts)
                invs[k] = FisherInverse.from_grads(grads if shard else all_gather_rows(grads, group), self.damp, b,
                                                   alive[k], self.max_memory)
            else:
                invs[k] = FisherInverse.from_blocks(blocks.pop(k).div_(n), self.damp, c1 - c0, b, slots[k],
                                                    self.max_memory)
        return invs, {k: v / n for k, v in grad_sum.items()}

    def score_step(self, step):
        params = step.params
        if not params:
            return {}, None
        group = resolve_group(step.process_group)
        world = 1 if group is None else torch.distributed.get_world_size(group)
        self._check_memory(params, next(iter(params.values())).device, world)
        shards = _Shards(params, self._block, group, self.shard_blocks)
        x, y = self._samples(step.data)
        invs, grads = self._collect(step, shards, x, y)
        pending, scores = {}, {}
        for k, w in params.items():
            inv = invs[k]
            newton = inv.mul(grads[k]) if self._gradient_term and inv is not None else None
            pending[k] = (inv, newton)
            # A rank owning none of this tensor contributes its (empty) share as is.
            scores[k] = obs_scores(inv, shards.share(k, w), newton) if inv is not None else shards.share(k, w)
        return {k: v.view_as(params[k]) for k, v in shards.whole(scores).items()}, (shards, pending)

    def compensate(self, step, new_masks, context):
        if self.update is False:
            return None
        shards, pending = context
        moves = {}
        for k, w in step.params.items():
            inv, newton = pending[k]
            keep = shards.share(k, new_masks[k]).bool()
            old = step.masks.get(k)
            alive = torch.ones_like(keep) if old is None else shards.share(k, old).bool()
            moves[k] = obs_update(inv, shards.share(k, w), alive & ~keep, newton, self.update == "group",
                                  self.max_memory) if inv is not None else shards.share(k, w)
        moves = shards.whole(moves)
        return {k: ((w.flatten() + moves[k]) * new_masks[k].flatten()).view_as(w).to(w.dtype)
                for k, w in step.params.items()}


class _Shards:
    """Which contiguous share of every tensor's blocks this rank owns: all of them unless
    WoodFisher(shard_blocks=True) runs under torch.distributed."""

    def __init__(self, params: dict[str, torch.Tensor], block_of, group, shard_blocks: bool):
        self.group = group
        self.world = 1 if group is None else torch.distributed.get_world_size(group)
        self.sharded = group is not None and shard_blocks
        rank = torch.distributed.get_rank(group) if self.sharded else 0
        self.spans = {k: block_spans(w.numel(), block_of(w.numel()), self.world if self.sharded else 1)
                      for k, w in params.items()}
        self.own = {k: spans[rank] for k, spans in self.spans.items()}

    def share(self, k: str, v: torch.Tensor) -> torch.Tensor:
        """This rank's share of the flattened ``v``."""
        c0, c1 = self.own[k]
        return v.flatten()[c0:c1]

    def whole(self, shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flattened whole tensors from every rank's shares (no-op when unsharded)."""
        if not self.sharded:
            return shares
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in shares.values()))
        whole = all_gather_spans([v.to(dtype) for v in shares.values()], [self.spans[k] for k in shares], self.group)
        return dict(zip(shares, whole))


class WoodTaylor(WoodFisher):
    """WoodFisher with the gradient term of the quadratic model: scores
    (w_q - [F^-1 g]_q)^2 / (2 [F^-1]_qq) with g the mean gradient of the same
    samples, and the update adds the Newton step -F^-1 g. Same arguments."""

    _gradient_term = True
