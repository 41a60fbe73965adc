"""Model-level conversion: pruned Linear/Conv2d layers to sparse execution where it pays."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import apply_masks, get_mask, refresh_masked
from .frozen import FrozenConv2d, FrozenLinear, FrozenPattern
from .layers import SparseConv2d, SparseLinear, SparseModule
from .semi import SemiStructuredLinear, semi_structured_reason

__all__ = ["to_sparse", "to_dense", "SparseReport", "LayerChoice", "CONVERTED"]

#: The module types to_sparse puts in place of pruned layers.
CONVERTED = (SparseModule, FrozenPattern, SemiStructuredLinear)


@dataclass
class LayerChoice:
    """What :func:`to_sparse` decided for one pruned layer (times in ms, None when not measured)."""

    name: str
    sparsity: float
    kernel: str  # "sparse", "2:4" (CUDA) or "dense" (a FrozenLinear / FrozenConv2d, or the masked layer as it was)
    dense_ms: float | None = None
    sparse_ms: float | None = None
    reason: str = ""
    semi_ms: float | None = None  # the 2:4 semi-structured kernel, when the layer qualifies for it


@dataclass
class SparseReport:
    layers: list[LayerChoice] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"{'layer':24s} {'sparsity':>8s} {'kernel':>7s} {'dense ms':>9s} {'sparse ms':>9s} {'2:4 ms':>9s}  reason"]
        for c in self.layers:
            fmt = (lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}")
            rows.append(f"{c.name:24s} {c.sparsity:8.3f} {c.kernel:>7s} {fmt(c.dense_ms)} {fmt(c.sparse_ms)} "
                        f"{fmt(c.semi_ms)}  {c.reason}")
        return "\n".join(rows)


def _time_ms(fn, arg, repeats: int) -> float:
    sync = torch.cuda.synchronize if arg.is_cuda else (lambda: None)
    fn(arg)  # warm-up (first-call allocations, the CUDA context)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(arg)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _capture_inputs(model: nn.Module, names: list[str], example_input) -> dict[str, torch.Tensor]:
    inputs, handles = {}, []
    for name in names:
        def hook(module, args, name=name):
            inputs.setdefault(name, args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _unsupported(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        return "grouped, non-zero-padded or string-padded convolution"
    if module.weight.dtype not in (torch.float32, torch.float64):
        return f"{module.weight.dtype} weights (the CPU kernel takes float32/float64)"
    return ""


def to_sparse(model: nn.Module, example_input, min_sparsity: float = 0.7, calibrate: bool = True,
              repeats: int = 20, freeze_dense: bool = True) -> tuple[nn.Module, SparseReport]:
    """Replaces pruned ``nn.Linear`` / ``nn.Conv2d`` layers by :class:`SparseLinear` /
    :class:`SparseConv2d` where that is faster, in place.

    A layer qualifies when it carries a pruning mask (``torch.nn.utils.prune`` or
    :func:`fastprune.prune`) with at least ``min_sparsity`` of its weights pruned.
    With ``calibrate`` (the default), each qualifying layer runs ``repeats`` times
    on its own input from one forward of ``example_input`` (a tensor, or a tuple
    of positional inputs), dense and sparse, and is replaced only if the sparse
    module is faster, so the model never gets slower at that input shape.
    Without it, every qualifying layer is replaced.

    With ``freeze_dense`` (the default) every pruned layer left dense becomes a
    :class:`FrozenLinear` / :class:`FrozenConv2d`: the masked weight stored once
    instead of ``weight_orig * weight_mask`` recomputed by a hook on every call,
    with the pattern frozen during training like the sparse modules'. The
    calibration times that form as the dense candidate. ``freeze_dense=False``
    leaves those layers masked as they were.

    On CUDA (Ampere or newer), a Linear layer whose mask is 2:4 along its inputs
    (``fastprune.prune(..., pattern="2:4")``) is also timed as a
    :class:`SemiStructuredLinear` (``torch.sparse.to_sparse_semi_structured``;
    inference only), whatever ``min_sparsity`` says; the fastest kernel wins.

    Returns ``(model, report)``; ``print(report)`` gives, per pruned layer, its
    sparsity, the kernel chosen and both times. :func:`to_dense` reverts.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    pruned = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and get_mask(m, "weight") is not None}
    if not pruned:
        raise ValueError("to_sparse found no pruned Linear or Conv2d layer (no 'weight_mask'); prune the model first, "
                         "e.g. fastprune.prune(model, criterion, sparsity=0.9)")
    report, build, semi = SparseReport(), {}, {}
    for name, module in pruned.items():
        mask = get_mask(module, "weight")
        sparsity = 1.0 - float(mask.float().mean())
        reason = _unsupported(module)
        if not reason and sparsity < min_sparsity:
            reason = f"sparsity below min_sparsity={min_sparsity}"
        report.layers.append(LayerChoice(name, sparsity, "dense", reason=reason))
        if not reason:
            build[name] = module
        if not semi_structured_reason(module, mask):  # 2:4 masks are 50 % sparse: min_sparsity does not apply
            semi[name] = module
    timed = list(dict.fromkeys([*build, *semi]))
    inputs = _capture_inputs(model, timed, example_input) if calibrate and timed else {}
    for choice in report.layers:
        module = pruned[choice.name]
        # Outside no_grad: module.weight (= weight_orig * mask, recomputed here) then carries
        # weight_orig's requires_grad, which the new modules' parameters inherit.
        mask = get_mask(module, "weight")
        refresh_masked(module, "weight")
        dense = (FrozenLinear if isinstance(module, nn.Linear) else FrozenConv2d)(module, mask) if freeze_dense \
            else module
        candidates = {}
        if choice.name in build:
            candidates["sparse"] = SparseLinear(module.weight, mask, module.bias) if isinstance(module, nn.Linear) \
                else SparseConv2d(module, mask)
        if choice.name in semi:
            try:
                candidates["2:4"] = SemiStructuredLinear(module, mask)
            except RuntimeError as exc:  # a dtype or shape torch's 2:4 kernels do not take
                choice.reason = f"2:4 kernel unavailable: {exc}"
        best = "2:4" if "2:4" in candidates else ("sparse" if candidates else None)  # uncalibrated choice
        if best is not None and choice.name in inputs:
            with torch.no_grad():
                choice.dense_ms = _time_ms(dense, inputs[choice.name], repeats)
                times = {k: _time_ms(m, inputs[choice.name], repeats) for k, m in candidates.items()}
            choice.sparse_ms, choice.semi_ms = times.get("sparse"), times.get("2:4")
            best = min(times, key=times.get)
            if times[best] >= choice.dense_ms:
                best, choice.reason = None, "dense is faster at this input shape"
        if best is not None:
            choice.kernel, choice.reason = best, ""
            _set_submodule(model, choice.name, candidates[best])
        elif dense is not module:
            _set_submodule(model, choice.name, dense)
    return model, report


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def to_dense(model: nn.Module) -> nn.Module:
    """Replaces every module :func:`to_sparse` put in (sparse, 2:4 or frozen dense) by its
    ``nn.Linear`` / ``nn.Conv2d``, with the pruning mask re-applied (``weight_orig`` /
    ``weight_mask``), in place."""
    sparse = [(name, m) for name, m in model.named_modules() if isinstance(m, CONVERTED)]
    for name, module in sparse:
        dense = module.to_dense()
        mask = module.weight_mask()
        _set_submodule(model, name, dense)
        apply_masks(model, {f"{name}.weight": mask})
    return model
