"""Which parameters a pruning call acts on."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .masks import get_mask

__all__ = ["Target", "DEFAULT_PRUNABLE", "find_targets"]

#: Module types whose ``weight`` is pruned by default (biases and norms are not).
DEFAULT_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Target:
    """One prunable tensor: ``module.<tensor_name>``, known to users as ``name``."""

    name: str
    module: nn.Module
    tensor_name: str = "weight"

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
        orig = getattr(self.module, self.tensor_name + "_orig", None)
        return orig if orig is not None else getattr(self.module, self.tensor_name)

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module, self.tensor_name)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_orig", None), nn.Parameter) or isinstance(
        module._parameters.get("weight"), nn.Parameter)


def find_targets(model: nn.Module, modules: Iterable[str | type] | str | type | None = None) -> list[Target]:
    """The ``weight`` tensors to prune, in ``model.named_modules()`` order.

    ``modules=None`` selects every Linear / Conv1d / Conv2d / Conv3d. Otherwise
    ``modules`` lists module names (as in ``model.named_modules()``) and/or module
    types; a named module must own a ``weight`` parameter.
    """
    named = dict(model.named_modules())
    if modules is None:
        selected = [n for n, m in named.items() if isinstance(m, DEFAULT_PRUNABLE) and _has_weight(m)]
    else:
        if isinstance(modules, (str, type)):
            modules = [modules]
        modules = list(modules)
        names = [m for m in modules if isinstance(m, str)]
        types = tuple(m for m in modules if isinstance(m, type))
        bad = [m for m in modules if not isinstance(m, (str, type))]
        if bad:
            raise TypeError(f"modules= takes module names or nn.Module types, got {bad!r}")
        valid = [n for n, m in named.items() if _has_weight(m)]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"unknown module name(s) {unknown}; modules with a weight are: {valid}")
        no_weight = [n for n in names if not _has_weight(named[n])]
        if no_weight:
            kinds = [type(named[n]).__name__ for n in no_weight]
            raise ValueError(f"module(s) {no_weight} ({', '.join(kinds)}) have no weight parameter to prune; "
                             f"modules with a weight are: {valid}")
        wanted = set(names)
        selected = [n for n, m in named.items()
                    if (n in wanted or (types and isinstance(m, types))) and _has_weight(m)]
    if not selected:
        raise ValueError("no prunable parameters found: the model has no Linear/Conv1d/Conv2d/Conv3d weight "
                         "(or none matched modules=); name the modules to prune with modules=[...]")
    return [Target(name=f"{n}.weight" if n else "weight", module=named[n]) for n in selected]
