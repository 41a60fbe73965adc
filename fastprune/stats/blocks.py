"""Fisher blocks (WoodFisher's blocked empirical Fisher) and raw per-sample gradients."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops
from ..batches import leaves, num_samples
from ..distributed import all_gather_rows, all_reduce_sum, resolve_group
from ..errors import check_finite
from ..memory import check_budget
from ..profiling import phase
from ..targets import find_targets
from .. import validate
from ..validate import integer
from .capture import run_passes
from .formulas import UNFOLD_BYTES, weight_per_sample
from .losses import resolve_loss
from .plan import batchnorm_eval, check_batchnorm, plan_stats
from .verify import verify_plan

__all__ = ["FisherBlocks", "per_sample_gradients", "PerSampleGradients", "accumulate_blocks"]

_NONFINITE_HINT = "check the inputs, the loss and the model for overflow"


def accumulate_blocks(blocks: torch.Tensor, grads: torch.Tensor, block_size: int,
                      slots: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``blocks[b] += sum_n g_n[b] g_n[b]^T`` in place for per-sample gradients ``grads``
    (S, numel) over blocks of ``block_size`` consecutive weights (the last zero-padded).
    With ``slots`` (``FisherInverse.slots``) only each block's slot entries are kept, and
    ``blocks`` is (num_blocks, K, K) in slot coordinates. Layers with the fused op
    (``grad_blocks_accumulate``) add their tiles without forming ``grads``."""
    from ..second_order.inverse import FisherInverse  # the slot layout lives with the inverse

    nb = blocks.shape[0]
    grads = grads.to(blocks.dtype)
    if slots is None:
        per_block = F.pad(grads, (0, nb * block_size - grads.shape[1])).view(len(grads), nb, block_size)
        per_block = per_block.transpose(0, 1)  # (nb, S, B)
    else:
        per_block = FisherInverse.gather_slots(grads, block_size, *slots)  # (nb, S, K)
    blocks.baddbmm_(per_block.transpose(1, 2), per_block)


def _empirical(y):
    """The one pass at the true labels ``y``, every sample weighted 1."""
    return lambda outputs: iter([(y, None, "grad")])


class FisherBlocks:
    """Accumulates sum_n g_n[b] g_n[b]^T over blocks b of ``block_size`` consecutive
    weights of each prunable weight (flattened row-major, as ``weight.flatten()``).

    The blocks of a tensor with P weights form a (ceil(P / B), B, B) tensor; when B
    does not divide P the last block is zero-padded (its padded rows and columns are
    0). Default tensors: the ``weight`` of every Linear / Conv1d / Conv2d / Conv3d,
    or those of ``modules``. Linear, Conv1d and Conv2d use the fused op; other layers
    use torch.func per-sample gradients. Only the empirical Fisher is collected.

    With torch.distributed (``process_group``, default: the default group when
    initialised), each rank accumulates its share of the data and ``blocks`` /
    ``num_samples`` return the statistics of the union: they are collective calls,
    so every rank makes them in the same order. ``state_dict`` / ``load_state_dict``
    let a long collection resume where it stopped.

    The blocks take ceil(P / B) * B * B values per tensor; if that exceeds
    ``max_memory`` bytes (default: a fraction of the free memory) the constructor
    raises before allocating anything.

    Example::

        fb = FisherBlocks(model, block_size=128)
        for x, y in loader:
            fb.accumulate(x, y, "cross_entropy")
        F0 = fb.blocks("fc1.weight")   # (num_blocks, 128, 128), mean over fb.num_samples
    """

    def __init__(self, model: nn.Module, block_size: int, modules=None, bn: str = "raise", strict: bool = False,
                 process_group=None, max_memory: int | None = None):
        validate.module(model)
        block_size = integer(block_size, "block_size", 1)
        validate.optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
        self.model, self.block_size, self.bn, self._strict = model, block_size, bn, strict
        check_batchnorm(model, bn)
        self._targets = {t.name: t for t in find_targets(model, modules)}
        self._plan = plan_stats(model, strict=strict, keys=set(self._targets), grouped_only=True)
        shapes = {name: (math.ceil(t.numel / block_size), _ops.acc_dtype(t.param.dtype))
                  for name, t in self._targets.items()}
        need = sum(nb * block_size ** 2 * dt.itemsize for nb, dt in shapes.values())
        device = next(iter(self._targets.values())).param.device
        check_budget(need, max_memory, device, f"FisherBlocks(block_size={block_size}) over {len(shapes)} tensors",
                      "use a smaller block_size, the low-rank path (WoodFisher with num_grads < block_size) or fewer "
                      "modules")
        self._sums = {name: torch.zeros(nb, block_size, block_size, dtype=dt, device=self._targets[name].param.device)
                      for name, (nb, dt) in shapes.items()}
        self._count = 0
        self._group = resolve_group(process_group)
        # After a reduction every rank holds the global sums; rank 0 keeps them and the
        # others restart from zero on their next batch, so the next reduction adds
        # only what is new (no second copy of the blocks).
        self._synced = False

    @property
    def num_samples(self) -> int:
        """Samples accumulated (over all ranks with a process group: collective)."""
        self._sync()
        return self._count

    def _sync(self) -> None:
        if self._group is None or self._synced:
            return
        count = torch.tensor([float(self._count)], dtype=torch.float64,
                             device=next(iter(self._sums.values())).device)
        all_reduce_sum(list(self._sums.values()) + [count], self._group)
        self._count, self._synced = int(count.item()), True

    @property
    def names(self) -> list[str]:
        """The tensors covered, keyed like ``named_parameters()`` (``_orig`` dropped)."""
        return list(self._targets)

    def accumulate(self, inputs: torch.Tensor, targets, loss_fn=None) -> None:
        """Adds one batch: one forward and one backward of the per-sample loss. A batch
        with NaN or inf raises :class:`~fastprune.errors.NonFiniteError` before anything
        is added, so the sums stay usable; an empty batch adds nothing."""
        fn, _ = resolve_loss(loss_fn)
        check_batchnorm(self.model, self.bn)
        n = num_samples(inputs, targets)
        if n == 0:
            return
        if self._synced:
            self._synced = False
            if torch.distributed.get_rank(self._group) != 0:
                for t in self._sums.values():
                    t.zero_()
                self._count = 0
        with phase("stats"), batchnorm_eval(self.model, self.bn):
            verify_plan(self.model, self._plan, inputs, targets, fn, self._strict)
            passes = run_passes(self.model, self._plan, inputs, fn, _empirical(targets), n)
            for _, calls, fallback in passes:
                # Per-sample gradients of finite inputs and output gradients are finite (short of
                # overflow): checked before the sums take them in.
                check_finite([(f"{name}.weight" if name else "weight", t) for name, captured in calls.items()
                              for pair in captured for t in pair] + list(fallback.items()),
                             "non-finite per-sample gradients", _NONFINITE_HINT, exact=False)
                for mod_name, (formula, _) in self._plan.native.items():
                    if mod_name not in calls:
                        continue
                    key = f"{mod_name}.weight" if mod_name else "weight"
                    for route, tile in formula.weight_tiles(calls[mod_name], UNFOLD_BYTES):
                        if route == "direct":
                            accumulate_blocks(self._sums[key], tile, self.block_size)
                        else:
                            _ops.grad_blocks_accumulate(*tile, self._sums[key])
                for key, ps in fallback.items():
                    accumulate_blocks(self._sums[key], ps.reshape(n, -1), self.block_size)
            check_finite(list(self._sums.items()), "non-finite per-sample gradients", _NONFINITE_HINT, exact=False)
        self._count += n

    def blocks(self, name: str) -> torch.Tensor:
        """(1/N) sum_n g_n[b] g_n[b]^T for every block of ``name``; rows and columns of
        pruned weights are zero (their gradients are masked)."""
        if name not in self._sums:
            raise KeyError(f"{name!r} is not collected; collected tensors are {self.names}")
        self._sync()
        if self._count == 0:
            raise ValueError("no samples accumulated yet: call accumulate(inputs, targets, loss_fn) first")
        out = self._sums[name] / self._count
        mask = self._targets[name].mask
        if mask is not None:
            nb, b = out.shape[:2]
            m = F.pad(mask.flatten().to(out.dtype), (0, nb * b - mask.numel())).view(nb, b)
            out = out * m.unsqueeze(2) * m.unsqueeze(1)
        return out


    def state_dict(self) -> dict:
        """The running sums, the sample count and the block size (this rank's share
        with a process group), to resume an interrupted collection."""
        return {"block_size": self.block_size, "count": self._count, "synced": self._synced,
                "sums": {k: v.clone() for k, v in self._sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`; the block size and tensors must match."""
        if state["block_size"] != self.block_size or set(state["sums"]) != set(self._sums):
            raise ValueError(f"state is for block_size={state['block_size']} over {sorted(state['sums'])}, this "
                             f"collector has block_size={self.block_size} over {sorted(self._sums)}")
        for k, v in state["sums"].items():
            if v.shape != self._sums[k].shape:
                raise ValueError(f"state blocks of {k!r} have shape {tuple(v.shape)}, expected "
                                 f"{tuple(self._sums[k].shape)}")
        for k, v in state["sums"].items():
            self._sums[k].copy_(v)
        self._count, self._synced = int(state["count"]), bool(state["synced"])


def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, targets, loss_fn=None, modules=None,
                         strict: bool = False, process_group=None, max_memory: int | None = None
                         ) -> dict[str, torch.Tensor]:
    """Per-sample gradients (N, numel) of the prunable weights (of ``modules``), from one
    forward+backward; the input of WoodFisher's low-rank path when N < block size.
    Columns of pruned weights are zero.

    With torch.distributed (``process_group``, default: the default group when
    initialised) every rank passes the same number of samples and gets the rows of
    all ranks, in rank order: the gradient set of the union.

    The result holds N x (weights) values (times the world size when gathered);
    ``max_memory`` (bytes, default half the free memory) is checked before any work.
    """
    validate.module(model)
    validate.optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
    group = resolve_group(process_group)
    n = total = num_samples(inputs, targets)
    device = next(leaves(inputs)).device
    if group is not None:  # the same checks on every rank, before any rank allocates
        counts = torch.tensor([n], device=device)
        all_reduce_sum([counts], group)
        total = int(counts)
        if total != n * torch.distributed.get_world_size(group):
            raise ValueError(f"per_sample_gradients under torch.distributed needs the same number of samples on "
                             f"every rank; this rank has {n} of {total} in all")
    tensors = find_targets(model, modules)
    need = 2 * total * sum(t.numel for t in tensors) * tensors[0].weight.element_size() if tensors else 0
    check_budget(need, max_memory, device, f"per-sample gradients of {total} samples",
                  "pass fewer samples per call (the sums of fisher_diag and FisherBlocks need no N x params "
                  "buffer)")
    out = PerSampleGradients(model, loss_fn, modules, strict)(inputs, targets)
    if group is not None:
        out = {k: all_gather_rows(v, group) for k, v in out.items()}
    return out


class PerSampleGradients:
    """:func:`per_sample_gradients` of this process's samples, with the statistics plan
    (targets, formulas, masks) built once and reused for every call on ``(inputs,
    targets)``, e.g. the chunks of one WoodFisher step. Build a new one after the
    model's pruned tensors change (new masks are new buffers)."""

    def __init__(self, model: nn.Module, loss_fn=None, modules=None, strict: bool = False):
        self.model, self.strict = model, strict
        self.loss_fn, _ = resolve_loss(loss_fn)
        self.keys = {t.name for t in find_targets(model, modules)}
        self.plan = plan_stats(model, strict=strict, keys=self.keys, grouped_only=True)

    def __call__(self, inputs: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        plan, out, n = self.plan, {}, num_samples(inputs, targets)
        with phase("stats"), batchnorm_eval(self.model, "raise"):
            verify_plan(self.model, plan, inputs, targets, self.loss_fn, self.strict)
            passes = run_passes(self.model, plan, inputs, self.loss_fn, _empirical(targets), n)
            for _, calls, fallback in passes:
                for mod_name, (formula, _) in plan.native.items():
                    if mod_name in calls:
                        key = f"{mod_name}.weight" if mod_name else "weight"
                        out[key] = weight_per_sample(formula, calls[mod_name])
                out.update({k: v.reshape(n, -1) for k, v in fallback.items()})
            check_finite(list(out.items()), "non-finite per-sample gradients", _NONFINITE_HINT, exact=False)
            for key in self.keys:
                mask = plan.masks.get(key)
                if mask is not None:
                    out[key] = out[key] * mask.flatten()
        return {k: out[k] for k in plan.keys if k in out}
