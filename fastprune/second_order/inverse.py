"""Blocked inverse of the damped empirical Fisher, dense or low-rank.

For a tensor with P weights split into blocks of B consecutive entries of
``weight.flatten()`` (the last block zero-padded), the Fisher of block b is
F_b = damp I + (1/N) sum_n g_n[b] g_n[b]^T. :class:`FisherInverse` holds every
F_b^-1 in one of two exact forms:

* dense (N >= B, or blocks from :class:`fastprune.FisherBlocks`): the explicit
  inverses from one batched Cholesky;
* low-rank (N < B, e.g. a whole layer as one block): W = L^-1 G with
  L L^T = N damp I + G G^T, so F_b^-1 = (I - W^T W) / damp and the B x B matrix is
  never formed; diagonals and products cost O(N B) per block (the M-FAC idea).

Pruned weights have zero gradients, so their rows of F are damp * e_q and
F^-1 acts on them as 1 / damp. Given ``alive``, only the alive weights of each
block are kept ("slots", padded to the fullest block), which makes late steps of
a multi-step run much cheaper while staying exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ops
from ..errors import check_finite
from ..memory import check_budget
from ..profiling import phase
from ..validate import integer, real

__all__ = ["FisherInverse", "first_true"]

_NONFINITE_HINT = "check the model, data and loss for overflow"


def check_damp(damp) -> float:
    return real(damp, "damp", 0, low_open=True, hint=" (damp must be a positive number: it keeps F invertible; "
                "WoodFisher uses 1e-5)")


def _blocked(v: torch.Tensor, nb: int, b: int) -> torch.Tensor:
    """(numel, m) -> (nb, B, m), zero-padded."""
    pad = nb * b - v.shape[0]
    return (F.pad(v, (0, 0, 0, pad)) if pad else v).reshape(nb, b, v.shape[1])


def first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bool (nb, B) mask: ``index`` (nb, K) listing each row's True positions
    first (in order, K = the largest count; the remaining entries are False
    positions) and ``valid`` (nb, K), True where ``index`` points at a True."""
    counts = mask.sum(1)
    k = int(counts.max()) if mask.numel() else 0
    index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return index, torch.arange(k, device=mask.device) < counts.unsqueeze(1)


