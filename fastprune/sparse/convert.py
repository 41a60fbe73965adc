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
    """Per-layer choices, and with calibration the whole model's forward times (ms) at
    each example input, with every qualifying layer dense and as converted."""

    layers: list[LayerChoice] = field(default_factory=list)
    model_dense_ms: list[float] = field(default_factory=list)
    model_sparse_ms: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"{'layer':24s} {'sparsity':>8s} {'kernel':>7s} {'dense ms':>9s} {'sparse ms':>9s} {'2:4 ms':>9s}  reason"]
        for c in self.layers:
            fmt = (lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}")
            rows.append(f"{c.name:24s} {c.sparsity:8.3f} {c.kernel:>7s} {fmt(c.dense_ms)} {fmt(c.sparse_ms)} "
                        f"{fmt(c.semi_ms)}  {c.reason}")
        for i, (d, t) in enumerate(zip(self.model_dense_ms, self.model_sparse_ms)):
            rows.append(f"model at example input {i}: {d:.3f} ms dense, {t:.3f} ms converted ({d / t:.2f}x)")
        return "\n".join(rows)


def _sync(example) -> None:
    if any(t.is_cuda for t in _tensors(example)):
        torch.cuda.synchronize()


def _tensors(example) -> list[torch.Tensor]:
    items = example if isinstance(example, tuple) else (example,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _run(model: nn.Module, example):
    return model(*example) if isinstance(example, tuple) else model(example)


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


def _capture_inputs(model: nn.Module, names: list[str], examples: list) -> dict[str, list[torch.Tensor]]:
    """Each named layer's first input at every example (one forward each)."""
    inputs, handles = {name: [] for name in names}, []
    for name in names:
        def hook(module, args, name=name):
            if len(inputs[name]) < seen[0]:
                inputs[name].append(args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    seen = [0]
    try:
        with torch.no_grad():
            for example in examples:
                seen[0] += 1
                _run(model, example)
    finally:
        for h in handles:
            h.remove()
    return {name: found for name, found in inputs.items() if len(found) == len(examples)}


def _unsupported(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        return "grouped, non-zero-padded or string-padded convolution"
    if module.weight.dtype not in (torch.float32, torch.float64):
        return f"{module.weight.dtype} weights (the CPU kernel takes float32/float64)"
    return ""


def _model_times(model: nn.Module, examples: list, swaps: dict, repeats: int) -> tuple[list[float], list[float]]:
    """Forward times (ms, medians) at each example with the layers of ``swaps`` ({name:
    (dense, converted)}) dense and converted, measured alternately so drift hits both."""
    dense_ms, sparse_ms = [], []
    with torch.no_grad():
        for example in examples:
            times = {False: [], True: []}
            for rep in range(repeats + 1):
                for converted in (False, True):
                    for name, pair in swaps.items():
                        _set_submodule(model, name, pair[converted])
                    _sync(example)
                    start = time.perf_counter()
                    _run(model, example)
                    _sync(example)
                    if rep:  # the first round warms up both
                        times[converted].append(time.perf_counter() - start)
            dense_ms.append(1e3 * statistics.median(times[False]))
            sparse_ms.append(1e3 * statistics.median(times[True]))
    return dense_ms, sparse_ms


def to_sparse(model: nn.Module, example_input, min_sparsity: float = 0.7, calibrate: bool = True,
              repeats: int = 20, freeze_dense: bool = True) -> tuple[nn.Module, SparseReport]:
    """Replaces pruned ``nn.Linear`` / ``nn.Conv2d`` layers by :class:`SparseLinear` /
    :class:`SparseConv2d` where that is faster, in place.

    A layer qualifies when it carries a pruning mask (``torch.nn.utils.prune`` or
    :func:`fastprune.prune`) with at least ``min_sparsity`` of its weights pruned.

    ``example_input`` is what the model will run on: a tensor, a tuple of positional
    inputs, or a **list** of those when it runs at several shapes (e.g. ``[x[:1],
    x[:16], x]`` for batches of 1, 16 and 256; the kernels' speed against dense
    changes with the batch). With ``calibrate`` (the default):

    1. each qualifying layer runs ``repeats`` times on its own input from a forward of
       every example, dense and sparse, and becomes sparse only if that is faster at
       every example;
    2. then the whole model is timed at every example with those layers dense and
       sparse, alternately. Where it is not faster at every example, the layers
       whose own gain was smallest go back to dense (half of them at a time) until it
       is. Layers timed in isolation can look faster than they run inside the model
       (warm caches, a neighbour's thread wake-ups), so this keeps the promise at the
       level users see: the model never gets slower at the example inputs.

    The report's ``model_dense_ms`` / ``model_sparse_ms`` hold those whole-model
    times (empty when no layer passed step 1). Without ``calibrate``, every qualifying layer is replaced, untimed.
    The example forwards run in eval mode (batch-norm statistics stay as they were).

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
    sparsity, the kernel chosen and both times (summed over the examples), then the
    model's times. :func:`to_dense` reverts.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    examples = list(example_input) if isinstance(example_input, list) else [example_input]
    if not examples:
        raise ValueError("to_sparse needs at least one example input; got an empty list")
    if calibrate and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats!r}")
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
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        inputs = _capture_inputs(model, timed, examples) if calibrate and timed else {}
        swaps, gains = _choose(model, pruned, report, build, semi, inputs, repeats, freeze_dense)
        if inputs and swaps:
            _check_model(model, examples, report, swaps, gains, repeats)
    finally:
        for m, training in modes.items():
            m.training = training
    return model, report


def _choose(model, pruned, report, build, semi, inputs, repeats, freeze_dense):
    """Puts each layer's chosen module in place; returns {name: (dense, converted)} of the
    converted layers and their measured gains (dense time over sparse time)."""
    swaps, gains = {}, {}
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
            best = _time_layer(choice, dense, candidates, inputs[choice.name], repeats)
            if best is not None:
                gains[choice.name] = choice.dense_ms / (choice.semi_ms if best == "2:4" else choice.sparse_ms)
        if best is not None:
            choice.kernel, choice.reason = best, ""
            swaps[choice.name] = (dense, candidates[best])
            _set_submodule(model, choice.name, candidates[best])
        elif dense is not module:
            _set_submodule(model, choice.name, dense)
    return swaps, gains


def _time_layer(choice, dense, candidates, layer_inputs, repeats):
    """Times dense and each candidate at every input; the candidate faster than dense at
    all of them with the least total time, or None."""
    with torch.no_grad():
        dense_ms = [_time_ms(dense, x, repeats) for x in layer_inputs]
        times = {k: [_time_ms(m, x, repeats) for x in layer_inputs] for k, m in candidates.items()}
    choice.dense_ms = sum(dense_ms)
    choice.sparse_ms = sum(times["sparse"]) if "sparse" in times else None
    choice.semi_ms = sum(times["2:4"]) if "2:4" in times else None
    winners = [k for k, t in times.items() if all(a < b for a, b in zip(t, dense_ms))]
    if not winners:
        choice.reason = "dense is faster at this input shape" if len(dense_ms) == 1 else \
            "dense is faster at one of the example inputs"
        return None
    return min(winners, key=lambda k: sum(times[k]))


def _check_model(model, examples, report, swaps, gains, repeats):
    """Moves converted layers back to dense, smallest gain first, until the model is
    faster than with all of them dense at every example (see to_sparse)."""
    by_name = {c.name: c for c in report.layers}
    ranked = sorted(swaps, key=lambda n: gains.get(n, float("inf")))
    while True:
        dense_ms, sparse_ms = _model_times(model, examples, swaps, repeats)
        report.model_dense_ms, report.model_sparse_ms = dense_ms, sparse_ms
        if all(t < d for t, d in zip(sparse_ms, dense_ms)) or not ranked:
            break
        drop = ranked[:max(1, len(ranked) // 2)]
        ranked = ranked[len(drop):]
        for name in drop:
            _set_submodule(model, name, swaps.pop(name)[0])
            by_name[name].kernel = "dense"
            by_name[name].reason = "the model as a whole ran slower with this layer sparse (model-level check)"
        if not swaps:
            report.model_sparse_ms = list(report.model_dense_ms)
            break
    for name, (dense, converted) in swaps.items():  # _model_times leaves the last state it timed
        _set_submodule(model, name, converted)


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
