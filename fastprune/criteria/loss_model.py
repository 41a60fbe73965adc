"""The loss-model criteria of Laurent et al., "Revisiting Loss Modelling for
Unstructured Pruning": linear (LM / Taylor), quadratic (QM) and OBD."""
from __future__ import annotations

from ..stats.fisher import FisherCollector
from ..stats.losses import FISHER_KINDS
from ..validate import optional_integer, real
from .base import Criterion

__all__ = ["LossModel", "Taylor", "QM", "OBD"]


class LossModel(Criterion):
    """Scores each weight by the modelled loss change of setting it to zero:

        score_q = | -g_q w_q + 1/2 h_q w_q^2 | + 1/2 lam w_q^2

    with g the mean gradient (dropped when ``gradient=False`` or, for ``order=1``,
    kept alone) and h a Fisher diagonal of kind ``fisher`` (``"true"``: the
    expectation over classes, i.e. the GGN diagonal; ``"empirical"``; ``"mc"``).

    ``lam`` is the locality knob: the term 1/2 lam w^2 penalises large moves away
    from the trained point, where the Taylor model stops being trustworthy; as
    lam -> infinity every member reduces to magnitude pruning. Pruning in several
    steps (``fastprune.prune(..., steps=k)``) re-estimates g and h at each step and
    is the other way to stay local.

    Args:
        order: 1 (linear model, h = 0) or 2 (quadratic model).
        fisher: the Fisher kind for h (ignored when ``order=1``).
        lam: weight of the locality penalty, >= 0.
        gradient: include the gradient term (False gives OBD).
        max_samples: samples of ``data`` used for the statistics (default: all).
        progress: show a progress bar while collecting them.
    """

    requires_data = True

    def __init__(self, order: int = 2, fisher: str = "true", lam: float = 0.0, gradient: bool = True,
                 max_samples: int | None = None, progress: bool = False):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (linear model) or 2 (quadratic model), got {order!r}")
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        lam = real(lam, "lam", 0)
        if order == 1 and not gradient:
            raise ValueError("order=1 without the gradient term models no loss change; use order=2 (OBD)")
        self.order, self.fisher, self.lam, self.gradient = order, fisher, float(lam), gradient
        self.max_samples = optional_integer(max_samples, "max_samples", 1)
        self.progress = progress
        self._collector = None

    def _statistics(self, step, kind: str, modules: list[str]):
        """The step's (diag, grad), from a collector kept across the steps of one run: it
        re-plans only when pruning changed the model (each step's masks do not)."""
        c = self._collector
        if c is None or c.model is not step.model or c.loss_fn is not step.loss_fn or c.fisher != kind \
                or c.modules != modules:
            c = self._collector = FisherCollector(step.model, step.loss_fn, fisher=kind, modules=modules)
        return c(step.data, max_samples=self.max_samples, return_grad=True, progress=self.progress,
                 process_group=step.process_group)

    def score_step(self, step):
        modules = [t.name.rpartition(".")[0] for t in step.targets]
        # The first-order model needs only the gradient, which the empirical pass gives for free.
        kind = "empirical" if self.order == 1 else self.fisher
        h, g = self._statistics(step, kind, modules)
        out = {}
        for name, w in step.params.items():
            w = w.to(h[name].dtype)
            change = -g[name] * w if self.gradient else 0.0
            if self.order == 2:
                change = change + 0.5 * h[name] * w.square()
            out[name] = change.abs() + 0.5 * self.lam * w.square()
        return out, None


class Taylor(LossModel):
    """First-order Taylor (LM): score |g_q w_q| (+ 1/2 lam w_q^2)."""

    def __init__(self, lam: float = 0.0, max_samples: int | None = None, progress: bool = False):
        super().__init__(order=1, lam=lam, max_samples=max_samples, progress=progress)


class QM(LossModel):
    """Quadratic model (QM): score |-g_q w_q + 1/2 h_q w_q^2| (+ 1/2 lam w_q^2)."""

    def __init__(self, fisher: str = "true", lam: float = 0.0, max_samples: int | None = None,
                 progress: bool = False):
        super().__init__(order=2, fisher=fisher, lam=lam, max_samples=max_samples, progress=progress)


class OBD(LossModel):
    """Optimal Brain Damage: score 1/2 h_q w_q^2 (+ 1/2 lam w_q^2), the gradient assumed zero."""

    def __init__(self, fisher: str = "true", lam: float = 0.0, max_samples: int | None = None,
                 progress: bool = False):
        super().__init__(order=2, fisher=fisher, lam=lam, gradient=False, max_samples=max_samples,
                         progress=progress)
