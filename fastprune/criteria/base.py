"""The criterion interface shared by every pruning criterion."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Criterion"]


class Criterion:
    """Scores weights for pruning: lower scores are pruned first.

    Subclasses implement :meth:`scores`. The returned dict, keyed like
    ``model.named_parameters()`` (``_orig`` dropped), can also be passed as
    ``importance_scores`` to ``torch.nn.utils.prune.global_unstructured``.
    """

    #: Whether :meth:`scores` needs ``data`` (and ``loss_fn``).
    requires_data: bool = False
    #: Steps ``fastprune.prune`` takes when its ``steps`` is not given (SynFlow: 100).
    default_steps: int = 1

    def scores(self, model: nn.Module, params: dict[str, torch.Tensor], data=None, loss_fn=None
               ) -> dict[str, torch.Tensor]:
        """Returns one score tensor per entry of ``params`` (same shape).

        ``params`` maps names to the current effective (masked) weights.
        """
        raise NotImplementedError

    def compensate(self, model: nn.Module, params: dict[str, torch.Tensor], old_masks: dict[str, torch.Tensor | None],
                   new_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """New values for the weights once ``new_masks`` are chosen (e.g. OBS updates
        that move the survivors to make up for the pruned weights), or None to leave
        them. Called after :meth:`scores` in the same step; ``fastprune.prune`` writes
        the values together with the masks, so a failure here changes nothing."""
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
