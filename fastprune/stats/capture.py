"""One forward, then one backward per Fisher pass, capturing what the statistics need.

Forward hooks record each adapted module's input and output; the backward is
``torch.autograd.grad`` with respect to those outputs only, so autograd never
computes the weight gradients of a plain step (the statistics ops do, from the
captured tensors). Parameters without an exact formula get per-sample gradients
from ``torch.func`` (vmap over grad), with a one-time warning.
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..batches import call, call_args, has_packed, num_samples, take, with_sample_dim
from .losses import per_sample_loss
from .plan import StatsPlan

__all__ = ["captured_forward", "capture_forward", "output_grads", "fallback_per_sample", "run_passes"]

_loop_warned: set[tuple[str, ...]] = set()

# Models seen to write a captured output in place (ReLU(inplace=True), `out += identity`):
# their captured outputs are handed on as copies. Others are not copied, which on the
# benchmark CNN saves 28 MB of copies a call and their cache misses.
_writes_in_place: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class captured_forward:
    """Context manager: while active, adapted modules record (input, output) per call.

    An output written in place downstream would be rebased in the graph, so that its
    gradient is no longer the layer's. With ``clone`` (the default), every captured
    output is handed on as a copy. Without it, the output goes on as it is and
    :meth:`written_in_place` tells afterwards whether any of them was modified (its
    version counter moved); the caller then runs the forward again with copies."""

    def __init__(self, plan: StatsPlan, clone: bool = True):
        self.plan, self.clone = plan, clone
        self.calls: dict[str, list[list[torch.Tensor]]] = defaultdict(list)
        self._watched: list[tuple[torch.Tensor, int]] = []

    def __enter__(self):
        formulas = {name: formula for name, (formula, _) in self.plan.native.items()}

        def hook_for(name):
            capture = formulas[name].capture

            def hook(module, args, kwargs, out):
                if not (isinstance(out, torch.Tensor) and out.requires_grad):
                    return None
                self.calls[name].append([capture(args, kwargs), out])
                passed = out.clone() if self.clone else out
                self._watched.append((passed, passed._version))
                return passed if self.clone else None
            return hook

        self.handles = [f.module.register_forward_hook(hook_for(n), with_kwargs=True) for n, f in formulas.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def written_in_place(self) -> bool:
        """Whether a tensor handed downstream was modified in place during the forward."""
        return any(t._version != v for t, v in self._watched)


def capture_forward(model: nn.Module, plan: StatsPlan, inputs):
    """One forward capturing every adapted module's calls: (captured_forward, outputs).
    Outputs are copied only for models that write them in place (learnt per model: the
    first forward copies and checks whether the copies were written)."""
    known = _writes_in_place.get(model)
    with captured_forward(plan, clone=known is not False) as cap:
        outputs = call(model, inputs)
    written = cap.written_in_place()
    if known is None or written:
        _writes_in_place[model] = written
    if written and not cap.clone:  # the graph was rebased: run again with copies
        with captured_forward(plan) as cap:
            outputs = call(model, inputs)
    return cap, outputs


def output_grads(total: torch.Tensor, calls: dict[str, list[list[torch.Tensor]]],
                 sample_dims: dict[str, int] | None = None) -> dict[str, list]:
    """d total / d output of every captured call, as {module: [(input, output_grad), ...]},
    the samples moved to dim 0 for the modules of ``sample_dims`` (a (T, N, ...) layer)."""
    sample_dims = sample_dims or {}
    flat = [(name, i) for name, cs in calls.items() for i in range(len(cs))]
    grads = torch.autograd.grad(total, [calls[n][i][1] for n, i in flat], retain_graph=True, allow_unused=True)
    out: dict[str, list] = defaultdict(list)
    for (name, i), g in zip(flat, grads):
        inp, o = calls[name][i]
        g = torch.zeros_like(o) if g is None else g
        d = sample_dims.get(name)
        out[name].append((inp, g) if d is None else (inp.movedim(d, 0), g.movedim(d, 0)))
    return out


def fallback_per_sample(model: nn.Module, plan: StatsPlan, inputs: torch.Tensor, targets, weight: torch.Tensor,
                        loss_fn) -> dict[str, torch.Tensor]:
    """Per-sample gradients (N, *shape) of the fallback parameters via torch.func, or by
    one backward per sample where vmap cannot run the model (recurrent layers)."""
    if not plan.fallback:
        return {}
    if weight is None:  # every sample weighted 1
        p = next(iter(plan.params[k] for k in plan.fallback))
        weight = torch.ones(num_samples(inputs, targets), dtype=p.dtype, device=p.device)
    # A tied Parameter is passed under one of its names only: functional_call ties the rest.
    fb = {actual: plan.params[key].detach() for key, actual in plan.fallback.items()}
    ids = {id(plan.params[key]) for key in plan.fallback}
    state = {k: v.detach() for k, v in model.named_parameters() if id(v) not in ids} | dict(model.named_buffers())

    def loss_one(params, x, t, w):
        args, kwargs = call_args(with_sample_dim(x))
        out = functional_call(model, state | params, args, kwargs)
        return (loss_fn(out, with_sample_dim(t)) * w).sum()

    if has_packed(inputs):  # vmap would split a PackedSequence's fields, not its sequences
        return _result(plan, _per_sample_loop(model, plan, inputs, targets, weight, loss_fn,
                                              TypeError("a PackedSequence input")))
    try:
        ps = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")(fb, inputs, targets, weight)
    except (RuntimeError, NotImplementedError) as exc:
        ps = _per_sample_loop(model, plan, inputs, targets, weight, loss_fn, exc)
    return _result(plan, ps)


def _result(plan: StatsPlan, ps: dict) -> dict[str, torch.Tensor]:
    """The fallback's gradients keyed like the plan."""
    return {key: ps[actual] for key, actual in plan.fallback.items()}


