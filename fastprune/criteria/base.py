"""The criterion interface shared by every pruning criterion."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..masks import split_param_name
from ..targets import Target

__all__ = ["Criterion", "PruningStep"]


@dataclass
class PruningStep:
    """What the pruning loop knows at one step, handed to :meth:`Criterion.score_step`
    and :meth:`Criterion.compensate`.

    Attributes:
        model: the model being pruned.
        targets: the tensors pruned, in order.
        params: ``{name: current effective (masked) weight}`` of the targets.
        masks: ``{name: current keep-mask, or None while the tensor is unpruned}``.
        data, loss_fn: as given to ``fastprune.prune``.
        process_group: as given to ``fastprune.prune`` (None: the default group when
            torch.distributed is initialised); statistics are summed over it.
    """

    model: nn.Module
    targets: list[Target]
    params: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor | None]
    data: Iterable | None = None
    loss_fn: object = None
    process_group: object = None

    @classmethod
    def of(cls, model: nn.Module, params: dict[str, torch.Tensor], data=None, loss_fn=None) -> "PruningStep":
        """The step of a standalone ``scores(model, params, ...)`` call: targets and masks
        are looked up in ``model`` by the names of ``params``."""
        targets = [Target(name, *split_param_name(model, name)) for name in params]
        return cls(model, targets, dict(params), {t.name: t.mask for t in targets}, data, loss_fn)


class Criterion:
    """Scores weights for pruning: lower scores are pruned first.

    A simple criterion implements :meth:`scores`. One that needs what the pruning
    loop knows (the current masks, the process group) or that moves the surviving
    weights implements :meth:`score_step` and :meth:`compensate`, which receive the
    :class:`PruningStep`. The scores, keyed like ``model.named_parameters()``
    (``_orig`` dropped), can also be passed as ``importance_scores`` to
    ``torch.nn.utils.prune.global_unstructured``.
    """

    #: Whether :meth:`scores` needs ``data`` (and ``loss_fn``).
    requires_data: bool = False
    #: Steps ``fastprune.prune`` takes when its ``steps`` is not given (SynFlow: 100).
    default_steps: int = 1
    #: Whether ``data`` is calibration inputs only (a tensor of inputs is accepted too).
    calibration: bool = False

    def scores(self, model: nn.Module, params: dict[str, torch.Tensor], data=None, loss_fn=None
               ) -> dict[str, torch.Tensor]:
        """Returns one score tensor per entry of ``params`` (same shape).

        ``params`` maps names to the current effective (masked) weights.
        """
        if type(self).score_step is Criterion.score_step:
            raise NotImplementedError(f"{type(self).__name__} must implement scores() or score_step()")
        return self.score_step(PruningStep.of(model, params, data, loss_fn))[0]

    def score_step(self, step: PruningStep) -> tuple[dict[str, torch.Tensor] | None, object]:
        """The scores of one pruning step and the context :meth:`compensate` needs (e.g.
        the inverse Fishers behind the scores). Default: :meth:`scores`, no context.
        Scores may be None for a criterion whose :meth:`choose_masks` picks the masks."""
        return self.scores(step.model, step.params, step.data, step.loss_fn), None

    def compensate(self, step: PruningStep, new_masks: dict[str, torch.Tensor], context
                   ) -> dict[str, torch.Tensor] | None:
        """New values for the weights once ``new_masks`` are chosen (e.g. OBS updates
        that move the survivors to make up for the pruned weights), or None to leave
        them. ``context`` is what :meth:`score_step` returned for the same step;
        ``fastprune.prune`` writes the values together with the masks, so a failure
        here changes nothing."""
        return None

    def choose_masks(self, step: PruningStep, context, sparsity: float, pattern: tuple[int, int] | None
                     ) -> dict[str, torch.Tensor] | None:
        """Keep-masks the criterion picks itself, for criteria whose masks come out of their
        own solver (layer-wise OBS picks them inside its sweep): ``sparsity`` is this step's
        target for every tensor, ``pattern`` ``(N, M)`` or None. None (the default) lets
        ``fastprune.prune`` threshold the scores; masks that keep an already-pruned weight
        are refused."""
        return None

    def default_modules(self, model: nn.Module) -> list[str] | None:
        """The modules pruned when ``fastprune.prune`` gets no ``modules=`` (names as in
        ``model.named_modules()``); None: every Linear and Conv."""
        return None

    def allocation(self, params: dict[str, torch.Tensor], sparsity: float) -> dict[str, float] | None:
        """Per-tensor sparsities, for criteria that fix them (e.g. ERK); None lets
        ``fastprune.prune``'s ``scope`` decide."""
        return None

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model and torch's RNG state (e.g. the
        position in ``data`` of a criterion that draws fresh samples at each step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
