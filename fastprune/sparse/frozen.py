"""Dense layers with a frozen sparsity pattern: what ``to_sparse`` leaves dense.

A ``torch.nn.utils.prune`` layer recomputes ``weight = weight_orig * weight_mask`` in a
forward pre-hook on every call; on small layers (MLPNet's 40 x 20) that hook costs
more than the matmul. These modules store the masked weight once and, like the
sparse modules, keep the pattern fixed while the kept weights train: the weight's
gradient is masked in backward, so optimizers (SGD, momentum, Adam, weight decay)
leave pruned entries at exactly zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenPattern", "FrozenLinear", "FrozenConv2d"]


class _MaskGrad(torch.autograd.Function):
    """Identity on the weight whose backward zeroes the pruned entries' gradient."""

    @staticmethod
    def forward(ctx, weight, pattern):
        ctx.save_for_backward(pattern)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (pattern,) = ctx.saved_tensors
        return grad * pattern, None


class FrozenPattern:
    """Shared by :class:`FrozenLinear` and :class:`FrozenConv2d`: the bool buffer
    ``pattern`` (True = kept) next to the masked ``weight``."""

    #: state_dict entries that save_sparse replaces by its compact form of the weight.
    _compact_keys = ("weight", "pattern")

    def _freeze(self, source: nn.Module, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(source.weight * mask)
            if source.bias is not None:
                self.bias.copy_(source.bias)
        self.weight.requires_grad_(source.weight.requires_grad)
        if source.bias is not None:
            self.bias.requires_grad_(source.bias.requires_grad)
        self.register_buffer("pattern", mask.detach().bool().clone())

    def _masked_weight(self) -> torch.Tensor:
        w = self.weight
        return _MaskGrad.apply(w, self.pattern) if torch.is_grad_enabled() and w.requires_grad else w

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.pattern.float().mean())

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach()

    def weight_mask(self) -> torch.Tensor:
        return self.pattern


class FrozenLinear(FrozenPattern, nn.Linear):
    """``nn.Linear`` holding ``linear.weight * mask`` with the pattern frozen."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self._freeze(linear, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._masked_weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        dense.load_state_dict({k: v for k, v in self.state_dict().items() if k != "pattern"})
        return dense


class FrozenConv2d(FrozenPattern, nn.Conv2d):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) holding
    ``conv.weight * mask`` with the pattern frozen."""

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor):
        super().__init__(**_conv_args(conv))
        self._freeze(conv, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._masked_weight(), self.bias)

    def to_dense(self) -> nn.Conv2d:
        dense = nn.Conv2d(**_conv_args(self))
        dense.load_state_dict({k: v for k, v in self.state_dict().items() if k != "pattern"})
        return dense


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
