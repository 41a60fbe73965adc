"""``fastprune.sparsity_report``: how sparse a model is, per tensor and overall."""
from __future__ import annotations

import torch
from torch import nn

from .masks import get_mask, trainable
from .sparse.convert import CONVERTED
from .targets import DEFAULT_PRUNABLE, has_weight, select_modules

__all__ = ["sparsity_report"]


def sparsity_report(model: nn.Module, modules=None, print_table: bool = True) -> dict:
    """Per-tensor and global sparsity of the prunable weights.

    A pruned tensor's sparsity comes from its mask; an unpruned one's from its
    exact zeros (e.g. after :func:`fastprune.remove_masks`); a layer that
    :func:`fastprune.sparse.to_sparse` converted counts with its stored pattern, and
    a tied Parameter once. ``modules`` selects as in :func:`fastprune.prune`. Returns
    ``{"layers": {name: {"numel", "nonzero", "sparsity"}}, "global": {...}}`` and,
    with ``print_table``, prints it as a table.
    """
    if modules is None:
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, CONVERTED) or (isinstance(m, DEFAULT_PRUNABLE) and has_weight(m))]
    else:
        chosen = list(select_modules(model, modules, lambda m: isinstance(m, CONVERTED) or has_weight(m),
                                     "weight parameter or sparse pattern").items())
    if not chosen:
        raise ValueError("no prunable weights found: the model has no Linear/Conv weight (or none matched "
                         "modules=); name the modules with modules=[...]")
    layers, seen = {}, set()
    for n, m in chosen:
        if isinstance(m, CONVERTED):
            kept = m.weight_mask()
        else:
            param = trainable(m, "weight")
            if id(param) in seen:  # a tied Parameter counts once, under its first name
                continue
            seen.add(id(param))
            mask = get_mask(m, "weight")
            kept = mask if mask is not None else param
        numel, nonzero = kept.numel(), int(torch.count_nonzero(kept))
        layers[f"{n}.weight" if n else "weight"] = {"numel": numel, "nonzero": nonzero,
                                                    "sparsity": 1.0 - nonzero / numel}
    numel = sum(v["numel"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    report = {"layers": layers, "global": {"numel": numel, "nonzero": nonzero, "sparsity": 1.0 - nonzero / numel}}
    if print_table:
        width = max(len("global"), *(len(n) for n in layers))
        print(f"{'tensor':<{width}}  {'numel':>10}  {'nonzero':>10}  {'sparsity':>8}")
        for name, row in [*layers.items(), ("global", report["global"])]:
            print(f"{name:<{width}}  {row['numel']:>10}  {row['nonzero']:>10}  {row['sparsity']:>8.2%}")
    return report
