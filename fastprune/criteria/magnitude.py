"""Magnitude pruning (MP): the smallest |w| go first."""
from __future__ import annotations

from .base import Criterion

__all__ = ["Magnitude"]


class Magnitude(Criterion):
    """Scores each weight by its absolute value. With ``scope="global"`` this is
    global magnitude pruning; with ``scope="layer"``, layer-wise magnitude pruning."""

    def scores(self, model, params, data=None, loss_fn=None):
        return {name: w.detach().abs() for name, w in params.items()}
