"""2:4 semi-structured Linear layers on the GPU's sparse tensor cores (Ampere or
newer), through ``torch.sparse.to_sparse_semi_structured``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SemiStructuredLinear", "is_two_four", "semi_structured_reason"]


def is_two_four(mask: torch.Tensor) -> bool:
    """Whether every 4 consecutive weights along each row keep at most 2 (the layout
    ``fastprune.prune(..., pattern="2:4")`` produces)."""
    rows = mask.reshape(mask.shape[0], -1)
    return rows.shape[1] % 4 == 0 and bool((rows.reshape(rows.shape[0], -1, 4).sum(-1) <= 2).all())


def semi_structured_reason(module: nn.Module, mask: torch.Tensor) -> str:
    """Why ``module`` cannot take the 2:4 kernel, or "" when it can (torch still
    checks the dtype and shape when converting)."""
    if not isinstance(module, nn.Linear):
        return "2:4 kernels take Linear layers"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    if not module.weight.is_cuda:
        return "2:4 kernels need a CUDA device"
    if torch.cuda.get_device_capability(module.weight.device) < (8, 0):
        return "2:4 kernels need an Ampere or newer GPU"
    if not is_two_four(mask):
        return "the mask is not 2:4 along the input features (prune with pattern='2:4')"
    return ""


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4-pruned weight in torch's semi-structured format, run by
    cuSPARSELt / CUTLASS. For inference: the weight does not train (fine-tune with
    :class:`~fastprune.sparse.FrozenLinear` or :class:`~fastprune.sparse.SparseLinear`).
    Raises ``ValueError`` with the reason when the layer or its mask does not qualify,
    and torch's ``RuntimeError`` for an unsupported dtype or shape."""

    #: state_dict entries that save_sparse replaces by its compact form of the weight.
    _compact_keys = ("weight", "pattern")

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        reason = semi_structured_reason(linear, mask)
        if reason:
            raise ValueError(f"SemiStructuredLinear: {reason}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dense = (linear.weight.detach() * mask).contiguous()
        self.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(dense), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("pattern", mask.detach().bool().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def weight_mask(self) -> torch.Tensor:
        return self.pattern

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.pattern.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense
