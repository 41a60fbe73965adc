"""Fisher blocks (WoodFisher's blocked empirical Fisher) and raw per-sample gradients."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from .capture import check_batchnorm, plan_stats, run_passes
from .losses import resolve_loss
from .targets import find_targets

__all__ = ["FisherBlocks", "per_sample_gradients"]


def _check_finite(name: str, t: torch.Tensor) -> None:
    # NaN and inf survive a sum, so one reduction checks every per-sample gradient.
    if not bool(torch.isfinite(t.sum())):
        raise FloatingPointError(f"non-finite per-sample gradients (NaN or inf) in {name!r}; check the inputs, the "
                                 "loss and the model for overflow")


def _weight_per_sample(adapter, calls, s0: int, s1: int) -> torch.Tensor:
    """Per-sample weight gradients (S, numel) of samples [s0, s1), by the layer's direct
    route when it has one, else by the grouped-linear op."""
    ps = adapter.per_sample_weight(calls, s0, s1)
    return ps if ps is not None else _ops.per_sample_grads(*adapter.grouped(calls, s0, s1))


def _empirical(y):
    return lambda outputs: iter([(y, outputs.new_ones(outputs.shape[0]), "grad")])


class FisherBlocks:
    """Accumulates sum_n g_n[b] g_n[b]^T over blocks b of ``block_size`` consecutive
    weights of each prunable weight (flattened row-major, as ``weight.flatten()``).

    The blocks of a tensor with P weights form a (ceil(P / B), B, B) tensor; when B
    does not divide P the last block is zero-padded (its padded rows and columns are
    0). Default tensors: the ``weight`` of every Linear / Conv1d / Conv2d / Conv3d,
    or those of ``modules``. Linear, Conv1d and Conv2d use the fused op; other layers
    use torch.func per-sample gradients. Only the empirical Fisher is collected.

    Example::

        fb = FisherBlocks(model, block_size=128)
        for x, y in loader:
            fb.accumulate(x, y, "cross_entropy")
        F0 = fb.blocks("fc1.weight")   # (num_blocks, 128, 128), mean over fb.num_samples
    """

    def __init__(self, model: nn.Module, block_size: int, modules=None, bn: str = "raise", strict: bool = False):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.model, self.block_size, self.bn = model, block_size, bn
        check_batchnorm(model, bn)
        self._targets = {t.name: t for t in find_targets(model, modules)}
        self._plan = plan_stats(model, strict=strict, keys=set(self._targets), grouped_only=True)
        self._sums = {}
        for name, t in self._targets.items():
            acc = torch.float64 if t.param.dtype == torch.float64 else torch.float32
            nb = math.ceil(t.numel / block_size)
            self._sums[name] = torch.zeros(nb, block_size, block_size, dtype=acc, device=t.param.device)
        self.num_samples = 0

    @property
    def names(self) -> list[str]:
        """The tensors covered, keyed like ``named_parameters()`` (``_orig`` dropped)."""
        return list(self._targets)

    def accumulate(self, inputs: torch.Tensor, targets, loss_fn=None) -> None:
        """Adds one batch: one forward and one backward of the per-sample loss."""
        fn, _ = resolve_loss(loss_fn)
        bn_modules = check_batchnorm(self.model, self.bn)
        for m in bn_modules:
            m.eval()
        try:
            for _, calls, fallback in run_passes(self.model, self._plan, inputs, fn, _empirical(targets)):
                for mod_name, (adapter, _) in self._plan.native.items():
                    if mod_name not in calls:
                        continue
                    key = f"{mod_name}.weight" if mod_name else "weight"
                    n, step = len(inputs), adapter.sample_tile(calls[mod_name])
                    for s0 in range(0, n, step):
                        ps = adapter.per_sample_weight(calls[mod_name], s0, min(n, s0 + step))
                        if ps is not None:
                            self._add_per_sample(key, ps)
                        else:
                            _ops.grad_blocks_accumulate(*adapter.grouped(calls[mod_name], s0, min(n, s0 + step)),
                                                        self._sums[key])
                    _check_finite(key, self._sums[key])
                for key, ps in fallback.items():
                    self._add_per_sample(key, ps.reshape(len(inputs), -1))
        finally:
            for m in bn_modules:
                m.train()
        self.num_samples += len(inputs)

    def _add_per_sample(self, key: str, ps: torch.Tensor) -> None:
        blocks = self._sums[key]
        nb, b = blocks.shape[:2]
        ps = F.pad(ps.to(blocks.dtype), (0, nb * b - ps.shape[1])).view(len(ps), nb, b).permute(1, 2, 0)
        blocks.baddbmm_(ps, ps.transpose(1, 2))

    def blocks(self, name: str) -> torch.Tensor:
        """(1/N) sum_n g_n[b] g_n[b]^T for every block of ``name``; rows and columns of
        pruned weights are zero (their gradients are masked)."""
        if name not in self._sums:
            raise KeyError(f"{name!r} is not collected; collected tensors are {self.names}")
        if self.num_samples == 0:
            raise ValueError("no samples accumulated yet: call accumulate(inputs, targets, loss_fn) first")
        out = self._sums[name] / self.num_samples
        mask = self._targets[name].mask
        if mask is not None:
            nb, b = out.shape[:2]
            m = F.pad(mask.flatten().to(out.dtype), (0, nb * b - mask.numel())).view(nb, b)
            out = out * m.unsqueeze(2) * m.unsqueeze(1)
        return out


def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, targets, loss_fn=None, modules=None,
                         strict: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample gradients (N, numel) of the prunable weights (of ``modules``), from one
    forward+backward; the input of WoodFisher's low-rank path when N < block size.
    Columns of pruned weights are zero."""
    check_batchnorm(model, "raise")
    fn, _ = resolve_loss(loss_fn)
    keys = {t.name for t in find_targets(model, modules)}
    plan = plan_stats(model, strict=strict, keys=keys, grouped_only=True)
    out = {}
    for _, calls, fallback in run_passes(model, plan, inputs, fn, _empirical(targets)):
        for mod_name, (adapter, _) in plan.native.items():
            key = f"{mod_name}.weight" if mod_name else "weight"
            if mod_name in calls:
                out[key] = _weight_per_sample(adapter, calls[mod_name], 0, len(inputs))
                _check_finite(key, out[key])
        out.update({k: v.reshape(len(inputs), -1) for k, v in fallback.items()})
    for key in keys:
        mask = plan.masks.get(key)
        if mask is not None:
            out[key] = out[key] * mask.flatten()
    return {k: out[k] for k in plan.keys if k in out}
