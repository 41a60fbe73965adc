"""The statistics plan: for every trainable parameter of the model (or of the
selected modules), the exact per-sample formula that covers it, or the torch.func
fallback (with a one-time warning; ``strict=True`` raises instead)."""
from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import unmasked_name
from ..targets import select_modules
from .formulas import PerSampleFormula, formula_for

__all__ = ["StatsPlan", "plan_stats", "check_batchnorm", "batchnorm_eval"]

_warned: set[tuple[str, str]] = set()


@dataclass
class StatsPlan:
    """Which parameters are covered and how: keys are ``named_parameters()`` names with
    torch.nn.utils.prune's ``_orig`` dropped."""

    native: dict[str, tuple[PerSampleFormula, set[str]]] = field(default_factory=dict)  # module name -> (formula, keys)
    fallback: dict[str, str] = field(default_factory=dict)  # key -> actual parameter name
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> keep-mask of pruned tensors
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> trainable parameter
    verified: bool = False  # the formulas were checked against autograd (stats.verify)
    sample_dims: dict[str, int] = field(default_factory=dict)  # module -> dim of its samples, where not 0

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def copy(self) -> "StatsPlan":
        """A plan that verification can change (modules moved to the fallback) without
        changing this one; formulas, masks and parameters are shared."""
        return StatsPlan(dict(self.native), dict(self.fallback), dict(self.masks), dict(self.params),
                         self.verified, dict(self.sample_dims))


def _key(module_name: str, local: str) -> str:
    return f"{module_name}.{local}" if module_name else local


def plan_stats(model: nn.Module, modules=None, strict: bool = False, keys: set[str] | None = None,
               grouped_only: bool = False) -> StatsPlan:
    """Decides, for every trainable parameter (of ``modules`` if given, or with a key in
    ``keys``), the exact formula or the torch.func fallback. ``grouped_only`` accepts
    only formulas that expose per-sample gradient tiles (Linear, Conv1d, Conv2d)."""
    named = dict(model.named_modules()) if modules is None else \
        select_modules(model, modules, lambda m: any(p is not None for p in m._parameters.values()), "parameters")
    # A Parameter several modules use (tied embeddings): its per-sample gradient sums
    # the uses, which each module's formula alone cannot give, so it is planned once,
    # under its first name, for the torch.func fallback (which sees all uses).
    uses = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    planned: set[int] = set()
    plan = StatsPlan()
    for mod_name, module in named.items():
        formula = formula_for(module)
        for actual, p in module.named_parameters(recurse=False):
            local = unmasked_name(module, actual)
            key = _key(mod_name, local)
            if not p.requires_grad or id(p) in planned or (keys is not None and key not in keys):
                continue
            planned.add(id(p))
            plan.params[key] = p
            if local != actual:
                plan.masks[key] = getattr(module, local + "_mask")
            exact = formula is not None and local in formula.handles and \
                (not grouped_only or formula.has_weight_tiles)
            if exact and uses[id(p)] == 1:
                plan.native.setdefault(mod_name, (formula, set()))[1].add(local)
            else:
                what = f"{type(module).__name__} {mod_name!r} ({local})"
                why = "it is shared by several modules" if exact else "no exact per-sample formula covers it"
                fallback(plan, key, _key(mod_name, actual), what, why, strict)
    meta = [k for k, p in plan.params.items() if p.is_meta]
    if meta:
        raise ValueError(f"{meta} are on the meta device (shapes without values); materialise the model first "
                         "(model.to_empty(device=...) and load_state_dict)")
    if not plan.native and not plan.fallback:
        raise ValueError("no trainable parameters to collect statistics for (check modules= and requires_grad)")
    return plan


def fallback(plan: StatsPlan, key: str, actual: str, what: str, why: str, strict: bool) -> None:
    """Plans ``key`` for the torch.func fallback, with a one-time warning saying why
    (``strict=True`` raises instead)."""
    if strict:
        raise ValueError(f"{what}: {why}; pass strict=False to use per-sample gradients from torch.func for it "
                         "(slower), or exclude it with modules=")
    if (what, why) not in _warned:
        _warned.add((what, why))
        warnings.warn(f"fastprune: {what}: {why}; using torch.func per-sample gradients for it (slower)",
                      stacklevel=4)
    plan.fallback[key] = actual


def check_batchnorm(model: nn.Module, bn: str) -> list[nn.Module]:
    """Raises on train-mode BatchNorm (it mixes samples) unless ``bn="eval"``, in which
    case those modules are returned for the caller to switch to eval and back."""
    if bn not in ("raise", "eval"):
        raise ValueError(f"bn must be 'raise' or 'eval', got {bn!r}")
    training = [(n, m) for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training and bn == "raise":
        raise ValueError(f"BatchNorm {training[0][0]!r} is in train mode: its batch statistics mix the samples, "
                         "so per-sample gradients are undefined. Call model.eval() first, or pass bn='eval' to "
                         "switch BatchNorm to eval mode for the collection and restore it afterwards.")
    return [m for _, m in training]


@contextmanager
def batchnorm_eval(model: nn.Module, bn: str):
    """Checks BatchNorm as :func:`check_batchnorm` does, then holds the train-mode ones
    in eval mode for the block and restores them, whatever happens inside."""
    training = check_batchnorm(model, bn)
    for m in training:
        m.eval()
    try:
        yield
    finally:
        for m in training:
            m.train()
