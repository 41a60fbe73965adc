"""Pruning at initialisation: SNIP, GraSP and SynFlow.

Each scores the weights of an untrained (or trained) model from gradients with
respect to the *effective* weights, so pruned entries get a dense gradient too.
"""
from __future__ import annotations

import torch
from torch import nn

from ..batches import model_device
from ..masks import pruned_names, refresh_masked
from ..stats.losses import effective_weights, keep_running_stats, mean_batch_losses
from ..validate import integer, real
from .base import Criterion

__all__ = ["SNIP", "GraSP", "SynFlow"]


class SNIP(Criterion):
    """SNIP (Lee et al., 2019): connection sensitivity |g * w| with g the gradient
    of the mean loss over ``num_batches`` batches of ``data``."""

    requires_data = True

    def __init__(self, num_batches: int = 1):
        self.num_batches = integer(num_batches, "num_batches", 1)

    def scores(self, model, params, data=None, loss_fn=None):
        names = list(params)
        grads = [torch.zeros_like(w) for w in params.values()]
        with keep_running_stats(model):
            for loss, weights in mean_batch_losses(model, names, data, loss_fn, self.num_batches):
                for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                    acc += g
        return {n: (g * params[n]).abs() for n, g in zip(names, grads)}


class GraSP(Criterion):
    """GraSP (Wang et al., 2020): S = -w * (H g), H the Hessian and g the gradient of
    the loss on logits divided by ``temperature``; the weights with the largest S
    hurt gradient flow least when removed, so the score returned is w * (H g)
    (lower = pruned first). Hg is one Hessian-vector product (double backward)."""

    requires_data = True

    def __init__(self, temperature: float = 200.0, num_batches: int = 1):
        self.temperature = real(temperature, "temperature", 0, low_open=True)
        self.num_batches = integer(num_batches, "num_batches", 1)

    def scores(self, model, params, data=None, loss_fn=None):
        names = list(params)
        batches = list(_batches_for(data, self.num_batches))
        g = [torch.zeros_like(w) for w in params.values()]
        hg = [torch.zeros_like(w) for w in params.values()]
        with keep_running_stats(model):
            for loss, weights in mean_batch_losses(model, names, batches, loss_fn, self.num_batches,
                                                   self.temperature):
                for acc, gi in zip(g, torch.autograd.grad(loss, weights)):
                    acc += gi
            for loss, weights in mean_batch_losses(model, names, batches, loss_fn, self.num_batches,
                                                   self.temperature):
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                dot = sum((gi * ci).sum() for gi, ci in zip(grads, g))
                for acc, h in zip(hg, torch.autograd.grad(dot, weights)):
                    acc += h
        return {n: params[n] * h for n, h in zip(names, hg)}


def _batches_for(data, num_batches):
    """The first num_batches batches, kept so two passes see the same data."""
    for i, batch in enumerate(data):
        if i == num_batches:
            return
        yield batch


class SynFlow(Criterion):
    """SynFlow (Tanaka et al., 2020), data-free: with every parameter replaced by its
    absolute value (float64, BatchNorm in eval mode), R = sum of the outputs on an
    all-ones input and the score is |w * dR/dw|. Use it iteratively, as the paper
    does: ``fastprune.prune(model, SynFlow(...), s)`` runs ``default_steps`` (100)
    steps of the exponential schedule unless ``steps=`` says otherwise.

    Args:
        input_shape: shape of one input without the batch dim, e.g. ``(3, 32, 32)``;
            when None it is taken from the first batch of ``data``.
    """

    default_steps = 100

    def __init__(self, input_shape: tuple[int, ...] | None = None):
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        if input_shape is not None and not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise ValueError(f"input_shape must be one sample's shape, e.g. (3, 32, 32), got {input_shape!r}")
        self.input_shape = None if input_shape is None else tuple(input_shape)

    def scores(self, model, params, data=None, loss_fn=None):
        shape = self.input_shape
        if shape is None:
            if data is None:
                raise ValueError("SynFlow needs the input shape: pass SynFlow(input_shape=(...)) or data=...")
            shape = tuple(next(iter(data))[0].shape[1:])
        state = {k: v.clone() for k, v in model.state_dict().items()}
        training = model.training
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        dtypes = [t.dtype for t in tensors]
        try:
            model.eval()
            for t in tensors:  # |w| in float64: products over many layers overflow float32
                t.data = t.data.double().abs() if isinstance(t, nn.Parameter) else t.data.double()
            ones = torch.ones((1, *shape), dtype=torch.float64, device=model_device(model))
            out = model(ones)
            weights = effective_weights(model, list(params))
            grads = torch.autograd.grad(out.sum(), weights)
            return {n: (g * w).detach().abs().to(params[n].dtype) for n, g, w in zip(params, grads, weights)}
        finally:
            for t, dtype in zip(tensors, dtypes):
                t.data = t.data.to(dtype)
            model.load_state_dict(state)
            model.train(training)
            for module in model.modules():  # the hooks' masked weights are still the |w| float64 ones
                for name in pruned_names(module):
                    refresh_masked(module, name)
