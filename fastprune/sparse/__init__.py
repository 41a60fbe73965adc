"""Sparse execution and storage of pruned models.

``to_sparse`` swaps pruned Linear/Conv2d layers for :class:`SparseLinear` /
:class:`SparseConv2d` where a calibration run shows them faster, and the rest for
:class:`FrozenLinear` / :class:`FrozenConv2d` (masked weight stored once); on CUDA,
2:4-pruned Linear layers may become :class:`SemiStructuredLinear`. ``to_dense``
reverts; ``save_sparse`` / ``load_sparse`` store only the kept weights.
"""
from .convert import LayerChoice, SparseReport, to_dense, to_sparse
from .frozen import FrozenConv2d, FrozenLinear
from .layers import CSRWeight, SparseConv2d, SparseLinear
from .semi import SemiStructuredLinear, is_two_four
from .storage import load_sparse, save_sparse

__all__ = ["to_sparse", "to_dense", "SparseReport", "LayerChoice", "SparseLinear", "SparseConv2d", "CSRWeight",
           "FrozenLinear", "FrozenConv2d", "SemiStructuredLinear", "is_two_four",
           "save_sparse", "load_sparse"]
