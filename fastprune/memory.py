"""Memory budgets: the paths that allocate N x params or block-sized buffers check
their estimate against ``max_memory`` before allocating, so an oversized call
raises with the numbers instead of dying in the allocator."""
from __future__ import annotations

import torch

__all__ = ["default_max_memory", "check_budget"]


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


def check_budget(need: int, max_memory: int | None, device: torch.device, what: str, hint: str) -> None:
    """Raises MemoryError, naming ``what``, the numbers and ``hint``, when ``need`` bytes
    exceed ``max_memory`` (default :func:`default_max_memory`)."""
    budget = default_max_memory(device) if max_memory is None else max_memory
    if need > budget:
        raise MemoryError(f"{what} needs about {need / 2**20:.0f} MiB but max_memory allows "
                          f"{budget / 2**20:.0f} MiB; {hint}, or raise max_memory")
