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
           "split_param_name", "refresh_masked", "trainable", "MaskedWeight", "masked_value", "uses_of", "unprune", "check_binary"]


class MaskedWeight(torch.Tensor):
    """The masked weight ``orig * mask`` the pruning hook sets before each forward. In
    every op it is a plain tensor (no torch-function override), but it deep-copies as
    its value: right after a forward with autograd on it is part of the graph, which
    ``copy.deepcopy`` refuses for a plain tensor (as it does with torch's own pruning)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        out = self.detach().clone().as_subclass(MaskedWeight)
        memo[id(self)] = out
        return out


def masked_value(module: nn.Module, name: str) -> torch.Tensor:
    """``<name>_orig * <name>_mask`` of ``module``, as the attribute the hook sets."""
    return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).as_subclass(MaskedWeight)


class FastpruneMask(torch_prune.BasePruningMethod):
    """The pruning hook fastprune registers; the mask itself is the ``<name>_mask`` buffer."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        # Masks are decided by fastprune.prune; re-applying keeps the stored one.
        return default_mask

    def apply_mask(self, module):
        return masked_value(module, self._tensor_name)


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


def check_binary(name: str, mask: torch.Tensor) -> None:
    """Refuses a mask with values other than 0 and 1 (a soft mask: 0.5 would scale the
    weight in torch's hook while fastprune counted it as kept)."""
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"the mask of {name!r} holds values other than 0 and 1 (e.g. {bad}); fastprune masks keep "
                         "(1/True) or prune (0/False) each weight. Binarise it first, e.g. mask > 0.5")


def trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    """The Parameter behind ``module.<name>``: ``<name>_orig`` once pruned, else ``<name>``."""
    orig = module._parameters.get(name + "_orig")
    return orig if orig is not None else module._parameters.get(name)


