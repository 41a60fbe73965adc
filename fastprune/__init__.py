"""fastprune: fast, exact pruning for PyTorch.

Quick start::

    import fastprune
    masks = fastprune.prune(model, fastprune.criteria.Magnitude(), sparsity=0.9)
    fastprune.sparsity_report(model)
    fastprune.remove_masks(model)  # make it permanent
"""
from . import _ops, criteria, loops, optim, schedules, sparse  # noqa: F401  (_ops loads the op library, failing clearly if it is missing)
from ._ops import empty_cache, kth_smallest
from .blocks import FisherBlocks, per_sample_gradients
from .fisher import fisher_diag
from .masks import apply_masks, load_pruned_state_dict, remove_masks
from .pruning import Pruner, geometric_schedule, prune
from .report import sparsity_report
from .targets import find_targets

__version__ = "0.1.0"
__all__ = ["prune", "Pruner", "optim", "schedules", "loops", "sparse", "fisher_diag", "FisherBlocks", "per_sample_gradients", "criteria", "apply_masks", "remove_masks", "load_pruned_state_dict", "sparsity_report",
           "find_targets", "geometric_schedule", "kth_smallest", "empty_cache"]