def _per_sample_loop(model, plan, inputs, targets, weight, loss_fn, why: Exception) -> dict[str, torch.Tensor]:
    """The fallback's gradients from one forward and backward per sample."""
    what = sorted(plan.fallback)
    if tuple(what) not in _loop_warned:
        _loop_warned.add(tuple(what))
        warnings.warn(f"fastprune: torch.func.vmap cannot run this model ({type(why).__name__}: {str(why)[:120]}); "
                      f"per-sample gradients of {what} come from one backward per sample (slow)", stacklevel=4)
    params = [plan.params[k] for k in plan.fallback]
    rows = []
    for n in range(num_samples(inputs, targets)):
        loss = (loss_fn(call(model, take(inputs, n, n + 1)), take(targets, n, n + 1)) * weight[n]).sum()
        rows.append([g.detach() for g in torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)])
    return {actual: torch.stack([r[i] for r in rows]) for i, actual in enumerate(plan.fallback.values())}


def run_passes(model, plan, inputs, loss_fn, make_passes, n: int):
    """Forward once; ``make_passes(outputs)`` yields (targets, sqrt_weight or None, tag) and, for
    each, this yields (tag, captured calls with output gradients, fallback per-sample
    gradients). A loss that writes a captured output in place (uncopied: see
    capture_forward) is caught before its gradients are taken, and the batch starts over
    with copies."""
    cap, outputs = capture_forward(model, plan, inputs)
    for i, (t, w, tag) in enumerate(make_passes(outputs)):
        losses = per_sample_loss(loss_fn, outputs, t, n)
        if not cap.clone and cap.written_in_place():  # the loss wrote a captured output in place
            _writes_in_place[model] = True
            if i:  # earlier passes already saw the written values: nothing to redo them from
                raise RuntimeError("the loss function modified the model's output in place after the first "
                                   "Fisher pass; compute the loss out of place (e.g. out * 0.5, not out.mul_(0.5))")
            yield from run_passes(model, plan, inputs, loss_fn, make_passes, n)
            return
        total = losses.sum() if w is None else (losses * w).sum()
        calls = output_grads(total, cap.calls, plan.sample_dims) if cap.calls else {}
        yield tag, calls, fallback_per_sample(model, plan, inputs, t, w, loss_fn)
