"""``fastprune.sparsity_report``: how sparse a model is, per tensor and overall."""
from __future__ import annotations

import torch
from torch import nn

from .targets import find_targets

__all__ = ["sparsity_report"]


def sparsity_report(model: nn.Module, modules=None, print_table: bool = True) -> dict:
    """Per-tensor and global sparsity of the prunable weights.

    A pruned tensor's sparsity comes from its mask; an unpruned one's from its
    exact zeros (e.g. after :func:`fastprune.remove_masks`). Returns
    ``{"layers": {name: {"numel", "nonzero", "sparsity"}}, "global": {...}}`` and,
    with ``print_table``, prints it as a table.
    """
    layers = {}
    for t in find_targets(model, modules):
        kept = t.mask if t.mask is not None else t.weight
        nonzero = int(torch.count_nonzero(kept))
        layers[t.name] = {"numel": t.numel, "nonzero": nonzero, "sparsity": 1.0 - nonzero / t.numel}
    numel = sum(v["numel"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    report = {"layers": layers, "global": {"numel": numel, "nonzero": nonzero, "sparsity": 1.0 - nonzero / numel}}
    if print_table:
        width = max(len("global"), *(len(n) for n in layers))
        print(f"{'tensor':<{width}}  {'numel':>10}  {'nonzero':>10}  {'sparsity':>8}")
        for name, row in [*layers.items(), ("global", report["global"])]:
            print(f"{name:<{width}}  {row['numel']:>10}  {row['nonzero']:>10}  {row['sparsity']:>8.2%}")
    return report
