"""Which parameters a pruning call acts on."""
from __future__ import annotations

from collections.abc import Callable, Iterable
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masks import get_mask, refresh_masked, trainable, uses_of

__all__ = ["Target", "DEFAULT_PRUNABLE", "find_targets", "select_modules", "has_weight"]

_warned: set[tuple[str, ...]] = set()

#: Module types whose ``weight`` is pruned by default (biases and norms are not).
DEFAULT_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Target:
    """One prunable tensor: ``module.<tensor_name>``, known to users as ``name``.

    A Parameter used by several modules (tied embeddings, one Parameter assigned to
    two layers) is one target: ``uses`` lists every ``(module, tensor_name)`` holding
    it, and one mask is in force in all of them."""

    name: str
    module: nn.Module
    tensor_name: str = "weight"
    uses: list[tuple[nn.Module, str]] = field(default_factory=list)

    def __post_init__(self):
        if not self.uses:
            self.uses = [(self.module, self.tensor_name)]

    @property
    def weight(self) -> torch.Tensor:
        """The effective (masked) weight, ``orig * mask`` for a pruned tensor. Computed
        afresh: the module attribute torch's hook sets is only refreshed by a forward,
        so it is stale after e.g. ``load_state_dict``."""
        mask = self.mask
        return self.param if mask is None else self.param * mask

    @property
    def param(self) -> nn.Parameter:
        """The trainable parameter (``weight_orig`` once pruned)."""
        return trainable(self.module, self.tensor_name)

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module, self.tensor_name)

    def refresh(self) -> None:
        """Recomputes the masked weight now, as torch's pruning hook does before each
        forward (after in-place changes to the parameter or the mask)."""
        for module, name in self.uses:
            refresh_masked(module, name)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()


def has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_orig", None), nn.Parameter) or isinstance(
        module._parameters.get("weight"), nn.Parameter)


def _derived_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed from other parameters: torch.nn.utils.parametrize,
    or the old hook-based weight_norm / spectral_norm (read without evaluating the weight,
    which would advance spectral_norm's power iteration)."""
    return parametrize.is_parametrized(module, "weight") or any(
        getattr(h, "name", None) == "weight" for h in module._forward_pre_hooks.values())


def select_modules(model: nn.Module, modules: Iterable[str | type] | str | type, has: Callable[[nn.Module], bool],
                   what: str) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``modules=`` selects, in ``named_modules()`` order:
    those named (as in ``model.named_modules()``) and those of the listed types, kept
    where ``has(module)``. A named module without ``what`` (e.g. "weight parameter") is an error,
    as is an unknown name. The one parser of ``modules=`` for every entry point."""
    named = dict(model.named_modules())
    modules = [modules] if isinstance(modules, (str, type)) else list(modules)
    bad = [m for m in modules if not isinstance(m, (str, type))]
    if bad:
        raise TypeError(f"modules= takes module names or nn.Module types, got {bad!r}")
    names = {m for m in modules if isinstance(m, str)}
    types = tuple(m for m in modules if isinstance(m, type))
    valid = [n for n, m in named.items() if has(m)]
    unknown = sorted(n for n in names if n not in named)
    if unknown:
        raise ValueError(f"unknown module name(s) {unknown}; the modules with {what} are: {valid}")
    lacking = [n for n in named if n in names and not has(named[n])]
    if lacking:
        kinds = [type(named[n]).__name__ for n in lacking]
        raise ValueError(f"module(s) {lacking} ({', '.join(kinds)}) have no {what}; the modules with {what} are: "
                         f"{valid}")
    return {n: m for n, m in named.items() if (n in names or (types and isinstance(m, types))) and has(m)}


def find_targets(model: nn.Module, modules: Iterable[str | type] | str | type | None = None) -> list[Target]:
    """The ``weight`` tensors to prune, in ``model.named_modules()`` order.

    ``modules=None`` selects every Linear / Conv1d / Conv2d / Conv3d. Otherwise
    ``modules`` lists module names (as in ``model.named_modules()``) and/or module
    types; a named module must own a ``weight`` parameter.
    """
    if modules is None:
        selected = [n for n, m in model.named_modules() if isinstance(m, DEFAULT_PRUNABLE) and has_weight(m)]
        attention = tuple(n for n, m in model.named_modules()
                          if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)
        if attention and attention not in _warned:
            _warned.add(attention)
            warnings.warn(f"fastprune: nn.MultiheadAttention {list(attention)} keep their in_proj_weight (the joint "
                          "q/k/v projection) dense: it is a parameter of the attention module, not a Linear; only "
                          "out_proj is pruned", stacklevel=3)
        hidden = [f"{type(m).__name__} {n!r}" for n, m in model.named_modules()
                  if isinstance(m, DEFAULT_PRUNABLE) and not has_weight(m) and _derived_weight(m)]
        if hidden:
            raise ValueError(f"{', '.join(hidden)} compute their weight from other parameters (torch.nn.utils."
                             "parametrize: weight_norm, spectral_norm, orthogonal; or the old weight_norm hook), so "
                             "a mask on it would not hold. Remove the parametrization first "
                             "(parametrize.remove_parametrizations(module, 'weight')), or name the modules to prune "
                             "with modules=[...]")
    else:
        selected = list(select_modules(model, modules, has_weight, "weight parameter to prune"))
    targets, seen = [], set()
    for n in selected:
        module = model.get_submodule(n)
        param = trainable(module, "weight")
        if id(param) in seen:  # a tied Parameter is one target, named by its first use
            continue
        seen.add(id(param))
        targets.append(Target(name=f"{n}.weight" if n else "weight", module=module, uses=uses_of(model, param)))
    if not targets:
        raise ValueError("no prunable parameters found: the model has no Linear/Conv1d/Conv2d/Conv3d weight "
                         "(or none matched modules=); name the modules to prune with modules=[...]")
    return targets
