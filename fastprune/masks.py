"""Masks that interoperate with :mod:`torch.nn.utils.prune`.

A pruned tensor ``weight`` follows torch's convention: the trainable values live in
the parameter ``weight_orig``, the mask (1/True = keep) in the buffer
``weight_mask``, and a forward pre-hook recomputes ``weight = weight_orig * weight_mask``.
So ``prune.is_pruned``, ``prune.remove``, ``state_dict`` and ``copy.deepcopy`` behave as
with torch's own pruning. fastprune stores new masks as ``torch.bool`` (1 byte per
weight, 4x less than torch's float masks); a mask that torch created is updated
in place and keeps its dtype.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["apply_masks", "get_mask", "pruned_names", "unmasked_name", "remove_masks", "load_pruned_state_dict",
           "split_param_name", "refresh_masked"]


class FastpruneMask(torch_prune.BasePruningMethod):
    """The pruning hook fastprune registers; the mask itself is the ``<name>_mask`` buffer."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        # Masks are decided by fastprune.prune; re-applying keeps the stored one.
        return default_mask


def split_param_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Returns ``(module, tensor_name)`` for a ``named_parameters()``-style key."""
    module_name, _, tensor_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise KeyError(f"{name!r} does not name a parameter of the model") from exc
    return module, tensor_name


def get_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The mask of ``module.<name>`` if it is pruned, else None."""
    return getattr(module, name + "_mask", None) if hasattr(module, name + "_orig") else None


def pruned_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own pruned tensors: each has a ``<name>_orig`` parameter and a
    ``<name>_mask`` buffer (fastprune's or torch's pruning)."""
    return [k[: -len("_orig")] for k in module._parameters
            if k.endswith("_orig") and hasattr(module, k[: -len("_orig")] + "_mask")]


def unmasked_name(module: nn.Module, param_name: str) -> str:
    """The name users know a parameter of ``module`` by: ``weight`` for a pruned
    ``weight_orig``, the name itself otherwise."""
    base = param_name[: -len("_orig")]
    return base if param_name.endswith("_orig") and hasattr(module, base + "_mask") else param_name


def refresh_masked(module: nn.Module, name: str) -> None:
    """Recomputes ``module.<name> = <name>_orig * <name>_mask`` now, as torch's pruning
    hook does before each forward (the attribute is stale after in-place changes)."""
    setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))


def _apply_one(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    existing = get_mask(module, name)
    if existing is not None:
        existing.copy_(mask)
    else:
        orig = getattr(module, name)
        if not isinstance(orig, nn.Parameter):
            raise TypeError(f"{type(module).__name__}.{name} is not a parameter; only parameters can be pruned")
        hook = FastpruneMask()
        hook._tensor_name = name
        # Same Parameter object under the new name, so optimizers keep tracking it.
        del module._parameters[name]
        module.register_parameter(name + "_orig", orig)
        module.register_buffer(name + "_mask", mask.to(device=orig.device, dtype=torch.bool).clone())
        module.register_forward_pre_hook(hook)
    refresh_masked(module, name)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Applies ``masks`` (True/1 = keep), keyed like ``model.named_parameters()``.

    Parameters that are already pruned (by fastprune or by ``torch.nn.utils.prune``)
    get their mask replaced in place; others are reparametrised as torch does. All
    keys and shapes are checked before anything changes.
    """
    resolved = []
    for name, mask in masks.items():
        module, tensor_name = split_param_name(model, name)
        current = getattr(module, tensor_name, None)
        if not isinstance(current, torch.Tensor):
            raise KeyError(f"{name!r} does not name a parameter of the model")
        if mask.shape != current.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(current.shape)}")
        resolved.append((module, tensor_name, mask))
    with torch.no_grad():
        for module, tensor_name, mask in resolved:
            _apply_one(module, tensor_name, mask)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Makes pruning permanent: every pruned tensor becomes a plain parameter holding
    ``orig * mask`` (``torch.nn.utils.prune.remove`` on each)."""
    for module in model.modules():
        for name in pruned_names(module):
            torch_prune.remove(module, name)
    return model


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Loads a state dict saved from a pruned model into an unpruned (or pruned) copy.

    ``load_state_dict`` alone fails on an unpruned model because ``weight_orig`` /
    ``weight_mask`` keys do not exist yet; this applies the saved masks first.
    """
    masks = {k[: -len("_mask")]: v for k, v in state_dict.items()
             if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in state_dict}
    apply_masks(model, masks)
    result = model.load_state_dict(state_dict, strict=strict)
    with torch.no_grad():  # the masked weights torch's hook keeps, until the next forward
        for name in masks:
            refresh_masked(*split_param_name(model, name))
    return result
