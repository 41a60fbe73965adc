"""One forward, then one backward per Fisher pass, capturing what the statistics need.

Forward hooks record each adapted module's input and output; the backward is
``torch.autograd.grad`` with respect to those outputs only, so autograd never
computes the weight gradients of a plain step (the statistics ops do, from the
captured tensors). Parameters without an exact adapter get per-sample gradients
from ``torch.func`` (vmap over grad), with a one-time warning.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .layers import LayerAdapter, adapter_for
from .losses import per_sample_loss

__all__ = ["StatsPlan", "plan_stats", "captured_forward", "output_grads", "fallback_per_sample",
           "check_batchnorm", "iterate_batches", "run_passes"]

_warned: set[str] = set()


@dataclass
class StatsPlan:
    """Which parameters are covered and how: keys are ``named_parameters()`` names with
    torch.nn.utils.prune's ``_orig`` dropped."""

    native: dict[str, tuple[LayerAdapter, set[str]]] = field(default_factory=dict)  # module name -> (adapter, keys)
    fallback: dict[str, str] = field(default_factory=dict)  # key -> actual parameter name
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> keep-mask of pruned tensors
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> trainable parameter

    @property
    def keys(self) -> list[str]:
        return list(self.params)


def _key(module_name: str, local: str) -> str:
    return f"{module_name}.{local}" if module_name else local


def plan_stats(model: nn.Module, modules=None, strict: bool = False, keys: set[str] | None = None,
               grouped_only: bool = False) -> StatsPlan:
    """Decides, for every trainable parameter (of ``modules`` if given, or with a key in
    ``keys``), the exact adapter or the torch.func fallback. ``grouped_only`` accepts
    only adapters that expose per-sample gradient tiles (Linear, Conv1d, Conv2d)."""
    named = dict(model.named_modules())
    if modules is not None:
        if isinstance(modules, (str, type)):
            modules = [modules]
        unknown = [m for m in modules if isinstance(m, str) and m not in named]
        if unknown:
            raise ValueError(f"unknown module name(s) {unknown}; modules with parameters are: "
                             f"{[n for n, m in named.items() if any(True for _ in m.parameters(recurse=False))]}")
        types = tuple(m for m in modules if isinstance(m, type))
        names = {m for m in modules if isinstance(m, str)}
        named = {n: m for n, m in named.items() if n in names or (types and isinstance(m, types))}
    plan = StatsPlan()
    for mod_name, module in named.items():
        adapter = adapter_for(module)
        for actual, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            local = actual[: -len("_orig")] if actual.endswith("_orig") and hasattr(module, actual[:-5] + "_mask") \
                else actual
            key = _key(mod_name, local)
            if keys is not None and key not in keys:
                continue
            plan.params[key] = p
            if local != actual:
                plan.masks[key] = getattr(module, local + "_mask")
            exact = adapter is not None and local in adapter.handles and \
                (not grouped_only or type(adapter).grouped is not LayerAdapter.grouped)
            if exact:
                plan.native.setdefault(mod_name, (adapter, set()))[1].add(local)
            else:
                what = f"{type(module).__name__} {mod_name!r} ({local})"
                if strict:
                    raise ValueError(f"no exact per-sample formula for {what}; pass strict=False to use the "
                                     "torch.func fallback (slower), or exclude it with modules=")
                if what not in _warned:
                    _warned.add(what)
                    warnings.warn(f"fastprune: no exact per-sample formula for {what}; using torch.func "
                                  "per-sample gradients for it (slower)", stacklevel=3)
                plan.fallback[key] = _key(mod_name, actual)
    if not plan.native and not plan.fallback:
        raise ValueError("no trainable parameters to collect statistics for (check modules= and requires_grad)")
    return plan


