from .layers import CSRWeight, SparseConv2d, SparseLinear  # noqa: F401
from .convert import LayerChoice, SparseReport, to_dense, to_sparse  # noqa: F401
from .storage import load_sparse, save_sparse  # noqa: F401
