"""Optimizers that keep pruned weights, and their optimizer state, exactly zero.

Training a pruned model with ``torch.optim`` and then re-applying the masks reads
and writes every tensor once per elementary op of the update. :class:`MaskedSGD`,
:class:`MaskedAdam` and :class:`MaskedAdamW` are drop-in subclasses of torch's
optimizers (same arguments, same ``state_dict``) whose step is one fused pass per
tensor (C++/CUDA op): surviving weights get exactly torch's single-tensor update,
bit for bit on CPU, and pruned weights and their state are set to 0.

Masks come from ``masks=[...]`` (aligned with the parameters, ``None`` for
unpruned ones) or from a model: pass the model itself as ``params`` or as
``masks=model``, and every parameter pruned through ``torch.nn.utils.prune`` or
:func:`fastprune.prune` (``weight_orig`` / ``weight_mask``) is masked with its
current mask at every step, including masks created after the optimizer.

:func:`masked` wraps any other optimizer: it runs the optimizer's own step, then
zeroes pruned weights and the matching entries of their state tensors (slower:
several extra passes).

Example::

    opt = fastprune.optim.MaskedSGD(model, lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype

from .. import _ops
from ..masks import check_binary, get_mask, pruned_names

__all__ = ["MaskedSGD", "MaskedAdam", "MaskedAdamW", "masked"]


class _Masks:
    """Finds the current mask of each parameter: from an aligned list, or from the
    ``<name>_mask`` buffers of a model's pruned parameters (looked up at each step,
    so masks applied after the optimizer was built are seen)."""

    def __init__(self, params: list[torch.Tensor], masks):
        self.model = masks if isinstance(masks, nn.Module) else None
        self.fixed: dict[int, torch.Tensor] = {}
        if masks is None or self.model is not None:
            return
        if not isinstance(masks, Sequence) or len(masks) != len(params):
            got = len(masks) if isinstance(masks, Sequence) else type(masks).__name__
            raise ValueError(f"masks must be a model or a list with one entry (a mask or None) per parameter: "
                             f"{len(params)} parameters, got {got}")
        for i, (p, m) in enumerate(zip(params, masks)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor) or m.shape != p.shape:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"masks[{i}] has shape {shape}, but parameter {i} has shape {tuple(p.shape)}")
            check_binary(f"masks[{i}]", m)
            self.fixed[id(p)] = m

    def lookup(self) -> dict[int, torch.Tensor]:
        """{id(param): bool mask on the parameter's device} for this step."""
        found = dict(self.fixed)
        if self.model is not None:
            for module in self.model.modules():
                for name in pruned_names(module):
                    found[id(module._parameters[name + "_orig"])] = get_mask(module, name)
        return {k: m if m.dtype == torch.bool and m.is_contiguous() else m.bool().contiguous()
                for k, m in found.items()}


def _split_params(params, masks):
    """(parameters for torch's optimizer, mask source): a model passed as ``params``
    also provides the masks."""
    if isinstance(params, nn.Module):
        if masks is not None:
            raise ValueError("pass either a model as params (its masks are used) or masks=, not both")
        return params.parameters(), params
    return params, masks


def _all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _reject(optimizer: torch.optim.Optimizer, flags: tuple[str, ...]) -> None:
    for flag in flags:
        if any(group.get(flag) for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} does not support {flag}=True; use the torch optimizer "
                             f"wrapped with fastprune.optim.masked(...) instead")


def _fusable(p: torch.Tensor, state: list[torch.Tensor | None], mask: torch.Tensor | None) -> bool:
    """Whether the fused op takes these tensors (float32/float64, dense, contiguous);
    the mask is already a contiguous bool tensor (see _Masks.lookup)."""
    return p.dtype in (torch.float32, torch.float64) and not p.grad.is_sparse and \
        (mask is None or mask.device == p.device) and \
        all(t is None or (t.is_contiguous() and t.dtype == p.dtype) for t in (p, p.grad, *state))


def _float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class _MaskedStep:
    """The step loop shared by the masked optimizers; subclasses define ``_update``."""

    _unsupported: tuple[str, ...] = ("differentiable",)

    def _setup(self, masks) -> None:
        _reject(self, self._unsupported)
        self._masks = _Masks(_all_params(self), masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._masks.lookup()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.state[p], masks.get(id(p)))
        return loss


