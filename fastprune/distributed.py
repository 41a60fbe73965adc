"""torch.distributed support: statistics summed over the ranks of a process group.

Every statistic is a sum over samples, so each rank sums its own share and one
all-reduce gives every rank the sum over the union of the data: the single-process
result up to floating-point summation order. The default group is used when
torch.distributed is initialised; ``process_group=None`` elsewhere means that.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "all_reduce_sum", "all_gather_rows", "broadcast_from_first", "block_spans",
           "exchange_columns", "all_gather_spans"]


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


def block_spans(numel: int, block_size: int, world: int) -> list[tuple[int, int]]:
    """Splits the ``ceil(numel / block_size)`` blocks of a flattened tensor into ``world``
    contiguous shares as even as possible; returns each share's [start, stop) in weights
    (a share may be empty when there are fewer blocks than ranks)."""
    nb = math.ceil(numel / block_size)
    bounds = [r * (nb // world) + min(r, nb % world) for r in range(world + 1)]
    return [(min(lo * block_size, numel), min(hi * block_size, numel)) for lo, hi in zip(bounds, bounds[1:])]


def exchange_columns(mats: list[torch.Tensor], spans: list[list[tuple[int, int]]], group
                     ) -> list[list[torch.Tensor]]:
    """Each rank sends rank r the columns ``spans[i][r]`` of its ``mats[i]`` (rows =
    samples, the same count on every rank); returns, for each source rank in order,
    the list over ``i`` of this rank's columns of that rank's rows. One all-to-all
    moves each entry once, to the rank that owns its block."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    widths = [sum(s[r][1] - s[r][0] for s in spans) for r in range(world)]
    rows = mats[0].shape[0]
    send = []
    for r in range(world):
        # Gloo's all-to-all takes equal sizes only: every share is padded to the widest.
        buf = mats[0].new_zeros(rows, max(widths))
        torch.cat([m[:, s[r][0]: s[r][1]] for m, s in zip(mats, spans)], 1, out=buf[:, : widths[r]])
        send.append(buf)
    recv = [torch.empty_like(send[0]) for _ in range(world)]
    dist.all_to_all(recv, send, group=group)
    del send
    mine = [s[rank][1] - s[rank][0] for s in spans]
    return [list(part[:, : widths[rank]].split(mine, dim=1)) for part in recv]


def all_gather_spans(shares: list[torch.Tensor], spans: list[list[tuple[int, int]]], group) -> list[torch.Tensor]:
    """Inverse of sharding flat vectors by ``spans``: this rank holds ``shares[i]``, the
    entries ``spans[i][rank]`` of vector ``i``; every rank gets the whole vectors
    (one all-gather over a packed, padded buffer)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [sum(s[r][1] - s[r][0] for s in spans) for r in range(world)]
    flat = torch.cat([t.reshape(-1) for t in shares]) if shares else torch.zeros(0)
    buf = torch.nn.functional.pad(flat, (0, max(sizes) - sizes[rank]))
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    pieces = [p[:n].split([s[r][1] - s[r][0] for s in spans]) for r, (p, n) in enumerate(zip(parts, sizes))]
    return [torch.cat([pieces[r][i] for r in range(world)]) for i in range(len(spans))]
