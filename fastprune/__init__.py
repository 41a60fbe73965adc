"""fastprune: fast, exact pruning for PyTorch.

Quick start::

    import fastprune
    masks = fastprune.prune(model, fastprune.criteria.Magnitude(), sparsity=0.9)
    fastprune.sparsity_report(model)
    fastprune.remove_masks(model)  # make it permanent

The package, by responsibility: ``stats`` (per-sample statistics), ``second_order``
(inverse Fisher, OBS), ``criteria``, ``training`` (optimizers, schedules, loops),
``sparse`` (sparse execution and storage) and ``bench`` (the benchmark harness); the
pruning loop itself is ``pruning``, ``masks``, ``targets`` and ``select``.
"""
import sys

from . import _ops, criteria, sparse, training  # noqa: F401  (_ops loads the op library, failing clearly if it is missing)
from ._ops import cpu_isa, empty_cache, kth_smallest
from .errors import NonFiniteError
from .masks import apply_masks, load_pruned_state_dict, remove_masks
from .pruning import Pruner, geometric_schedule, prune
from .report import sparsity_report
from .second_order import inverse
from .stats import FisherBlocks, FisherCollector, fisher_diag, per_sample_gradients
from .targets import find_targets
from .training import loops, optim, schedules

# The import paths users have: ``fastprune.optim``, ``.schedules``, ``.loops`` and the
# README's ``fastprune.inverse`` name the modules that now live in subpackages.
for _module in (optim, schedules, loops, inverse):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
del _module

__version__ = "0.1.0"
__all__ = ["prune", "Pruner", "optim", "schedules", "loops", "sparse", "fisher_diag", "FisherCollector", "FisherBlocks", "per_sample_gradients", "criteria", "apply_masks", "remove_masks", "load_pruned_state_dict", "sparsity_report",
           "find_targets", "geometric_schedule", "kth_smallest", "empty_cache", "cpu_isa", "NonFiniteError"]