def check_batchnorm(model: nn.Module, bn: str) -> list[nn.Module]:
    """Raises on train-mode BatchNorm (it mixes samples) unless ``bn="eval"``, in which
    case those modules are returned for the caller to switch to eval and back."""
    if bn not in ("raise", "eval"):
        raise ValueError(f"bn must be 'raise' or 'eval', got {bn!r}")
    training = [(n, m) for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training and bn == "raise":
        raise ValueError(f"BatchNorm {training[0][0]!r} is in train mode: its batch statistics mix the samples, "
                         "so per-sample gradients are undefined. Call model.eval() first, or pass bn='eval' to "
                         "switch BatchNorm to eval mode for the collection and restore it afterwards.")
    return [m for _, m in training]


class captured_forward:
    """Context manager: while active, adapted modules record (input, output) per call."""

    def __init__(self, plan: StatsPlan):
        self.plan = plan
        self.calls: dict[str, list[list[torch.Tensor]]] = defaultdict(list)

    def __enter__(self):
        named = {name: adapter.module for name, (adapter, _) in self.plan.native.items()}

        def hook_for(name):
            def hook(module, args, out):
                if not (isinstance(out, torch.Tensor) and out.requires_grad):
                    return None
                self.calls[name].append([args[0].detach(), out])
                # Hand downstream layers a copy: an in-place op there (ReLU(inplace=True)) would
                # otherwise rebase `out` in the graph and hide its gradient.
                return out.clone()
            return hook

        self.handles = [m.register_forward_hook(hook_for(n)) for n, m in named.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def output_grads(total: torch.Tensor, calls: dict[str, list[list[torch.Tensor]]]) -> dict[str, list]:
    """d total / d output of every captured call, as {module: [(input, output_grad), ...]}."""
    flat = [(name, i) for name, cs in calls.items() for i in range(len(cs))]
    grads = torch.autograd.grad(total, [calls[n][i][1] for n, i in flat], retain_graph=True, allow_unused=True)
    out: dict[str, list] = defaultdict(list)
    for (name, i), g in zip(flat, grads):
        inp, o = calls[name][i]
        out[name].append((inp, torch.zeros_like(o) if g is None else g))
    return out


def fallback_per_sample(model: nn.Module, plan: StatsPlan, inputs: torch.Tensor, targets, weight: torch.Tensor,
                        loss_fn) -> dict[str, torch.Tensor]:
    """Per-sample gradients (N, *shape) of the fallback parameters via torch.func."""
    if not plan.fallback:
        return {}
    state = {k: v.detach() for k, v in model.named_parameters()} | dict(model.named_buffers())
    fb = {actual: state[actual] for actual in plan.fallback.values()}

    def loss_one(params, x, t, w):
        out = functional_call(model, state | params, (x.unsqueeze(0),))
        return (loss_fn(out, t.unsqueeze(0)) * w).sum()

    ps = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")(fb, inputs, targets, weight)
    return {key: ps[actual] for key, actual in plan.fallback.items()}


def iterate_batches(data, device: torch.device, max_samples: int | None):
    """Yields (inputs, targets) moved to ``device``, truncated to ``max_samples`` in total."""
    seen = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data must yield (inputs, targets) batches, e.g. a DataLoader over a TensorDataset")
        x, y = batch
        if max_samples is not None:
            if seen >= max_samples:
                return
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        seen += len(x)
        yield x.to(device), y.to(device) if isinstance(y, torch.Tensor) else y


def run_passes(model, plan, inputs, loss_fn, make_passes):
    """Forward once; ``make_passes(outputs)`` yields (targets, sqrt_weight, tag) and, for
    each, this yields (tag, captured calls with output gradients, fallback per-sample
    gradients)."""
    n = len(inputs)
    with captured_forward(plan) as cap:
        outputs = model(inputs)
    for t, w, tag in make_passes(outputs):
        total = (per_sample_loss(loss_fn, outputs, t, n) * w).sum()
        calls = output_grads(total, cap.calls) if cap.calls else {}
        yield tag, calls, fallback_per_sample(model, plan, inputs, t, w, loss_fn)
