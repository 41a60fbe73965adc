"""Pruning during training: the gradual (cubic) schedule and GraNet prune-and-regrow.

Both are callbacks: build one, then call ``scheduler.step(model, data=...)`` once
per training step (after ``optimizer.step()``); on the steps the schedule names it
prunes, elsewhere it does nothing. Their ``state_dict`` holds the step counter, so
a resumed run (model and masks from the model's ``state_dict``, see
:func:`fastprune.load_pruned_state_dict`) continues on the same schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..criteria.base import Criterion
from ..criteria.magnitude import Magnitude
from ..pruning import Snapshot, prune
from ..stats.losses import mean_batch_losses
from ..targets import find_targets
from ..validate import integer, real

__all__ = ["cubic_sparsity", "Gradual", "GraNet"]


def cubic_sparsity(step: int, init_sparsity: float, final_sparsity: float, start_step: int, end_step: int,
                   degree: int = 3) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^degree,
    s_i before ``start_step`` and s_f from ``end_step`` on."""
    if step >= end_step:
        return final_sparsity
    if step <= start_step:
        return init_sparsity
    frac = (step - start_step) / (end_step - start_step)
    return final_sparsity + (init_sparsity - final_sparsity) * (1.0 - frac) ** degree


class _Schedule:
    """Validation, event steps and checkpointing shared by the schedules."""

    def __init__(self, init_sparsity, final_sparsity, start_step, end_step, frequency, degree):
        init_sparsity = real(init_sparsity, "init_sparsity", 0, 1, high_open=True)
        final_sparsity = real(final_sparsity, "final_sparsity", 0, 1, high_open=True)
        if final_sparsity < init_sparsity:
            raise ValueError(f"final_sparsity ({final_sparsity}) is below init_sparsity ({init_sparsity}); "
                             "gradual pruning only increases sparsity")
        start_step, end_step = integer(start_step, "start_step", 0), integer(end_step, "end_step", 0)
        if end_step < start_step:
            raise ValueError(f"need start_step <= end_step, got start_step={start_step}, end_step={end_step}")
        frequency, degree = integer(frequency, "frequency", 1), integer(degree, "degree", 1)
        self.init_sparsity, self.final_sparsity = float(init_sparsity), float(final_sparsity)
        self.start_step, self.end_step, self.frequency, self.degree = start_step, end_step, frequency, degree
        self.step_count = 0

    def is_event(self, t: int) -> bool:
        """Pruning happens at start_step + k * frequency up to end_step, and at end_step."""
        return self.start_step <= t <= self.end_step and (
            (t - self.start_step) % self.frequency == 0 or t == self.end_step)

    def sparsity(self, t: int) -> float:
        return cubic_sparsity(t, self.init_sparsity, self.final_sparsity, self.start_step, self.end_step,
                              self.degree)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])


class Gradual(_Schedule):
    """Gradual pruning on Zhu & Gupta's cubic schedule ("To prune, or not to prune").

    At each pruning event the model is re-scored with ``criterion`` (magnitude, OBD,
    WoodFisher, ...) and pruned to the schedule's sparsity; weights pruned earlier
    stay pruned.

    Args:
        criterion: any :class:`fastprune.criteria.Criterion`.
        init_sparsity, final_sparsity: s_i and s_f, fractions in [0, 1).
        start_step, end_step: first and last pruning steps (``step()`` calls, from 0).
        frequency: steps between pruning events.
        degree: exponent of the schedule (3 in the paper).
        scope, modules, min_keep: as in :func:`fastprune.prune`.
        loss_fn: the per-sample loss, for criteria that use ``data``.
        progress: show the pruning bar at each event.

    Example::

        scheduler = fastprune.schedules.Gradual(fastprune.criteria.Magnitude(), 0.0, 0.9,
                                                start_step=100, end_step=1000, frequency=100)
        for x, y in loader:
            ...; optimizer.step()
            scheduler.step(model)
    """

    def __init__(self, criterion: Criterion, init_sparsity: float, final_sparsity: float, start_step: int,
                 end_step: int, frequency: int, degree: int = 3, *, scope: str = "global", modules=None,
                 min_keep: int | float = 1, loss_fn=None, progress: bool = False):
        super().__init__(init_sparsity, final_sparsity, start_step, end_step, frequency, degree)
        if not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a fastprune.criteria.Criterion, got {type(criterion).__name__}")
        self.criterion, self.scope, self.modules, self.min_keep = criterion, scope, modules, min_keep
        self.loss_fn, self.progress = loss_fn, progress

    def step(self, model: nn.Module, data=None) -> float | None:
        """Advances one training step; on a pruning event prunes ``model`` and returns
        the new sparsity, else returns None. ``data`` (batches of (inputs, targets))
        is needed by criteria that use it."""
        t = self.step_count
        pruned = None
        if self.is_event(t):
            if self.criterion.requires_data and data is None:
                raise ValueError(f"{self.criterion!r} needs data at pruning step {t}: call step(model, data=...)")
            pruned = self.sparsity(t)
            prune(model, self.criterion, pruned, data=data, loss_fn=self.loss_fn, scope=self.scope, steps=1,
                  modules=self.modules, min_keep=self.min_keep, progress=self.progress)
        self.step_count = t + 1
        return pruned


