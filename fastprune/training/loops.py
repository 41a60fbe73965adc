"""Training loops around pruning: iterative magnitude pruning with rewinding."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..criteria.magnitude import Magnitude
from ..pruning import prune
from ..targets import find_targets
from ..validate import integer, real

__all__ = ["LotteryTicket"]


class LotteryTicket:
    """Iterative magnitude pruning with rewinding (Frankle et al., "Stabilizing the
    Lottery Ticket Hypothesis"; ``rewind_step=0`` is the original lottery ticket).

    Each round trains the model, prunes ``prune_fraction`` of the weights still
    alive (magnitude, global or per layer) and rewinds every parameter (survivors of
    the pruned tensors, biases, norms) to its value after ``rewind_step`` optimizer
    steps of the first round. After the last round
    the ticket is trained once more.

    Args:
        rounds: pruning rounds; the final sparsity is 1 - (1 - prune_fraction)^rounds.
        prune_fraction: fraction of the remaining weights pruned per round (0.2).
        rewind_step: optimizer steps after which the rewind point is saved.
        scope, modules: as in :func:`fastprune.prune`.
        progress: show a progress bar over the rounds.

    ``train_fn(model, optimizer_factory)`` is the user's training loop; it must build
    its optimizer with ``optimizer_factory(model)`` (which wraps the factory given
    to :meth:`run`, so the rewind point can be taken after ``rewind_step`` steps).
    """

    def __init__(self, rounds: int, prune_fraction: float = 0.2, rewind_step: int = 0, *, scope: str = "global",
                 modules=None, progress: bool = True):
        self.rounds = integer(rounds, "rounds", 1)
        self.prune_fraction = real(prune_fraction, "prune_fraction", 0, 1, low_open=True, high_open=True)
        self.rewind_step = integer(rewind_step, "rewind_step", 0)
        self.scope, self.modules, self.progress = scope, modules, progress

    def run(self, model: nn.Module, train_fn: Callable, optimizer_factory: Callable) -> list[float]:
        """Runs the rounds on ``model`` in place; returns the sparsity after each round."""
        targets = find_targets(model, self.modules)
        rewind: dict[nn.Parameter, torch.Tensor] = {}  # Parameter objects survive pruning's renaming
        steps = 0

        def save():
            rewind.update({p: p.detach().clone() for p in model.parameters()})

        def counting_factory(m):
            opt = optimizer_factory(m)

            def after_step(*_):
                nonlocal steps
                steps += 1
                if steps == self.rewind_step:
                    save()
            opt.register_step_post_hook(after_step)
            return opt

        if self.rewind_step == 0:
            save()
        history = []
        for r in tqdm(range(1, self.rounds + 1), desc="lottery ticket", disable=not self.progress):
            train_fn(model, counting_factory if r == 1 else optimizer_factory)
            if not rewind:
                raise ValueError(f"training took {steps} optimizer steps, fewer than rewind_step={self.rewind_step}; "
                                 "lower rewind_step or build the optimizer with the optimizer_factory passed in")
            sparsity = 1.0 - (1.0 - self.prune_fraction) ** r
            prune(model, Magnitude(), sparsity, scope=self.scope, modules=self.modules, progress=False)
            with torch.no_grad():
                for p, value in rewind.items():
                    p.copy_(value)
                for t in targets:
                    t.refresh()
            history.append(sparsity)
        train_fn(model, optimizer_factory)
        return history
