"""The compiled op library: loads ``fastprune._C`` and wraps ``torch.ops.fastprune``.

Importing ``fastprune._C`` registers the ops with the dispatcher. Fake kernels
registered here let the ops trace under ``torch.compile``.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastprune.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "fastprune's compiled op library (fastprune._C) is missing or failed to load: "
        f"{exc}. Build it from the repository root with `make build` or "
        "`pip install --no-build-isolation -e .` (torch must be installed first)."
    ) from exc

__all__ = ["kth_smallest", "has_cuda_kernels"]


@torch.library.register_fake("fastprune::kth_smallest")
def _kth_smallest_fake(tensors, k):
    torch._check(len(tensors) > 0, lambda: "kth_smallest: got an empty list of tensors")
    ref = tensors[0]
    return ref.new_empty(()), ref.new_empty((), dtype=torch.long)


def kth_smallest(tensors: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int]:
    """Exact ``k``-th smallest value (1-based) over all elements of ``tensors``.

    Equivalent to ``torch.cat([t.flatten() for t in tensors]).kthvalue(k)`` without
    building the concatenation (radix select, a few streaming passes). Returns the
    value as a 0-dim tensor and the number of elements strictly smaller than it, so
    callers can break ties deterministically. NaN, an empty list, mixed dtypes or
    devices and ``k`` outside ``[1, numel]`` raise ``RuntimeError``.
    """
    value, num_less = torch.ops.fastprune.kth_smallest(list(tensors), int(k))
    return value, int(num_less)


def has_cuda_kernels() -> bool:
    """True when the op library was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastprune::kth_smallest", "CUDA")