class FisherInverse:
    """F_b^-1 for every block of one tensor of ``numel`` weights (see the module doc).

    Build it with :meth:`from_blocks` or :meth:`from_grads`; then :meth:`diag` gives
    diag(F^-1) and :meth:`mul` gives F^-1 v, both over the flattened tensor.
    """

    def __init__(self, numel: int, block_size: int, damp: float, slots: tuple[torch.Tensor, torch.Tensor], *,
                 inverse: torch.Tensor | None = None, factor: torch.Tensor | None = None):
        self.numel, self.block_size, self.damp = numel, block_size, damp
        self.index, self.valid = slots  # (nb, K): the block positions held in the K slots, and which are alive
        self.inverse, self.factor = inverse, factor  # exactly one is set, in slot coordinates
        self._diag: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    @property
    def lowrank(self) -> bool:
        return self.factor is not None

    @property
    def dtype(self) -> torch.dtype:
        return (self.factor if self.lowrank else self.inverse).dtype

    @staticmethod
    def slots(numel: int, block_size: int, alive: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid) of the alive weights of each block (all weights when ``alive`` is None)."""
        nb = math.ceil(numel / block_size)
        flat = torch.ones(numel, dtype=torch.bool, device=device) if alive is None else alive.flatten().bool()
        return first_true(F.pad(flat, (0, nb * block_size - numel)).view(nb, block_size))

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, damp: float, numel: int, block_size: int | None = None,
                    slots: tuple[torch.Tensor, torch.Tensor] | None = None, max_memory: int | None = None
                    ) -> "FisherInverse":
        """From mean outer products ``blocks`` (num_blocks, B, B), e.g.
        ``FisherBlocks.blocks(name)``, or (num_blocks, K, K) over the ``slots``
        returned by :meth:`slots` (then pass ``block_size``)."""
        damp = check_damp(damp)
        b = blocks.shape[-1] if block_size is None else block_size
        nb = math.ceil(numel / b)
        if slots is None:
            slots = cls.slots(numel, b, None, blocks.device)
        index, valid = slots
        k = index.shape[1]
        if blocks.dim() != 3 or tuple(blocks.shape) != (nb, k, k):
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not tile {numel} weights in blocks of "
                             f"{b}; expected ({nb}, {k}, {k})")
        check_budget(3 * blocks.numel() * blocks.element_size(), max_memory, blocks.device,
                      f"inverting {nb} Fisher blocks of {k} x {k}", "use a smaller block_size")
        check_finite([("blocks", blocks)], "non-finite Fisher blocks", _NONFINITE_HINT)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        with phase("inverse"):
            return cls(numel, b, damp, slots, inverse=_ops.fisher_inverse(blocks * both, damp))

    @classmethod
    def from_grads(cls, grads: torch.Tensor, damp: float, block_size: int | None = None,
                   alive: torch.Tensor | None = None, max_memory: int | None = None) -> "FisherInverse":
        """From gradients ``grads`` (N, numel). ``block_size=None`` makes the whole
        tensor one block; ``alive`` (bool, numel) restricts the work to unpruned
        weights. Uses the low-rank form when N < block size, else dense."""
        damp = check_damp(damp)
        if grads.dim() != 2 or grads.shape[0] == 0:
            raise ValueError(f"grads must be (N, numel) with N >= 1, got shape {tuple(grads.shape)}")
        if block_size is not None:
            block_size = integer(block_size, "block_size", 1, hint=" (or None for whole-tensor blocks)")
        check_finite([("grads", grads)], "non-finite gradients", _NONFINITE_HINT)
        n, numel = grads.shape
        b = numel if block_size is None else min(block_size, numel)
        nb = math.ceil(numel / b)
        acc = _ops.acc_dtype(grads.dtype)
        index, valid = cls.slots(numel, b, alive, grads.device)
        k = index.shape[1]
        per_block = cls.gather_slots(grads.to(acc), b, index, valid)  # (nb, N, K)
        size = acc.itemsize
        if n < k:
            check_budget(size * nb * (2 * n * k + 2 * n * n), max_memory, grads.device,
                          f"the low-rank inverse of {nb} block(s) of {k} from {n} gradients",
                          "use fewer gradients or a smaller block_size")
            with phase("inverse"):
                return cls(numel, b, damp, (index, valid), factor=_ops.lowrank_factor(per_block, damp))
        check_budget(size * nb * k * k * 3, max_memory, grads.device, f"inverting {nb} Fisher blocks of {k} x {k}",
                      "use a smaller block_size, or fewer gradients than block_size for the low-rank path")
        with phase("inverse"):
            blocks = torch.bmm(per_block.transpose(1, 2), per_block).div_(n)
            return cls(numel, b, damp, (index, valid), inverse=_ops.fisher_inverse(blocks, damp))

    @staticmethod
    def gather_slots(grads: torch.Tensor, block_size: int, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Gradients (N, numel) -> (nb, N, K) at the slots, zero in invalid slots."""
        nb, k = index.shape
        g = _blocked(grads.T, nb, block_size)  # (nb, B, N)
        # The slots are the block positions in order only when every weight is alive; with
        # any pruned weight (even with a full slot count) alive positions come first.
        if k < block_size or not bool(valid.all()):
            g = g.gather(1, index.unsqueeze(2).expand(-1, -1, g.shape[2])) * valid.unsqueeze(2)
        return g.transpose(1, 2)

    def _apply(self, vs: torch.Tensor) -> torch.Tensor:
        """F^-1 in slot coordinates on (nb, K, m)."""
        if self.lowrank:
            w = self.factor
            return (vs - w.transpose(1, 2) @ (w @ vs)) / self.damp
        return self.inverse @ vs

    def diag(self) -> torch.Tensor:
        """diag(F^-1) over the flattened tensor, (numel,)."""
        if self._diag is None:
            if self.lowrank:
                w = self.factor
                d = (1.0 - (w * w).sum(1)) / self.damp  # w * w: one pass, unlike square() on CPU
            else:
                d = self.inverse.diagonal(0, 1, 2)
            full = torch.full((self.num_blocks, self.block_size), 1.0 / self.damp, dtype=d.dtype, device=d.device)
            self._diag = full.scatter_(1, self.index, d).reshape(-1)[: self.numel]
        return self._diag

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v blockwise for v of shape (numel,) or (numel, m)."""
        one = v.dim() == 1
        vb = _blocked(v.to(self.dtype).reshape(self.numel, -1), self.num_blocks, self.block_size)
        idx = self.index.unsqueeze(2).expand(-1, -1, vb.shape[2])
        out = (vb / self.damp).scatter_(1, idx, self._apply(vb.gather(1, idx)))
        out = out.reshape(-1, vb.shape[2])[: self.numel]
        return out[:, 0] if one else out

    def columns(self, positions: torch.Tensor) -> torch.Tensor:
        """Columns of each block's F_b^-1 at alive ``positions`` (num_blocks, Q) within
        the block; returns (num_blocks, B, Q). Entries of ``positions`` that are not
        alive give unspecified columns (callers mask them)."""
        nb, b, k = self.num_blocks, self.block_size, self.index.shape[1]
        slot_of = torch.zeros(nb, b, dtype=torch.long, device=self.index.device)
        slot_of.scatter_(1, self.index, torch.arange(k, device=self.index.device).expand(nb, -1))
        slots = slot_of.gather(1, positions)  # (nb, Q)
        if self.lowrank:
            w = self.factor
            eye = torch.zeros(nb, k, slots.shape[1], dtype=w.dtype, device=w.device)
            eye.scatter_(1, slots.unsqueeze(1), 1.0)
            cols = (eye - w.transpose(1, 2) @ w.gather(2, slots.unsqueeze(1).expand(-1, w.shape[1], -1))) / self.damp
        else:
            cols = self.inverse.gather(2, slots.unsqueeze(1).expand(-1, k, -1))  # (nb, K, Q)
        out = torch.zeros(nb, b, slots.shape[1], dtype=cols.dtype, device=cols.device)
        return out.scatter_(1, self.index.unsqueeze(2).expand(-1, -1, slots.shape[1]), cols)
