"""Compact files for pruned models: kept values plus a bitmask or indices, in safetensors."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..masks import apply_masks, get_mask, pruned_names, split_param_name, trainable
from .convert import CONVERTED

__all__ = ["save_sparse", "load_sparse"]

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return ((packed.unsqueeze(1) & _BITS) != 0).flatten()[:numel]


def _pruned_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight key: (values of the masked weight, mask)} over masked and sparse layers."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, CONVERTED):
            out[prefix + "weight"] = (module.dense_weight(), module.weight_mask())
            continue
        for local in pruned_names(module):
            mask = get_mask(module, local)
            out[prefix + local] = (getattr(module, local + "_orig").detach() * mask, mask.bool())
    return out


def save_sparse(model: nn.Module, path: str | os.PathLike) -> dict:
    """Writes ``model``'s weights to a safetensors file, each pruned tensor as its kept
    values plus either a bitmask (1 bit per weight) or int32 indices (4 bytes per
    kept weight), whichever is smaller; every other tensor is stored as is.

    Works for models pruned with masks and for models converted by
    :func:`~fastprune.sparse.to_sparse`. Returns a size report:
    ``{"file_bytes", "dense_bytes", "ratio", "encodings": {key: "bitmask"|"indices"}}``
    where ``dense_bytes`` is what the dense weights would take.
    """
    from safetensors.torch import save_file

    pruned = _pruned_tensors(model)
    tensors, meta, dense_bytes = {}, {}, 0
    skip = {f"{k}_orig" for k in pruned} | {f"{k}_mask" for k in pruned}
    # Converted modules' own entries (CSR arrays, frozen weight and pattern) are in the compact form.
    skip |= {(f"{n}." if n else "") + k for n, m in model.named_modules() if isinstance(m, CONVERTED)
             for k in m._compact_keys}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        tensors[key] = value.detach().contiguous().cpu()
        dense_bytes += value.numel() * value.element_size()
    for key, (weight, mask) in pruned.items():
        values = weight[mask].contiguous().cpu()
        bitmask_bytes, index_bytes = -(-mask.numel() // 8), 4 * values.numel()
        encoding = "bitmask" if bitmask_bytes <= index_bytes else "indices"
        tensors[f"{key}::values"] = values
        tensors[f"{key}::{encoding}"] = _pack_bits(mask.cpu()) if encoding == "bitmask" else \
            mask.flatten().nonzero().squeeze(1).to(torch.int32).cpu()
        meta[key] = {"encoding": encoding, "shape": list(mask.shape)}
        dense_bytes += weight.numel() * weight.element_size()
    save_file(tensors, os.fspath(path), metadata={"fastprune": json.dumps(meta)})
    file_bytes = os.path.getsize(path)
    return {"file_bytes": file_bytes, "dense_bytes": dense_bytes, "ratio": file_bytes / max(dense_bytes, 1),
            "encodings": {k: v["encoding"] for k, v in meta.items()}}


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Loads a file written by :func:`save_sparse` into ``model`` (the dense
    architecture: plain, or already pruned) and returns it pruned: each stored
    tensor's mask is applied (``weight_orig`` / ``weight_mask``) and its kept values
    restored exactly. Entries of ``weight_orig`` outside the mask are set to 0.
    Call :func:`~fastprune.sparse.to_sparse` afterwards for sparse execution."""
    from safetensors import safe_open

    if any(isinstance(m, CONVERTED) for m in model.modules()):
        raise ValueError("load_sparse needs the dense architecture; call fastprune.sparse.to_dense(model) first")
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
        if "fastprune" not in raw:
            raise ValueError(f"{os.fspath(path)!r} was not written by fastprune.sparse.save_sparse")
        meta = json.loads(raw["fastprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    masks, weights = {}, {}
    for key, info in meta.items():
        shape, numel = info["shape"], 1
        for s in shape:
            numel *= s
        if info["encoding"] == "bitmask":
            mask = _unpack_bits(tensors.pop(f"{key}::bitmask"), numel)
        else:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[tensors.pop(f"{key}::indices").long()] = True
        mask = mask.view(shape)
        values = tensors.pop(f"{key}::values")
        weight = values.new_zeros(shape)
        weight[mask] = values
        masks[key], weights[key] = mask, weight
    # Checked before anything changes: a failed load leaves the model as it was.
    expected = set(model.state_dict()) - {f"{k}{suffix}" for k in masks for suffix in ("", "_orig", "_mask")}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise KeyError(f"file and model disagree: the file lacks {sorted(missing)} and has extra {sorted(unexpected)}")
    current = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in the file, {tuple(current[k].shape)} in the model" for k, v in tensors.items()
             if tuple(v.shape) != tuple(current[k].shape)]
    for key, weight in weights.items():
        param = trainable(*split_param_name(model, key))
        if param is None or param.shape != weight.shape:
            wrong.append(f"{key}: {tuple(weight.shape)} in the file, "
                         f"{None if param is None else tuple(param.shape)} in the model")
    if wrong:
        raise ValueError(f"file and model disagree, so nothing was loaded: {'; '.join(wrong)}")
    apply_masks(model, masks)
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for key, value in tensors.items():
            state[key].copy_(value)
        for key, weight in weights.items():
            module, local = split_param_name(model, key)
            getattr(module, local + "_orig").copy_(weight)
            setattr(module, local, getattr(module, local + "_orig") * getattr(module, local + "_mask"))
    return model