class MaskedSGD(_MaskedStep, torch.optim.SGD):
    """:class:`torch.optim.SGD` (momentum, dampening, Nesterov, weight decay,
    maximize) whose step keeps pruned weights and momentum buffers at zero.

    Args:
        params: parameters or parameter groups, or a model (its pruned parameters
            are then masked automatically).
        masks: a model, or one mask (bool, True = keep) or None per parameter, in
            the order of the parameter groups.
        Every other argument is :class:`torch.optim.SGD`'s; ``foreach`` and ``fused``
        are accepted for compatibility, the fused masked kernel is used regardless.
    """

    def __init__(self, params, *args, masks=None, **kwargs):
        params, masks = _split_params(params, masks)
        torch.optim.SGD.__init__(self, params, *args, **kwargs)
        self._setup(masks)

    def _update(self, p, group, state, mask):
        momentum = _float(group["momentum"])
        buf = state.get("momentum_buffer")
        first = buf is None
        if momentum != 0 and first:
            buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        args = dict(lr=_float(group["lr"]), momentum=momentum, dampening=_float(group["dampening"]),
                    weight_decay=_float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"])
        if _fusable(p, [buf if momentum != 0 else None], mask):
            _ops.masked_sgd_(p, p.grad, buf if momentum != 0 else None, mask, first_step=first, **args)
        else:
            _sgd_unfused(p, state, mask, first, **args)


def _sgd_unfused(p, state, mask, first, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's single-tensor rule, then the mask (dtypes and layouts the op does not take)."""
    g = -p.grad if maximize else p.grad
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = state["momentum_buffer"]
        if first:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
        if mask is not None:
            buf.masked_fill_(~mask, 0)
    p.add_(g, alpha=-lr)
    if mask is not None:
        p.masked_fill_(~mask, 0)


class _MaskedAdamStep(_MaskedStep):
    """The update shared by :class:`MaskedAdam` and :class:`MaskedAdamW`."""

    _unsupported = ("amsgrad", "capturable", "differentiable")

    def _update(self, p, group, state, mask):
        if not state:  # the same state torch creates, so state_dicts interchange
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = (_float(b) for b in group["betas"])
        args = dict(lr=_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=int(state["step"].item()),
                    decoupled=group.get("decoupled_weight_decay", False), maximize=group["maximize"])
        if _fusable(p, [state["exp_avg"], state["exp_avg_sq"]], mask):
            _ops.masked_adam_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], mask, **args)
        else:
            _adam_unfused(p, state["exp_avg"], state["exp_avg_sq"], mask, **args)


def _adam_unfused(p, exp_avg, exp_avg_sq, mask, *, lr, beta1, beta2, eps, weight_decay, step, decoupled, maximize):
    """torch.optim.Adam's single-tensor rule, then the mask."""
    g = -p.grad if maximize else p.grad
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
    if mask is not None:
        # Filled, not multiplied: in float16 eps underflows, so a pruned entry's update is
        # 0/0 = NaN, and NaN * 0 stays NaN.
        for t in (p, exp_avg, exp_avg_sq):
            t.masked_fill_(~mask, 0)


class MaskedAdam(_MaskedAdamStep, torch.optim.Adam):
    """:class:`torch.optim.Adam` (including ``decoupled_weight_decay``) whose step
    keeps pruned weights and both moments at zero. ``params`` and ``masks`` as in
    :class:`MaskedSGD`; ``amsgrad``, ``capturable`` and ``differentiable`` are not
    supported (wrap ``torch.optim.Adam`` with :func:`masked` for those)."""

    def __init__(self, params, *args, masks=None, **kwargs):
        params, masks = _split_params(params, masks)
        torch.optim.Adam.__init__(self, params, *args, **kwargs)
        self._setup(masks)


class MaskedAdamW(_MaskedAdamStep, torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose step keeps pruned weights and both moments
    at zero; see :class:`MaskedAdam`."""

    def __init__(self, params, *args, masks=None, **kwargs):
        params, masks = _split_params(params, masks)
        torch.optim.AdamW.__init__(self, params, *args, **kwargs)
        self._setup(masks)


class masked:
    """Wraps any optimizer so pruned weights and their state stay zero: after the
    wrapped ``step()``, each masked parameter and every state tensor of its shape
    (momentum, moments...) are multiplied by the mask. Slower than the fused
    optimizers (extra passes over each tensor) but works with any optimizer.
    Everything else (``zero_grad``, ``state_dict``, ``param_groups``) is the
    wrapped optimizer's.

    Args:
        optimizer: a built ``torch.optim.Optimizer``.
        masks: a model, or one mask or None per parameter (as in :class:`MaskedSGD`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, masks):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"masked() wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._masks = _Masks(_all_params(optimizer), masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        masks = self._masks.lookup()
        for p in _all_params(self.optimizer):
            mask = masks.get(id(p))
            if mask is None:
                continue
            p.masked_fill_(~mask, 0)  # not mul_: a NaN update (float16 Adam) times 0 stays NaN
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(~mask, 0)
        return loss

    def __getattr__(self, name):
        if name == "optimizer":  # not set yet (e.g. while unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.optimizer, name)
