"""Blocked inverse of the damped empirical Fisher, dense or low-rank.

For a tensor with P weights split into blocks of B consecutive entries of
``weight.flatten()`` (the last block zero-padded), the Fisher of block b is
F_b = damp I + (1/N) sum_n g_n[b] g_n[b]^T. :class:`FisherInverse` holds every
F_b^-1 in one of two exact forms:

* dense (N >= B, or blocks from :class:`fastprune.FisherBlocks`): the explicit
  (num_blocks, B, B) inverses from one batched Cholesky;
* low-rank (N < B, e.g. a whole layer as one block): W = L^-1 G with
  L L^T = N damp I + G G^T, so F_b^-1 = (I - W^T W) / damp and the B x B matrix is
  never formed; diagonals and products cost O(N B) per block (the M-FAC idea).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ops

__all__ = ["FisherInverse", "default_max_memory"]


def default_max_memory(device: torch.device) -> int:
    """Half of the free device memory (CUDA) or of the available RAM (CPU), in bytes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):  # not Linux: assume 8 GiB free
        return 4 << 30


def _check_budget(need: int, max_memory: int | None, device: torch.device, what: str, hint: str) -> None:
    budget = default_max_memory(device) if max_memory is None else max_memory
    if need > budget:
        raise MemoryError(f"{what} needs about {need / 2**20:.0f} MiB but max_memory allows "
                          f"{budget / 2**20:.0f} MiB; {hint}, or raise max_memory")


def _pad_last(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pads the last dim by ``pad`` (no copy when there is nothing to pad)."""
    return F.pad(t, (0, pad)) if pad else t


def _check_damp(damp) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a positive number, got {damp!r} (it keeps F invertible; "
                         "WoodFisher uses 1e-5)")
    return float(damp)


class FisherInverse:
    """F_b^-1 for every block of one tensor of ``numel`` weights (see the module doc).

    Build it with :meth:`from_blocks` or :meth:`from_grads`; then :meth:`diag` gives
    diag(F^-1) and :meth:`mul` gives F^-1 v, both over the flattened tensor.
    """

    def __init__(self, numel: int, block_size: int, damp: float, *, inverse: torch.Tensor | None = None,
                 factor: torch.Tensor | None = None):
        self.numel, self.block_size, self.damp = numel, block_size, damp
        self.inverse, self.factor = inverse, factor  # exactly one is set
        self._diag: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    @property
    def lowrank(self) -> bool:
        return self.factor is not None

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, damp: float, numel: int, max_memory: int | None = None
                    ) -> "FisherInverse":
        """From mean outer products ``blocks`` (num_blocks, B, B), e.g. ``FisherBlocks.blocks(name)``."""
        damp = _check_damp(damp)
        nb, b = blocks.shape[0], blocks.shape[-1]
        if blocks.dim() != 3 or blocks.shape[1] != b or nb != math.ceil(numel / b):
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not tile {numel} weights in blocks of "
                             f"{b}; expected ({math.ceil(numel / b)}, {b}, {b})")
        _check_budget(3 * blocks.numel() * blocks.element_size(), max_memory, blocks.device,
                      f"inverting {nb} Fisher blocks of {b} x {b}", "use a smaller block_size")
        return cls(numel, b, damp, inverse=_ops.fisher_inverse(blocks, damp))

    @classmethod
    def from_grads(cls, grads: torch.Tensor, damp: float, block_size: int | None = None,
                   max_memory: int | None = None) -> "FisherInverse":
        """From gradients ``grads`` (N, numel). ``block_size=None`` makes the whole
        tensor one block. Uses the low-rank form when N < block size, else dense."""
        damp = _check_damp(damp)
        if grads.dim() != 2 or grads.shape[0] == 0:
            raise ValueError(f"grads must be (N, numel) with N >= 1, got shape {tuple(grads.shape)}")
        n, numel = grads.shape
        b = numel if block_size is None else min(block_size, numel)
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        nb = math.ceil(numel / b)
        acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
        size = torch.finfo(acc).bits // 8
        per_block = _pad_last(grads.to(acc), nb * b - numel).view(n, nb, b).transpose(0, 1)  # (nb, N, B)
        if n < b:
            _check_budget(size * nb * (2 * n * b + 2 * n * n), max_memory, grads.device,
                          f"the low-rank inverse of {nb} block(s) of {b} from {n} gradients",
                          "use fewer gradients or a smaller block_size")
            return cls(numel, b, damp, factor=_ops.lowrank_factor(per_block, damp))
        _check_budget(size * nb * b * b * 3, max_memory, grads.device,
                      f"inverting {nb} Fisher blocks of {b} x {b}",
                      "use a smaller block_size, or fewer gradients than block_size for the low-rank path")
        blocks = torch.bmm(per_block.transpose(1, 2), per_block).div_(n)
        return cls(numel, b, damp, inverse=_ops.fisher_inverse(blocks, damp))

    def update(self, grads: torch.Tensor, scale: float) -> None:
        """Dense form only: F_b += scale * sum_m g_m[b] g_m[b]^T for new gradients
        ``grads`` (M, numel), refreshing F^-1 by Woodbury instead of re-inverting."""
        if self.lowrank:
            raise ValueError("update() refreshes the dense form; rebuild a low-rank inverse with from_grads")
        per_block = self._blocked(grads.to(self.inverse.dtype).T).permute(0, 2, 1)  # (nb, M, B)
        self.inverse = _ops.woodbury_update(self.inverse, per_block.contiguous(), float(scale))
        self._diag = None

    def _blocked(self, v: torch.Tensor) -> torch.Tensor:
        """(numel, m) -> (num_blocks, B, m), zero-padded."""
        nb, b = self.num_blocks, self.block_size
        pad = nb * b - self.numel
        return (F.pad(v, (0, 0, 0, pad)) if pad else v).reshape(nb, b, v.shape[1])

    def diag(self) -> torch.Tensor:
        """diag(F^-1) over the flattened tensor, (numel,)."""
        if self._diag is None:
            if self.lowrank:
                w = self.factor
                d = (1.0 - (w * w).sum(1)) / self.damp  # w * w: a single pass, unlike square() on CPU
            else:
                d = self.inverse.diagonal(0, 1, 2)
            self._diag = d.reshape(-1)[: self.numel]
        return self._diag

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v blockwise for v of shape (numel,) or (numel, m)."""
        one = v.dim() == 1
        dtype = (self.factor if self.lowrank else self.inverse).dtype
        vb = self._blocked(v.to(dtype).reshape(self.numel, -1))
        if self.lowrank:
            w = self.factor
            out = (vb - w.transpose(1, 2) @ (w @ vb)) / self.damp
        else:
            out = self.inverse @ vb
        out = out.reshape(-1, vb.shape[2])[: self.numel]
        return out[:, 0] if one else out

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """Columns of each block's F_b^-1: ``index`` (num_blocks, K) holds positions
        within the block; returns (num_blocks, B, K)."""
        if self.lowrank:
            w = self.factor
            wq = w.gather(2, index.unsqueeze(1).expand(-1, w.shape[1], -1))  # (nb, N, K)
            eye = torch.zeros(w.shape[0], w.shape[2], index.shape[1], dtype=w.dtype, device=w.device)
            eye.scatter_(1, index.unsqueeze(1), 1.0)
            return (eye - w.transpose(1, 2) @ wq) / self.damp
        inv = self.inverse
        return inv.gather(2, index.unsqueeze(1).expand(-1, inv.shape[1], -1))
