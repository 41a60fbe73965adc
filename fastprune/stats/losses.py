"""Per-sample losses and the label draws behind each Fisher kind."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import call, iterate_batches, model_device, num_samples
from ..masks import split_param_name

__all__ = ["resolve_loss", "per_sample_loss", "fisher_passes", "FISHER_KINDS", "effective_weights",
           "mean_batch_losses", "keep_running_stats"]

FISHER_KINDS = ("empirical", "mc", "true")


def _mse(outputs, targets):
    # Mean over non-batch dims, so the mean over samples equals F.mse_loss.
    return F.mse_loss(outputs, targets.to(outputs.dtype), reduction="none").flatten(1).mean(1)


_NAMED: dict[str, Callable] = {
    "cross_entropy": lambda o, t: F.cross_entropy(o, t, reduction="none"),
    "nll": lambda o, t: F.nll_loss(o, t, reduction="none"),
    "mse": _mse,
}


def _tensor_output(fn: Callable, name: str) -> Callable:
    """A named loss, refusing outputs that are not one tensor with a message saying how
    to pass a loss that picks the prediction out of them."""
    def loss(outputs, targets):
        if not isinstance(outputs, torch.Tensor):
            raise ValueError(f"loss_fn={name!r} needs the model to return one tensor; it returned "
                             f"{type(outputs).__name__}. Pass a callable loss_fn(outputs, targets) that picks the "
                             "prediction, e.g. lambda out, y: F.cross_entropy(out['logits'], y, reduction='none') "
                             "or out[0] for a recurrent layer's (output, state)")
        return fn(outputs, targets)
    return loss


def resolve_loss(loss_fn) -> tuple[Callable, str | None]:
    """Returns (callable, name); ``None`` means cross-entropy."""
    if loss_fn is None:
        loss_fn = "cross_entropy"
    if isinstance(loss_fn, str):
        if loss_fn not in _NAMED:
            raise ValueError(f"unknown loss {loss_fn!r}; use one of {sorted(_NAMED)} or a callable "
                             "loss_fn(outputs, targets) returning one loss per sample")
        return _tensor_output(_NAMED[loss_fn], loss_fn), loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a name or a callable, got {type(loss_fn).__name__}")
    return loss_fn, None


def per_sample_loss(loss_fn: Callable, outputs: torch.Tensor, targets, n: int) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, checked to hold one loss per sample."""
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.shape != (n,):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({n},), got {got}. Per-sample statistics need the "
            "unreduced loss: use reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none')) and reduce any "
            "non-batch dims yourself, or pass a name: 'cross_entropy', 'nll' or 'mse'.")
    return loss


def fisher_passes(fisher: str, loss_name: str | None, outputs, targets, mc_samples: int,
                  generator: torch.Generator | None, n: int, dtype: torch.dtype
                  ) -> Iterator[tuple[object, torch.Tensor]]:
    """Yields (targets, sqrt_weight) pairs; the Fisher is the sum over passes of the
    per-sample gradient products, each sample's gradient scaled by sqrt_weight (None:
    every sample weighted 1).

    empirical: the true labels. mc: ``mc_samples`` labels drawn from the model's
    predictive, weight 1/mc_samples each. true: every class c, weight p(c | x),
    the exact expectation (the GGN of softmax cross-entropy). ``outputs`` are passed to
    the loss as the model returns them (a dict or a ModelOutput too); ``n`` samples."""
    if fisher == "empirical":
        yield targets, None  # weight 1 for every sample: nothing to multiply
        return
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"fisher={fisher!r} draws labels from the model's predictive distribution, so the model "
                         f"must return a tensor of logits; it returned {type(outputs).__name__}. Use "
                         "fisher='empirical' or wrap the model to return the logits")
    if loss_name not in ("cross_entropy", "nll"):
        raise ValueError(f"fisher={fisher!r} samples labels from the model's predictive distribution, which "
                         "fastprune knows for loss_fn='cross_entropy' (logits) and 'nll' (log-probabilities); "
                         "use one of them or fisher='empirical'")
    with torch.no_grad():
        logits = outputs.detach().float()
        probs = logits.softmax(1) if loss_name == "cross_entropy" else logits.exp()
    if fisher == "mc":
        weight = torch.full((n,), (1.0 / mc_samples) ** 0.5, dtype=dtype, device=outputs.device)
        for _ in range(mc_samples):
            yield torch.multinomial(probs, 1, generator=generator).squeeze(1), weight
    else:
        for c in range(probs.shape[1]):
            yield torch.full((n,), c, dtype=torch.long, device=outputs.device), probs[:, c].sqrt().to(dtype)


@contextmanager
def keep_running_stats(model: nn.Module):
    """Restores every BatchNorm's running statistics after the block: forwards in train
    mode that only score the weights (SNIP, GraSP) must not train the model."""
    saved = [(m, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    m._buffers[k].copy_(b)


def effective_weights(model: nn.Module, names) -> list[torch.Tensor]:
    """The tensors the last forward used as weights (``orig * mask`` for pruned ones)."""
    return [getattr(*split_param_name(model, n)) for n in names]


def mean_batch_losses(model: nn.Module, names, data, loss_fn, num_batches: int, temperature: float = 1.0):
    """Yields (mean loss over one batch, the weights ``names`` that forward used) for up
    to ``num_batches`` batches of ``data``; gradients w.r.t. those weights are dense, pruned
    entries included (SNIP, GraSP, GraNet's regrowth)."""
    fn, _ = resolve_loss(loss_fn)
    batches = 0
    for x, y in iterate_batches(data, model_device(model), None):
        if batches == num_batches:
            return
        n = num_samples(x, y)
        if n == 0:  # an empty batch has no mean loss
            continue
        out = call(model, x)
        if temperature != 1.0:
            out = out / temperature
        yield per_sample_loss(fn, out, y, n).mean(), effective_weights(model, names)
        batches += 1
    if batches == 0:
        raise ValueError("data yielded no samples")
