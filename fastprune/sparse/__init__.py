"""Sparse execution and storage of pruned models.

``to_sparse`` swaps pruned Linear/Conv2d layers for :class:`SparseLinear` /
:class:`SparseConv2d` where a calibration run shows them faster; ``to_dense``
reverts; ``save_sparse`` / ``load_sparse`` store only the kept weights.
"""
from .convert import LayerChoice, SparseReport, to_dense, to_sparse
from .layers import CSRWeight, SparseConv2d, SparseLinear
from .storage import load_sparse, save_sparse

__all__ = ["to_sparse", "to_dense", "SparseReport", "LayerChoice", "SparseLinear", "SparseConv2d", "CSRWeight",
           "save_sparse", "load_sparse"]
