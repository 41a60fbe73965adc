"""``fastprune.prune``: one entry point for every criterion, scope and schedule."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .criteria.base import Criterion, PruningStep
from .distributed import broadcast_from_first, resolve_group
from .errors import check_finite
from .rng import get_rng_state, set_rng_state
from .masks import apply_masks, check_binary, unprune
from .sparse.frozen import FrozenPattern
from .select import keep_counts, nm_masks, parse_pattern, threshold_masks
from .targets import Target, find_targets
from . import validate
from .validate import integer, real

__all__ = ["prune", "Pruner", "geometric_schedule", "Snapshot"]


def geometric_schedule(sparsity: float, steps: int) -> list[float]:
    """Sparsities 1 - (1 - s)^(k / steps), k = 1..steps: each step removes the same
    fraction of the weights still alive."""
    return [1.0 - (1.0 - sparsity) ** (k / steps) for k in range(1, steps + 1)]


class Snapshot:
    """Weights and masks of the targets, to restore if a multi-step call fails."""

    def __init__(self, targets: list[Target]):
        self.state = [(t, t.param.detach().clone(), None if t.mask is None else t.mask.clone()) for t in targets]

    @torch.no_grad()
    def restore(self) -> None:
        for t, weight, mask in self.state:
            if mask is None and t.mask is not None:
                unprune(t.uses)
            elif mask is not None:
                t.mask.copy_(mask)
            t.param.copy_(weight)
            if mask is not None:
                t.refresh()


def _check_scores(criterion: Criterion, scores, targets: list[Target]) -> list[torch.Tensor]:
    if not isinstance(scores, dict):
        raise TypeError(f"{criterion!r}.scores returned {type(scores).__name__}, expected a dict of tensors")
    missing = [t.name for t in targets if t.name not in scores]
    if missing:
        raise ValueError(f"{criterion!r} returned no scores for {missing}")
    out = []
    for t in targets:
        s = scores[t.name]
        if not isinstance(s, torch.Tensor) or s.shape != t.shape:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{criterion!r} returned scores of shape {shape} for {t.name!r}, "
                             f"expected {tuple(t.shape)}")
        if not s.is_floating_point():
            s = s.float()
        out.append(s.detach())
    check_finite([(t.name, s) for t, s in zip(targets, out)], f"{criterion!r} returned non-finite scores",
                 "check the model, data and loss for NaN/inf")
    dtype = out[0].dtype
    for s in out[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return [s.to(dtype) for s in out]


def _check_chosen(criterion: Criterion, chosen, targets: list[Target]) -> dict[str, torch.Tensor]:
    """The masks a criterion chose, checked: one bool mask per target, of its shape, that
    keeps no weight pruned before."""
    out = {}
    for t in targets:
        m = chosen.get(t.name) if isinstance(chosen, dict) else None
        if not isinstance(m, torch.Tensor) or m.shape != t.shape:
            raise ValueError(f"{criterion!r} chose no mask of shape {tuple(t.shape)} for {t.name!r}")
        m = m.bool()
        if t.mask is not None and bool((m & ~t.mask.bool()).any()):
            raise ValueError(f"{criterion!r} chose a mask for {t.name!r} that keeps weights pruned before")
        out[t.name] = m
    return out


def _check_weights(criterion: Criterion, weights, targets: list[Target]) -> None:
    for t in targets:
        w = weights.get(t.name) if isinstance(weights, dict) else None
        if w is not None and w.shape != t.shape:
            raise ValueError(f"{criterion!r} compensated {t.name!r} with a tensor of shape {tuple(w.shape)}; "
                             f"expected {tuple(t.shape)}")
    check_finite([(t.name, weights[t.name]) for t in targets if isinstance(weights, dict) and t.name in weights],
                 f"{criterion!r} compensated with non-finite weights",
                 "for OBS criteria this means the Fisher is ill-conditioned: increase damp")


@torch.no_grad()
def _write_weights(weights: dict[str, torch.Tensor], targets: list[Target]) -> None:
    for t in targets:
        if t.name in weights:
            t.param.copy_(weights[t.name])
            t.refresh()


def _check_capacity(targets: list[Target], keep: list[int], sparsity: float, per_tensor: list[float] | None,
                    scope: str) -> None:
    alive = [t.numel if t.mask is None else int(t.mask.count_nonzero()) for t in targets]
    max_pruned = [t.numel - min(c, a) for t, c, a in zip(targets, keep, alive)]
    if per_tensor is None and scope == "global":
        total = sum(t.numel for t in targets)
        if round(sparsity * total) > sum(max_pruned):
            raise ValueError(f"sparsity={sparsity} would prune {round(sparsity * total)} of {total} weights, "
                             f"but min_keep allows at most {sum(max_pruned)} "
                             f"(sparsity {sum(max_pruned) / total:.4f}); lower sparsity or min_keep")
        return
    for i, t in enumerate(targets):
        sp = sparsity if per_tensor is None else per_tensor[i]
        if round(sp * t.numel) > max_pruned[i]:
            raise ValueError(f"sparsity {sp:.4f} of {t.name!r} would prune {round(sp * t.numel)} of its "
                             f"{t.numel} weights, but min_keep allows at most {max_pruned[i]}; "
                             "lower sparsity or min_keep")


class Pruner:
    """A pruning run that can be stopped and resumed: :func:`prune` one step at a time.

    :meth:`step` takes the next step of the schedule (scores, masks, weight
    compensation) and :meth:`run` takes all remaining ones. :meth:`state_dict`
    records how far the run got, the criterion's own position (e.g. where
    WoodFisher's ``num_grads`` sampling stopped in ``data``) and torch's RNG state;
    the masks and weights live in the model's ``state_dict``. Saving both after a
    step and loading both into fresh objects continues the run with the same
    result as an uninterrupted one, provided ``data`` yields the same batches for
    the same RNG state (a DataLoader with ``shuffle=True`` and ``num_workers=0`` or
    seeded workers does).

    Args: those of :func:`prune` (which runs a Pruner), without ``progress``.

    Example::

        pruner = fastprune.Pruner(model, WoodFisher(num_grads=1000), 0.95, data=loader,
                                  loss_fn="cross_entropy", steps=16)
        if os.path.exists("run.pt"):
            ckpt = torch.load("run.pt")
            fastprune.load_pruned_state_dict(model, ckpt["model"])
            pruner.load_state_dict(ckpt["pruner"])
        while not pruner.done:
            pruner.step()
            torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, "run.pt")
    """

    def __init__(self, model: nn.Module, criterion: Criterion, sparsity: float, *, data: Iterable | None = None,
                 loss_fn=None, scope: str = "global", steps: int | None = None,
                 modules: Iterable[str | type] | str | type | None = None, min_keep: int | float = 1,
                 pattern: str | None = None, process_group=None):
        validate.module(model)
        if not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a fastprune.criteria.Criterion, got {type(criterion).__name__}")
        sparsity = real(sparsity, "sparsity", 0, 1, high_open=True, hint=" (0.9 prunes 90% of the weights)")
        self.nm = None
        if pattern is not None:
            self.nm = parse_pattern(pattern)
            n, m = self.nm
            if abs(sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {pattern!r} prunes {m - n} of every {m} weights: pass sparsity={1 - n / m}")
            if steps not in (None, 1):
                raise ValueError(f"pattern {pattern!r} is applied in one step; drop steps={steps}")
            steps = 1
        if steps is None:
            steps = criterion.default_steps
        steps = integer(steps, "steps", 1)
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if criterion.requires_data and data is None:
            raise ValueError(f"{criterion!r} needs data: pass data=... (batches of (inputs, targets)) and loss_fn")
        if criterion.requires_data and not (criterion.calibration and isinstance(data, torch.Tensor)):
            validate.batches(data)
        # Not iter(data): starting a DataLoader's iterator draws from its generator.
        if criterion.requires_data and steps > 1 and isinstance(data, Iterator):
            raise ValueError(f"data is a one-shot iterator ({type(data).__name__}), but {steps} steps each read it "
                             "afresh; pass something re-iterable: a list of batches or a DataLoader")
        self.model, self.criterion, self.sparsity = model, criterion, float(sparsity)
        self.data, self.loss_fn, self.scope, self.steps = data, loss_fn, scope, steps
        self.process_group, self.group = process_group, resolve_group(process_group)
        self.targets = find_targets(model, criterion.default_modules(model) if modules is None else modules)
        for t in self.targets:
            if t.mask is not None:
                check_binary(t.name, t.mask)
        meta = [t.name for t in self.targets if t.param.is_meta]
        if meta:
            raise ValueError(f"{meta} are on the meta device (shapes without values), so there is nothing to score; "
                             "materialise the model first (model.to_empty(device=...) and load_state_dict, or load "
                             "it without device='meta')")
        frozen = [t.name for t in self.targets if not t.param.requires_grad]
        if frozen and criterion.requires_data and not criterion.calibration:
            raise ValueError(f"{frozen} have requires_grad=False, but {type(criterion).__name__} scores from their "
                             "gradients; leave them out with modules=[...], or set requires_grad=True while pruning")
        frozen = [t.name for t in self.targets if isinstance(t.module, FrozenPattern)]
        if frozen:
            raise ValueError(f"{frozen} were converted by fastprune.sparse.to_sparse (their pattern is frozen); call "
                             "fastprune.sparse.to_dense(model) before pruning them again, or leave them out with "
                             "modules=")
        self.keep = keep_counts([t.numel for t in self.targets], min_keep)
        self.schedule = geometric_schedule(self.sparsity, steps)
        #: Steps taken so far (0 .. steps).
        self.completed = 0
        final_alloc = criterion.allocation(self._params(), self.sparsity)
        per_tensor = None if final_alloc is None else [final_alloc[t.name] for t in self.targets]
        if self.nm is None:
            _check_capacity(self.targets, self.keep, self.sparsity, per_tensor, scope)

    @property
    def done(self) -> bool:
        """Whether every step of the schedule has been taken."""
        return self.completed == self.steps

    def _params(self) -> dict[str, torch.Tensor]:
        return {t.name: t.weight.detach() for t in self.targets}

    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the current keep-masks (bool), keyed like ``prune``'s result."""
        return {t.name: t.mask.to(torch.bool, copy=True) if t.mask is not None
                else torch.ones(t.shape, dtype=torch.bool, device=t.param.device) for t in self.targets}

    def step(self) -> dict[str, torch.Tensor]:
        """Takes the next step and returns the applied keep-masks. Everything is computed
        before anything is written, so a failing step leaves the model as it was."""
        if self.done:
            raise RuntimeError(f"all {self.steps} steps are done; create a new Pruner to prune further")
        targets, criterion = self.targets, self.criterion
        step_sparsity = self.schedule[self.completed]
        current = self._params()
        state = PruningStep(self.model, targets, current, {t.name: t.mask for t in targets}, self.data, self.loss_fn,
                            self.process_group)
        scores, context = criterion.score_step(state)
        if scores is not None:
            scores = _check_scores(criterion, scores, targets)
        chosen = criterion.choose_masks(state, context, step_sparsity, self.nm)
        if chosen is None and scores is None:
            raise TypeError(f"{criterion!r} returned no scores and chose no masks")
        if chosen is not None:
            masks = _check_chosen(criterion, chosen, targets)
        else:
            alloc = criterion.allocation(current, step_sparsity)
            amount = (step_sparsity if self.scope == "global" else [step_sparsity] * len(targets)) \
                if alloc is None else [alloc[t.name] for t in targets]
            if self.nm is None:
                new = threshold_masks(scores, [t.mask for t in targets], self.keep, amount)
            else:
                new = nm_masks(scores, [t.mask for t in targets], [t.name for t in targets], *self.nm)
            masks = {t.name: m for t, m in zip(targets, new)}
        del scores
        weights = criterion.compensate(state, masks, context)
        # Every rank applies rank 0's decision, so a DDP model stays identical whatever the
        # criterion computes per rank (ties, a user criterion's own statistics).
        broadcast_from_first(list(masks.values()) + (list(weights.values()) if weights is not None else []),
                             self.group)
        if weights is not None:
            _check_weights(criterion, weights, targets)
        apply_masks(self.model, masks)
        if weights is not None:
            _write_weights(weights, targets)
        self.completed += 1
        return masks

    def run(self, progress: bool = True) -> dict[str, torch.Tensor]:
        """Takes every remaining step; if one fails, the model's weights and masks, and
        :attr:`completed`, go back to what they were when ``run`` was called."""
        snapshot = Snapshot(self.targets) if self.steps - self.completed > 1 else None
        start = self.completed
        try:
            for _ in tqdm(range(start, self.steps), desc="pruning", initial=start, total=self.steps,
                          disable=not progress):
                self.step()
        except BaseException:
            if snapshot is not None:
                snapshot.restore()
                self.completed = start
            raise
        return self.masks()

    def _pruned_count(self) -> int:
        return sum(0 if t.mask is None else t.numel - int(t.mask.count_nonzero()) for t in self.targets)

    def state_dict(self) -> dict:
        """How far the run got: steps taken, the schedule, the pruned tensors' names and
        how many of their weights are pruned, the criterion's state and torch's RNG
        state (save the model's ``state_dict`` with it)."""
        return {"completed": self.completed, "steps": self.steps, "sparsity": self.sparsity,
                "targets": [t.name for t in self.targets], "shapes": [list(t.shape) for t in self.targets],
                "criterion": type(self.criterion).__name__,
                "pruned": self._pruned_count(), "criterion_state": self.criterion.state_dict(),
                "rng": get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continues the run recorded by :meth:`state_dict`. Load the model's state dict
        saved with it first (``fastprune.load_pruned_state_dict`` for a fresh model).
        Also restores torch's RNG state, so shuffling and sampling continue unchanged."""
        for key, mine in (("steps", self.steps), ("sparsity", self.sparsity),
                          ("targets", [t.name for t in self.targets]), ("criterion", type(self.criterion).__name__)):
            if state.get(key) != mine:
                raise ValueError(f"this state was saved by a run with {key}={state.get(key)!r}, but this Pruner has "
                                 f"{key}={mine!r}; create the Pruner with the same arguments")
        completed = state.get("completed")
        if isinstance(completed, bool) or not isinstance(completed, int) or not 0 <= completed <= self.steps:
            raise ValueError(f"this state records completed={completed!r} steps, but this Pruner has {self.steps}; "
                             "it is not a state_dict() of this run")
        shapes = [list(t.shape) for t in self.targets]
        if state.get("shapes", shapes) != shapes:
            raise ValueError(f"this state was saved for tensors of shapes {state['shapes']}, this model's are "
                             f"{shapes}; create the Pruner on the same model")
        _check_rng_state(state.get("rng"))
        pruned = self._pruned_count()
        if pruned != state["pruned"]:
            raise ValueError(f"the state was saved with {state['pruned']} pruned weights (after step "
                             f"{state['completed']}) but the model's masks prune {pruned}; load the model state_dict "
                             "saved with it first (fastprune.load_pruned_state_dict for an unpruned model)")
        before = self.criterion.state_dict()
        self.criterion.load_state_dict(state["criterion_state"])
        try:
            set_rng_state(state["rng"])
        except BaseException:
            self.criterion.load_state_dict(before)
            raise
        self.completed = completed


def _check_rng_state(rng) -> None:
    """A saved RNG state must have the shape torch's generator takes, or set_rng_state
    fails after the rest was loaded."""
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    now = torch.get_rng_state()
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != now.dtype or cpu.shape != now.shape:
        raise ValueError("this state's RNG state is missing or not torch's (expected state['rng']['cpu'] as saved "
                         "by Pruner.state_dict()); it is not a state_dict() of this run")


def prune(model: nn.Module, criterion: Criterion, sparsity: float, *, data: Iterable | None = None,
          loss_fn=None, scope: str = "global", steps: int | None = None,
          modules: Iterable[str | type] | str | type | None = None, min_keep: int | float = 1,
          pattern: str | None = None, progress: bool = True, process_group=None) -> dict[str, torch.Tensor]:
    """Prunes ``model`` in place to ``sparsity`` using ``criterion``'s scores.

    Args:
        model: any ``nn.Module``. Its ``weight`` tensors are reparametrised as
            ``torch.nn.utils.prune`` does (``weight_orig``, ``weight_mask``, a hook).
        criterion: a :class:`fastprune.criteria.Criterion`; lower scores go first.
        sparsity: fraction of the selected weights to prune, in [0, 1). Weights
            already pruned count towards it and stay pruned.
        data, loss_fn: batches ``(inputs, targets)`` and a per-sample loss, for
            criteria that need them (``criterion.requires_data``).
        scope: ``"global"`` (one threshold across all tensors) or ``"layer"`` (each
            tensor pruned to ``sparsity``). Criteria that fix per-tensor sparsities
            (``Random(distribution="erk")``) override it.
        steps: reach ``sparsity`` in ``steps`` steps of the geometric schedule
            1 - (1 - s)^(k/steps), re-scoring the pruned model before each step;
            default ``criterion.default_steps`` (1, or 100 for SynFlow).
        modules: module names and/or types to prune; default every Linear,
            Conv1d, Conv2d and Conv3d weight, or the criterion's own choice
            (``criterion.default_modules``: the layer-wise SparseGPT and Wanda take the
            Linears inside the model's repeated blocks).
        min_keep: weights every tensor keeps (a count, or a fraction in (0, 1) of
            the tensor), which prevents layer collapse under a global threshold.
        pattern: ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``) keeps the N best-scored of
            every M consecutive weights along each row of ``weight.flatten(1)``
            (Linear: the input features; Conv: in-channel x kernel positions),
            the layout semi-structured sparse kernels take. ``sparsity`` must be
            1 - N/M; the step is single (``steps`` 1) and ``scope`` does not apply.
        process_group: with torch.distributed (default: the default group when
            initialised), every rank of this group ends with its first rank's masks
            and weight updates. The built-in criteria's statistics (OBD/QM/Taylor,
            WoodFisher with ``num_grads`` per rank) are summed over this group.
        progress: show a progress bar over the steps.

    Returns:
        The applied keep-masks (bool, True = kept), keyed by parameter name as in
        ``model.named_parameters()`` without the ``_orig`` suffix.

    On any error the model's weights and masks are left as they were. For a run that
    can be checkpointed and resumed between steps, use :class:`Pruner`.

    Example::

        masks = fastprune.prune(model, fastprune.criteria.Magnitude(), 0.9)
    """
    return Pruner(model, criterion, sparsity, data=data, loss_fn=loss_fn, scope=scope, steps=steps, modules=modules,
                  min_keep=min_keep, pattern=pattern, process_group=process_group).run(progress)
