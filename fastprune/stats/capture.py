"""One forward, then one backward per Fisher pass, capturing what the statistics need.

Forward hooks record each adapted module's input and its output's gradient edge; the
backward is ``torch.autograd.grad`` with respect to those edges only, so autograd never
computes the weight gradients of a plain step (the statistics ops do, from the
captured tensors). Parameters without an exact formula get per-sample gradients
from ``torch.func`` (vmap over grad), with a one-time warning.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vmap

from ..batches import call, call_args, has_packed, leaves, num_samples, take, with_sample_dim
from .losses import per_sample_loss
from .plan import StatsPlan

__all__ = ["captured_forward", "CapturedOutput", "output_grads", "fallback_per_sample", "run_passes"]

_loop_warned: set[tuple[str, ...]] = set()


class CapturedOutput:
    """A captured call's output as the backward needs it: its gradient edge (the node
    that produced it) and its metadata, not the tensor. The edge's gradient is the
    layer's own output gradient even when the output is later written in place
    (``ReLU(inplace=True)``, ``out += identity``, a loss's ``out.mul_(0.5)``): autograd
    rebases the tensor, not the node. Not holding the tensor also lets the backward
    free it as a plain step would (28 MB of activations on the benchmark CNN)."""

    __slots__ = ("edge", "shape", "dtype", "device")

    def __init__(self, out: torch.Tensor):
        self.edge = get_gradient_edge(out)
        self.shape, self.dtype, self.device = out.shape, out.dtype, out.device

    def dim(self) -> int:
        return len(self.shape)

    def zeros(self) -> torch.Tensor:
        """The gradient of an output the loss does not reach."""
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class captured_forward:
    """Context manager: while active, adapted modules record (input, CapturedOutput)
    per call, in ``calls[module name]``."""

    def __init__(self, plan: StatsPlan):
        self.plan = plan
        self.calls: dict[str, list[tuple]] = defaultdict(list)

    def __enter__(self):
        formulas = {name: formula for name, (formula, _) in self.plan.native.items()}

        def hook_for(name):
            capture = formulas[name].capture

            def hook(module, args, kwargs, out):
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    self.calls[name].append((capture(args, kwargs), CapturedOutput(out)))
            return hook

        self.handles = [f.module.register_forward_hook(hook_for(n), with_kwargs=True) for n, f in formulas.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def output_grads(total: torch.Tensor, calls: dict[str, list[tuple]], sample_dims: dict[str, int] | None = None,
                 retain_graph: bool = True) -> dict[str, list]:
    """d total / d output of every captured call, as {module: [(input, output_grad), ...]},
    the samples moved to dim 0 for the modules of ``sample_dims`` (a (T, N, ...) layer).
    ``retain_graph=False`` for the last backward through the graph frees its saved
    tensors as it goes."""
    sample_dims = sample_dims or {}
    flat = [(name, i) for name, cs in calls.items() for i in range(len(cs))]
    grads = torch.autograd.grad(total, [calls[n][i][1].edge for n, i in flat], retain_graph=retain_graph,
                                allow_unused=True)
    out: dict[str, list] = defaultdict(list)
    for (name, i), g in zip(flat, grads):
        inp, o = calls[name][i]
        g = o.zeros() if g is None else g
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
    gradients). The graph is kept for every pass but the last."""
    with captured_forward(plan) as cap:
        outputs = call(model, inputs)
    passes = list(make_passes(outputs))
    returned = [(o, o._version) for o in leaves(outputs)] if len(passes) > 1 else []
    for i, (t, w, tag) in enumerate(passes):
        losses = per_sample_loss(loss_fn, outputs, t, n)
        if any(o._version != v for o, v in returned):  # the next pass would see the written values
            raise RuntimeError("the loss function modified the model's output in place, and this Fisher takes "
                               f"{len(passes)} passes over the same output; compute the loss out of place "
                               "(e.g. out * 0.5, not out.mul_(0.5))")
        total = losses.sum() if w is None else (losses * w).sum()
        last = i == len(passes) - 1
        calls = output_grads(total, cap.calls, plan.sample_dims, retain_graph=not last) if cap.calls else {}
        yield tag, calls, fallback_per_sample(model, plan, inputs, t, w, loss_fn)