def uses_of(model: nn.Module, param: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every ``(module, name)`` of ``model`` whose parameter ``name`` (pruned or not) is
    ``param``: one entry normally, several for a tied or shared Parameter (an embedding
    tied to the output layer, one Parameter assigned to two layers)."""
    out = []
    for module in model.modules():
        for local in list(module._parameters):
            name = unmasked_name(module, local)
            if module._parameters[local] is param and (module, name) not in out:
                out.append((module, name))
    return out


def _bypass_parents(model: nn.Module) -> dict[int, nn.Module]:
    """Modules whose forward reads a child's weight directly instead of calling the
    child, so the child's pruning hook never runs: ``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to the functional attention. Keyed by the child's id."""
    return {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _refresh_children(parent: nn.Module, args) -> None:
    # Recomputes the bypassed child's masked weight with autograd on, as its own hook would.
    child = parent.out_proj
    for name in pruned_names(child):
        refresh_masked(child, name)


def refresh_masked(module: nn.Module, name: str) -> None:
    """Recomputes ``module.<name> = <name>_orig * <name>_mask`` now, as torch's pruning
    hook does before each forward (the attribute is stale after in-place changes)."""
    setattr(module, name, masked_value(module, name))


def _apply_one(uses: list[tuple[nn.Module, str]], mask: torch.Tensor, bypass: dict[int, nn.Module]) -> None:
    """Applies ``mask`` to one Parameter in every use: one mask buffer, shared by all."""
    shared = next((get_mask(m, n) for m, n in uses if get_mask(m, n) is not None), None)
    if shared is not None:
        shared.copy_(mask)
    else:
        shared = mask.to(device=uses[0][0]._parameters[uses[0][1]].device, dtype=torch.bool).clone()
    for module, name in uses:
        if get_mask(module, name) is None:
            orig = module._parameters[name]
            hook = FastpruneMask()
            hook._tensor_name = name
            # Same Parameter object under the new name, so optimizers keep tracking it.
            del module._parameters[name]
            module.register_parameter(name + "_orig", orig)
            module.register_buffer(name + "_mask", shared)
            module.register_forward_pre_hook(hook)
            parent = bypass.get(id(module))
            if parent is not None and not getattr(parent, "_fastprune_refreshes", False):
                parent.register_forward_pre_hook(_refresh_children)
                parent._fastprune_refreshes = True
        elif get_mask(module, name) is not shared:
            get_mask(module, name).copy_(mask)
        refresh_masked(module, name)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Applies ``masks`` (True/1 = keep), keyed like ``model.named_parameters()``.

    Parameters that are already pruned (by fastprune or by ``torch.nn.utils.prune``)
    get their mask replaced in place; others are reparametrised as torch does. All
    keys and shapes are checked before anything changes.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping {{name: mask}} keyed like named_parameters(), got "
                        f"{type(masks).__name__}")
    resolved = []
    for name, mask in masks.items():
        module, tensor_name = split_param_name(model, name)
        param = trainable(module, tensor_name)
        if param is None:
            kind = "is not a parameter" if isinstance(getattr(module, tensor_name, None), torch.Tensor) else \
                "does not name a parameter of the model"
            raise KeyError(f"{name!r} {kind}; only parameters can be pruned")
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        check_binary(name, mask)
        resolved.append((uses_of(model, param), mask))
    bypass = _bypass_parents(model)
    with torch.no_grad():
        for uses, mask in resolved:
            _apply_one(uses, mask, bypass)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Makes pruning permanent: every pruned tensor becomes a plain parameter holding
    ``orig * mask`` (``torch.nn.utils.prune.remove`` on each); a tied Parameter stays
    tied."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name in pruned_names(module):
            orig = module._parameters[name + "_orig"]
            if id(orig) not in done:
                done[id(orig)] = unprune(uses_of(model, orig))
    return model


def unprune(uses: list[tuple[nn.Module, str]]) -> nn.Parameter:
    """``torch.nn.utils.prune.remove`` on every use of one pruned Parameter, which then
    holds ``orig * mask`` and is the same new Parameter in every use (torch's remove
    alone would give each use its own copy)."""
    first, name = uses[0]
    torch_prune.remove(first, name)
    param = first._parameters[name]
    for module, local in uses[1:]:
        if get_mask(module, local) is not None:
            torch_prune.remove(module, local)
        module._parameters[local] = param
    return param


def _check_loadable(model: nn.Module, state_dict: Mapping[str, torch.Tensor], masks, strict: bool) -> None:
    """Every check load_pruned_state_dict needs, before anything changes: the keys the
    model will have once the masks are applied (missing or unexpected ones, with
    ``strict``), every shape, and binary masks. torch's load_state_dict alone copies
    what matches before it raises."""
    names_of: dict[int, list[str]] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(prefix)
    renamed = set()
    for name, mask in masks.items():
        module, local = split_param_name(model, name)
        param = trainable(module, local)
        if param is None:
            raise KeyError(f"the state dict prunes {name!r}, which is not a parameter of the model")
        check_binary(name, mask)
        renamed |= {f"{p}.{n}" if p else n for m, n in uses_of(model, param) if get_mask(m, n) is None
                    for p in names_of[id(m)]}
    expected = {}
    for key, value in model.state_dict(keep_vars=True).items():
        for k in ((key + "_orig", key + "_mask") if key in renamed else (key,)):
            expected[k] = tuple(value.shape)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"the state dict does not fit the model: missing {missing}, unexpected {unexpected}; pass "
                       "strict=False to load the keys that match")
    wrong = [f"{k}: {tuple(v.shape)} in the state dict, {expected[k]} in the model"
             for k, v in state_dict.items() if k in expected and tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"shapes differ, so nothing was loaded: {'; '.join(wrong)}")


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Loads a state dict saved from a pruned model into an unpruned (or pruned) copy.

    ``load_state_dict`` alone fails on an unpruned model because ``weight_orig`` /
    ``weight_mask`` keys do not exist yet; this applies the saved masks first. Keys,
    shapes and masks are checked first: a state dict that does not fit raises and
    leaves the model as it was.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, as model.state_dict() returns, got {type(state_dict).__name__}")
    masks = {k[: -len("_mask")]: v for k, v in state_dict.items()
             if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in state_dict}
    _check_loadable(model, state_dict, masks, strict)
    apply_masks(model, masks)
    result = model.load_state_dict(state_dict, strict=strict)
    with torch.no_grad():  # the masked weights torch's hook keeps, until the next forward
        for name in masks:
            refresh_masked(*split_param_name(model, name))
    return result