class GraNet(_Schedule):
    """GraNet-style prune-and-regrow (Liu et al., "Sparse Training via Boosting
    Pruning Plasticity with Neuroregeneration").

    At each event: global magnitude pruning to the cubic schedule's sparsity; then,
    per layer, the fraction r_t of active weights with the smallest |w| is removed
    and as many inactive weights with the largest dense-gradient magnitude are
    regrown, starting at 0, so the sparsity stays exactly on schedule. r_t decays
    with a cosine from ``regrow_fraction`` at step 0 to 0 at ``end_step``.

    The dense gradient comes from one batch of ``data`` (gradients of the masked
    weights at every position, pruned ones included), with the per-sample loss
    ``loss_fn``. Arguments as for :class:`Gradual`; ``regrow_fraction`` is r_0.
    """

    def __init__(self, init_sparsity: float, final_sparsity: float, start_step: int, end_step: int,
                 frequency: int, regrow_fraction: float = 0.5, degree: int = 3, *, modules=None, loss_fn=None,
                 progress: bool = False):
        super().__init__(init_sparsity, final_sparsity, start_step, end_step, frequency, degree)
        regrow_fraction = real(regrow_fraction, "regrow_fraction", 0, 1)
        self.regrow_fraction, self.modules, self.loss_fn, self.progress = regrow_fraction, modules, loss_fn, progress

    def regrow_rate(self, t: int) -> float:
        return 0.5 * self.regrow_fraction * (1.0 + math.cos(math.pi * min(t, self.end_step) / max(self.end_step, 1)))

    def step(self, model: nn.Module, data=None) -> float | None:
        """Advances one training step; on an event prunes and regrows (needs ``data``)
        and returns the sparsity, else returns None."""
        t = self.step_count
        if not self.is_event(t):
            self.step_count = t + 1
            return None
        if data is None:
            raise ValueError(f"GraNet needs data at pruning step {t} for the regrowth gradients: "
                             "call step(model, data=...)")
        target = self.sparsity(t)
        snapshot = Snapshot(find_targets(model, self.modules))
        try:  # bad data fails in the gradients, after the pruning: undo it
            prune(model, Magnitude(), target, scope="global", steps=1, modules=self.modules, progress=self.progress)
            grads = _dense_gradients(model, self.modules, data, self.loss_fn)
        except BaseException:
            snapshot.restore()
            raise
        rate = self.regrow_rate(t)
        with torch.no_grad():
            for tgt in find_targets(model, self.modules):
                _swap(tgt, grads[tgt.name], rate)
        self.step_count = t + 1
        return target


def _dense_gradients(model, modules, data, loss_fn) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss on one batch w.r.t. every effective weight (dense)."""
    names = [t.name for t in find_targets(model, modules)]
    loss, weights = next(mean_batch_losses(model, names, data, loss_fn, 1))
    return dict(zip(names, torch.autograd.grad(loss, weights)))


def _swap(t, grad: torch.Tensor, rate: float) -> None:
    """Drops round(rate * active) smallest-|w| active weights of one tensor and
    regrows as many inactive ones with the largest |grad|, at value 0."""
    mask = t.mask.view(-1).bool()  # torch's own masks are float
    active = int(mask.sum())
    inactive_count = mask.numel() - active
    k = min(round(rate * active), inactive_count)
    if k == 0:
        return
    w = t.param.detach().view(-1)
    # Candidates to regrow are chosen among weights inactive *before* the drop, so a
    # dropped weight cannot come straight back.
    grow_scores = grad.abs().reshape(-1).masked_fill(mask, -1.0)
    grow = torch.topk(grow_scores, k).indices
    drop_scores = w.abs().masked_fill(~mask, float("inf"))
    drop = torch.topk(drop_scores, k, largest=False).indices
    mask[drop] = False
    mask[grow] = True
    t.mask.view(-1).copy_(mask)
    w[grow] = 0.0
    t.refresh()
