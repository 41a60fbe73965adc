"""Fisher diagonals, Fisher blocks and mean gradients from one forward+backward per batch."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _ops
from ..batches import iterate_batches, model_device, num_samples
from ..distributed import all_reduce_sum, resolve_group
from ..errors import check_finite
from ..memory import check_budget
from ..profiling import timed
from .. import validate
from ..validate import integer
from .capture import run_passes
from .plan import batchnorm_eval, plan_stats
from .verify import input_signature, verify_plan
from .losses import FISHER_KINDS, fisher_passes, resolve_loss

__all__ = ["fisher_diag", "FisherCollector"]

_NONFINITE_HINT = ("check the inputs, the loss and the model for overflow (lower the learning rate, use "
                   "float32)")


def _check_fisher(fisher: str, mc_samples: int) -> None:
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    integer(mc_samples, "mc_samples", 1)


def _structure(model: nn.Module) -> tuple:
    """What a plan depends on: every module's parameters (identity, requires_grad) and
    pruning masks (identity). Pruning, un-pruning, replacing a layer or freezing a
    parameter all change it."""
    return tuple((id(m), tuple((k, id(p), p.requires_grad) for k, p in m._parameters.items() if p is not None),
                  tuple(id(b) for k, b in m._buffers.items() if k.endswith("_mask")))
                 for m in model.modules())


class FisherCollector:
    """The Fisher diagonal (and mean gradient) of one model, built for repeated calls.

    :func:`fisher_diag` plans which formula covers each parameter and looks up its
    check against autograd on every call. A collector does both once per model state
    and input layout and reuses them across calls and batches (an iterative pruner
    calls it every step; on LeNet-300-100 at batch 256 that was about 0.1 ms, some 6 %
    of a training step). Its hooks are registered for each forward only, so the model
    runs untouched between calls. The plan is rebuilt when the model changes: a layer
    pruned, replaced or frozen.

    ``collector(data, return_grad=True)`` returns what ``fisher_diag(model, data,
    ..., return_grad=True)`` would, with the same arguments split between the
    constructor (what defines the statistics) and the call (what data to use)::

        collector = FisherCollector(model, fisher="empirical")
        for step in range(steps):
            diag, grad = collector(loader, return_grad=True)
            ...  # prune, fine-tune
    """

    def __init__(self, model: nn.Module, loss_fn=None, *, fisher: str = "empirical", mc_samples: int = 1,
                 modules=None, bn: str = "raise", strict: bool = False, seed: int = 0):
        _check_fisher(fisher, mc_samples)
        validate.module(model)
        if bn not in ("raise", "eval"):
            raise ValueError(f"bn must be 'raise' or 'eval', got {bn!r}")
        self.model, self.fisher, self.mc_samples, self.modules, self.bn, self.strict = \
            model, fisher, mc_samples, modules, bn, strict
        self.seed = validate.integer(seed, "seed")
        self.loss_fn = loss_fn
        self._fn, self._loss_name = resolve_loss(loss_fn)
        self._structure = None
        self._base = None
        self._verified: dict[tuple, object] = {}  # input layout -> the plan verified on it

    def _refresh(self) -> None:
        """Re-plans if the model changed since the last call (once per call, not per batch)."""
        structure = _structure(self.model)
        if structure != self._structure:
            self._base = plan_stats(self.model, self.modules, self.strict)
            self._structure, self._verified = structure, {}

    def _plan_for(self, x, y):
        """The plan for this batch, verified once per input layout."""
        sig = input_signature(self._base, x)
        plan = self._verified.get(sig)
        if plan is None:
            plan = self._base.copy()
            verify_plan(self.model, plan, x, y, self._fn, self.strict)
            if plan.verified or not plan.native:
                self._verified[sig] = plan
        return plan

    @timed("stats")
    def __call__(self, data, *, return_grad: bool = False, max_samples: int | None = None, progress: bool = True,
                 process_group=None, max_memory: int | None = None):
        """The statistics of ``data`` (see :func:`fisher_diag` for every argument)."""
        validate.batches(data)
        max_samples = validate.optional_integer(max_samples, "max_samples", 1)
        validate.optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
        model, fisher = self.model, self.fisher
        device = model_device(model)
        gen = torch.Generator(device=device).manual_seed(self.seed) if fisher == "mc" else None
        sq_sums: dict[str, torch.Tensor] = {}
        grad_sums: dict[str, torch.Tensor] = {}
        bounds: dict[str, torch.Tensor | None] = {}  # per key: finite exactly when its sq sum is
        count, plan, scale = 0, None, None
        self._refresh()

        def add(store, key, value):
            # In place: every sum is a fresh buffer of the ops, and a new 1 MB tensor per batch
            # and key costs page faults (4 batches of LeNet-300-100 took 1.95x a step, not 1.7x).
            store[key] = value if key not in store else store[key].add_(value)

        with batchnorm_eval(model, self.bn):
            batches = iterate_batches(data, device, max_samples)
            # Not even a disabled bar when progress=False: constructing one costs ~15 us a call.
            for x, y in tqdm(batches, desc="fisher") if progress else batches:
                n = num_samples(x, y)
                if n == 0:
                    continue
                plan = self._plan_for(x, y)
                _check_fallback_memory(plan, n, max_memory)
                dtype = next((p.dtype for p in plan.params.values() if p.is_floating_point()), torch.float32)

                def make_passes(outputs):
                    tag = "both" if return_grad and fisher == "empirical" else "fisher"
                    yield from ((t, w, tag) for t, w in fisher_passes(fisher, self._loss_name, outputs, y,
                                                                      self.mc_samples, gen, n, dtype))
                    if return_grad and fisher != "empirical":  # the gradient at the true labels
                        yield y, None, "grad"

                # Every sum is scaled by 1 / (the first batch's size) inside the ops, so a
                # single batch comes out as the mean with no pass over the results.
                scale = 1.0 / n if scale is None else scale
                for tag, calls, fallback in run_passes(model, plan, x, self._fn, make_passes, n):
                    for key, (g, q, bound) in _pass_sums(plan, calls, fallback, scale):
                        if tag != "grad":
                            add(sq_sums, key, q)
                            # A sum of bounds bounds the sum; one key without a bound is checked whole.
                            bounds[key] = None if bound is None or bounds.get(key, 0) is None else \
                                bound + bounds.get(key, 0)
                        if tag != "fisher":
                            add(grad_sums, key, g)
                count += n
        if plan is None:  # no sample on this rank: the keys still come from the plan
            plan = self._base
        scale = 1.0 if scale is None else scale
        group = resolve_group(process_group)
        if group is not None:
            # The ranks' first batches differ in size, so their sums are in different units:
            # back to plain sums before adding them up. Each rank's bounds cover only its own
            # sums, so every rank checks the reduced sums themselves (and all raise alike).
            if scale != 1.0:
                torch._foreach_mul_(list(sq_sums.values()) + list(grad_sums.values()), 1.0 / scale)
                scale = 1.0
            bounds = {}
            # Every rank reduces the same tensors in the same order, used or not.
            for store, needed in ((sq_sums, True), (grad_sums, return_grad)):
                for k in plan.keys if needed else ():
                    if k not in store:
                        p = plan.params[k]
                        store[k] = torch.zeros(p.shape, dtype=_ops.acc_dtype(p.dtype), device=p.device)
            total = torch.tensor([float(count)], dtype=torch.float64, device=device)
            all_reduce_sum([sq_sums[k] for k in plan.keys] + ([grad_sums[k] for k in plan.keys] if return_grad
                                                               else []) + [total], group)
            count = int(total.item())
        if count == 0:
            raise ValueError("data yielded no samples")
        # A non-finite g_n makes its square non-finite too, so the squares cover the gradients
        # of the same passes; a separate gradient pass (tag "grad") is checked on its own.
        check_finite([(k, q if bounds.get(k) is None else bounds[k]) for k, q in sq_sums.items()]
                     + ([] if fisher == "empirical" else list(grad_sums.items())),
                     "non-finite per-sample gradients", _NONFINITE_HINT, exact=False)
        factor = 1.0 / (count * scale)  # 1 for one batch (sums are in scale units)
        diag = _finish(sq_sums, factor, plan)
        if not return_grad:
            return diag
        return diag, _finish(grad_sums, factor, plan)


def fisher_diag(model: nn.Module, data, loss_fn=None, *, fisher: str = "empirical", mc_samples: int = 1,
                modules=None, max_samples: int | None = None, return_grad: bool = False, bn: str = "raise",
                strict: bool = False, seed: int = 0, progress: bool = True, process_group=None,
                max_memory: int | None = None):
    """Diagonal of the Fisher, (1/N) sum_n g_n**2, over the per-sample gradients g_n.

    One forward and one backward per batch (per Fisher pass) suffice: forward hooks
    capture each layer's input, the backward captures its output gradient, and the
    C++/CUDA ops reduce per-sample products without storing per-sample gradients.
    Exact formulas cover Linear (any number of sequence dims), Conv1d/Conv2d (any
    stride, padding, dilation, groups), their biases, LayerNorm, BatchNorm (eval) and
    Embedding; other parameters use torch.func per-sample gradients (with a warning;
    ``strict=True`` raises instead). Calling it repeatedly on one model (every step
    of an iterative pruner)? A :class:`FisherCollector` plans once and reuses it.

    Args:
        model: the model; BatchNorm must be in eval mode (or pass ``bn="eval"``).
        data: iterable of ``(inputs, targets)`` batches, e.g. a DataLoader.
        loss_fn: per-sample loss ``loss_fn(outputs, targets) -> (N,)`` or one of
            ``"cross_entropy"`` (default), ``"nll"``, ``"mse"``.
        fisher: ``"empirical"`` (true labels), ``"mc"`` (``mc_samples`` labels drawn
            from the model's predictive per input) or ``"true"`` (exact expectation
            over classes: the GGN diagonal; one backward per class).
        modules: restrict to the parameters of these modules (names and/or types).
        max_samples: stop after this many samples.
        return_grad: also return the mean gradient of the loss at the true labels.
        seed: seeds the label draws of ``fisher="mc"``.
        progress: show a progress bar over batches.
        process_group: with torch.distributed, each rank passes its share of the
            data and every rank gets the statistics of the union (sums are
            all-reduced). Default: the default group when initialised.
            ``max_samples`` then applies per rank.
        max_memory: bytes the torch.func fallback may use for one batch's per-sample
            gradients (the exact ops need only fixed-size tiles); default half the
            free memory. Checked before each batch, so an oversized one raises
            instead of dying in the allocator.

    Returns:
        ``{name: diag}`` keyed like ``named_parameters()`` (``_orig`` dropped), each the
        parameter's shape, in float32 (float64 for float64 models); with
        ``return_grad``, ``(diag, grad)``. Entries of pruned weights are zero.
    """
    collector = FisherCollector(model, loss_fn, fisher=fisher, mc_samples=mc_samples, modules=modules, bn=bn,
                                strict=strict, seed=seed)
    return collector(data, return_grad=return_grad, max_samples=max_samples, progress=progress,
                     process_group=process_group, max_memory=max_memory)


def _check_fallback_memory(plan, batch: int, max_memory: int | None) -> None:
    """torch.func materialises (batch, numel) per-sample gradients of every fallback
    parameter, about twice over while vmap runs."""
    if not plan.fallback:
        return
    params = [plan.params[k] for k in plan.fallback]
    need = 2 * batch * sum(p.numel() * p.element_size() for p in params)
    check_budget(need, max_memory, params[0].device,
                  f"the torch.func fallback for {sorted(plan.fallback)} on a batch of {batch}",
                  "use smaller batches, or leave these parameters out with modules=")


def _pass_sums(plan, calls, fallback, scale: float):
    """(key, (sum of g_n, sum of g_n**2, bound or None)) times ``scale`` for every
    covered parameter in one pass (see PerSampleFormula.sums)."""
    for name, (formula, names) in plan.native.items():
        if name in calls:
            for local, sums in formula.sums(calls[name], names, scale).items():
                yield (f"{name}.{local}" if name else local), sums
    for key, ps in fallback.items():
        g, q = _ops.sum_sq(ps)
        yield key, (g.mul_(scale), q.mul_(scale), None)


def _finish(sums: dict[str, torch.Tensor], factor: float, plan) -> dict[str, torch.Tensor]:
    """The sums times ``factor`` (the means) for every covered key, zero where pruned;
    unused parameters get zeros."""
    # The sums are this call's own buffers, so scale in place, all in one foreach call.
    present = list(sums.values())
    if present and factor != 1.0:
        torch._foreach_mul_(present, factor)
    out = {}
    for key in plan.keys:
        param = plan.params[key]
        acc = _ops.acc_dtype(param.dtype)
        value = sums.get(key)
        value = torch.zeros(param.shape, dtype=acc, device=param.device) if value is None else value
        mask = plan.masks.get(key)
        out[key] = value if mask is None else value.mul_(mask)
    return out
