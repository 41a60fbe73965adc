"""torch.distributed support: statistics summed over the ranks of a process group.

Every statistic is a sum over samples, so each rank sums its own share and one
all-reduce gives every rank the sum over the union of the data: the single-process
result up to floating-point summation order. The default group is used when
torch.distributed is initialised; ``process_group=None`` elsewhere means that.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "all_reduce_sum", "all_gather_rows", "broadcast_from_first"]


def resolve_group(process_group=None):
    """The group to reduce over, or None when running as a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("a process_group was given but torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (torchrun does it for you)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sums each tensor over the ranks of ``group`` in place, with one collective per
    dtype (the tensors are packed into one flat buffer)."""
    if group is None or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """The rows of ``t`` from every rank of ``group``, concatenated in rank order
    (every rank holds the same number of rows)."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def broadcast_from_first(tensors: list[torch.Tensor], group) -> None:
    """Overwrites each tensor in place with its value on the group's first rank."""
    if group is None:
        return
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    for t in tensors:
        buf = t.to(torch.uint8) if t.dtype == torch.bool else t  # Gloo has no bool collectives
        dist.broadcast(buf, src=src, group=group)
        if buf is not t:
            t.copy_(buf.bool())
