"""Pruning before and during training: mask-preserving optimizers (:mod:`.optim`),
gradual schedules and GraNet (:mod:`.schedules`), lottery tickets (:mod:`.loops`).
They are importable as ``fastprune.optim``, ``fastprune.schedules`` and ``fastprune.loops``."""
from . import loops, optim, schedules

__all__ = ["optim", "schedules", "loops"]
