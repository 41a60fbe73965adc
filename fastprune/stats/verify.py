"""Checks each exact per-sample formula against autograd before trusting it.

The formulas take dim 0 of a layer's input as the sample dim and assume the layer's
own forward produced its output. A layer fed ``(T, N, ...)`` (``batch_first=False``
attention blocks), a layer whose weight its parent reads directly
(``nn.MultiheadAttention.out_proj``) or one whose samples mix would get wrong
statistics with nothing to show for it. So on the first samples of the first batch,
one autograd backward per sample finds where each layer's samples are (the dim
along which sample n's loss reaches index n alone): dim 0, another dim (a (T, N, ...)
layer, whose formula then runs on its samples moved to dim 0), or none (merged with
other positions, or mixed). Then the formulas' sums of g_n and g_n**2 are compared
with autograd's; a module without a sample dim or that disagrees moves to the
torch.func fallback, with a warning that names it. The verdict is cached per model,
input shape and plan, so repeated calls pay for the probe once.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import _ops
from ..batches import call, leaves, num_samples, splittable, take
from .capture import captured_forward, output_grads
from .losses import per_sample_loss
from .plan import StatsPlan, fallback

__all__ = ["verify_plan", "input_signature"]

# Samples of the probe: two, so that a layer mixing or mislaying samples shows.
PROBE_SAMPLES = 2
_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tolerance(dtype: torch.dtype) -> float:
    # Wrong layouts are off by tens of percent; 16-bit autograd rounds at ~1e-3.
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def input_signature(plan: StatsPlan, inputs) -> tuple:
    """What a verdict depends on: the inputs' layout and the plan's modules."""
    # Unsplittable inputs change shape from batch to batch: their dtypes alone key the verdict.
    layout = tuple((tuple(t.shape[1:]) if splittable(inputs) else (), str(t.dtype)) for t in leaves(inputs))
    return layout, tuple((name, id(f.module), tuple(sorted(keys))) for name, (f, keys) in plan.native.items())


def _probe(model: nn.Module, plan: StatsPlan, inputs, targets, loss_fn) -> tuple[dict[str, str], dict[str, int]] | None:
    """({module name: why its formulas disagree with autograd}, {module name: the dim of
    its samples, where not 0}) on the first samples, or None when those samples give no
    verdict (non-finite values: the pass that follows reports them)."""
    n = num_samples(inputs, targets)
    if splittable(inputs):
        k = min(PROBE_SAMPLES, n)
        x, y = take(inputs, 0, k), take(targets, 0, k)
    else:  # EmbeddingBag's (ids, offsets): the whole batch is the probe (once per model and dtypes)
        k, x, y = n, inputs, targets
    with captured_forward(plan) as cap:
        losses = per_sample_loss(loss_fn, call(model, x), y, k)
    if not bool(losses.detach().isfinite().all()):
        return None
    calls = output_grads(losses.sum(), cap.calls) if cap.calls else {}
    keys = {name: [(local, f"{name}.{local}" if name else local) for local in sorted(locals_)]
            for name, (_, locals_) in plan.native.items()}
    params = [plan.params[key] for entries in keys.values() for _, key in entries]
    outputs = [(name, out) for name, captured in cap.calls.items() for _, out in captured]
    ref_g = [0.0] * len(params)
    ref_q = [0.0] * len(params)
    bad: dict[str, str] = {}
    # Where each module's samples are: for every call and sample n, the dims of size k
    # along which sample n's loss reaches index n alone.
    dims: dict[str, set[int]] = {}
    for n in range(k):
        grads = torch.autograd.grad(losses[n], params + [out.edge for _, out in outputs], retain_graph=True,
                                    allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(params, grads[: len(params)])] + \
            [out.zeros() if g is None else g for (_, out), g in zip(outputs, grads[len(params):])]
        if not all(bool(g.isfinite().all()) for g in grads):
            return None
        for i, g in enumerate(grads[: len(params)]):
            g = g.detach().to(_ops.acc_dtype(g.dtype))
            ref_g[i], ref_q[i] = ref_g[i] + g, ref_q[i] + g * g
        for (name, out), g in zip(outputs, grads[len(params):]):
            here = {d for d in range(g.dim()) if g.shape[d] == k and not bool(g.narrow(d, 0, n).any())
                    and not bool(g.narrow(d, n + 1, k - n - 1).any())}
            dims[name] = here if name not in dims else dims[name] & here
    bad: dict[str, str] = {}
    for name, (formula, _) in plan.native.items():
        found = sorted(dims.get(name, {0}))
        features = formula.feature_dims
        if found and found[0] == 0:
            continue
        movable = [d for d in found if features is not None and d < cap.calls[name][0][1].dim() - features]
        if movable:  # a (T, N, ...) layer: the formula runs on its samples moved to dim 0
            plan.sample_dims[name] = movable[0]
            continue
        bad[name] = ("its exact per-sample formula cannot apply: no dim of its output holds the samples alone "
                     "(they mix, or are merged with other positions)")
    if plan.sample_dims:
        calls = output_grads(losses.sum(), cap.calls, plan.sample_dims)
    i = 0
    for name, (formula, locals_) in plan.native.items():
        sums = formula.sums(calls[name], set(locals_)) if name in calls and name not in bad else {}
        for local, key in keys[name]:
            g, q, _ = sums.get(local, (torch.zeros_like(ref_g[i]), torch.zeros_like(ref_q[i]), None))
            mask = plan.masks.get(key)
            if mask is not None:  # the formulas give gradients of the masked weight, autograd of weight_orig
                g, q = g * mask, q * mask
            scale = float(ref_q[i].sum().sqrt())
            err_g = float((g.reshape(ref_g[i].shape) - ref_g[i]).norm())
            err_q = float((q.reshape(ref_q[i].shape) - ref_q[i]).abs().sum())
            tol = _tolerance(plan.params[key].dtype)
            if err_g > tol * scale + 1e-30 or err_q > tol * scale * scale + 1e-30:
                why = "no call of its own forward was seen: its parent reads its weight directly" \
                    if name not in calls else "its samples mix"
                bad.setdefault(name, f"its exact per-sample formula disagrees with autograd ({why})")
            i += 1
    return bad, {name: d for name, d in plan.sample_dims.items() if name not in bad}


def verify_plan(model: nn.Module, plan: StatsPlan, inputs, targets, loss_fn, strict: bool = False) -> None:
    """Moves every module whose formulas disagree with autograd on the first samples of
    ``inputs`` to the torch.func fallback (``strict=True`` raises instead). Runs the
    probe once per model, input shape and plan; later calls reuse the verdict."""
    if not plan.native or plan.verified:
        return
    verdicts = _verdicts.setdefault(model, {})
    sig = input_signature(plan, inputs)
    verdict = verdicts.get(sig)
    if verdict is None:
        verdict = _probe(model, plan, inputs, targets, loss_fn)
        if verdict is None:
            plan.sample_dims.clear()
            return  # no verdict from these samples: the next batch tries again
        verdicts[sig] = verdict
    bad, plan.sample_dims = verdict[0], dict(verdict[1])
    for name, why in bad.items():
        formula, locals_ = plan.native.pop(name)
        for local in sorted(locals_):
            key = f"{name}.{local}" if name else local
            actual = key if key not in plan.masks else f"{key}_orig"
            fallback(plan, key, actual, f"{type(formula.module).__name__} {name!r} ({local})", why, strict)
    plan.verified = True
