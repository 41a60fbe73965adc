"""Sparse Linear and Conv2d modules backed by the ``sparse_mm`` op.

The weight is kept row-compressed (see :class:`CSRWeight`): the kernel streams
each output row's nonzeros once while a tile of activations stays in registers,
so time and memory scale with the number of kept weights. The kept values are a
trainable ``nn.Parameter`` (fine-tuning with frozen sparsity); the pattern is
fixed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops

__all__ = ["CSRWeight", "SparseModule", "SparseLinear", "SparseConv2d"]

# Column indices fit 16 bits (read as unsigned) up to this many input features.
_INT16_COLUMNS = 1 << 16


class CSRWeight:
    """A 2-D weight (O, K) with rows compressed: ``row_ptr`` (O + 1, int32),
    ``col_idx`` (nnz, int16 read as unsigned when K <= 65536, else int32) and the
    kept entries in row-major order (held by the module as its ``values``)."""

    def __init__(self, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]):
        self.row_ptr, self.col_idx, self.shape = row_ptr, col_idx, shape
        self._transpose = None

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> tuple["CSRWeight", torch.Tensor]:
        """The pattern of a 2-D keep-mask and the flat indices of its kept entries."""
        mask = mask.bool()
        rows, cols = mask.nonzero(as_tuple=True)
        row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        row_ptr[1:] = mask.sum(1).cumsum(0)
        return cls(row_ptr, _pack_columns(cols, mask.shape[1]), tuple(mask.shape)), rows * mask.shape[1] + cols

    def columns(self) -> torch.Tensor:
        """Column indices as int64."""
        c = self.col_idx.long()
        return c & 0xFFFF if self.col_idx.dtype == torch.int16 else c

    def rows(self) -> torch.Tensor:
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.shape)
        dense[self.rows(), self.columns()] = values
        return dense

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.row_ptr.device)
        mask[self.rows(), self.columns()] = True
        return mask

    def transpose(self) -> tuple["CSRWeight", torch.Tensor]:
        """The pattern of W^T and the permutation taking W's values to W^T's order
        (built once, on the first backward)."""
        if self._transpose is None:
            rows, cols = self.rows(), self.columns()
            order = torch.argsort(cols * self.shape[0] + rows)
            row_ptr = torch.zeros(self.shape[1] + 1, dtype=torch.int32, device=rows.device)
            row_ptr[1:] = torch.bincount(cols, minlength=self.shape[1]).cumsum(0)
            csr_t = CSRWeight(row_ptr, _pack_columns(rows[order], self.shape[0]), (self.shape[1], self.shape[0]))
            self._transpose = (csr_t, order)
        return self._transpose

    def to(self, device) -> "CSRWeight":
        return CSRWeight(self.row_ptr.to(device), self.col_idx.to(device), self.shape)


def _pack_columns(cols: torch.Tensor, num_columns: int) -> torch.Tensor:
    if num_columns <= _INT16_COLUMNS:
        return (cols - (cols >= 1 << 15).long() * _INT16_COLUMNS).to(torch.int16)
    return cols.to(torch.int32)


class _SparseMM(torch.autograd.Function):
    """y[b] = W x[b] + bias for x (B, K, M), or x W^T + bias for x (N, K); gradients
    for x, the kept values and bias."""

    @staticmethod
    def forward(ctx, x, values, bias, csr):
        ctx.csr = csr
        ctx.save_for_backward(x, values)
        ctx.has_bias = bias is not None
        return _ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        csr = ctx.csr
        dy = dy.contiguous()
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            csr_t, order = csr.transpose()
            dx = _ops.sparse_mm(csr_t.row_ptr, csr_t.col_idx, values[order].contiguous(), dy)
        if ctx.needs_input_grad[1]:
            dv = _ops.sparse_mm_values_grad(csr.row_ptr, csr.col_idx, values, x, dy)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0) if dy.dim() == 2 else dy.sum((0, 2))
        return dx, dv, db, None


class SparseModule(nn.Module):
    """Shared state: the pattern (buffers), the kept values and the bias (parameters)."""

    #: state_dict entries that save_sparse replaces by its compact form of the weight.
    _compact_keys = ("values", "row_ptr", "col_idx")

    def _init_sparse(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None):
        csr, flat = CSRWeight.from_mask(mask.reshape(weight.shape[0], -1))
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("row_ptr", csr.row_ptr)
        self.register_buffer("col_idx", csr.col_idx)
        self.values = nn.Parameter(weight.detach().reshape(-1)[flat].clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self._csr = None

    @property
    def csr(self) -> CSRWeight:
        # Rebuilt when the buffers moved (model.to(device)) so the cached transpose follows.
        if self._csr is None or self._csr.row_ptr is not self.row_ptr:
            self._csr = CSRWeight(self.row_ptr, self.col_idx, (self.weight_shape[0], _prod(self.weight_shape[1:])))
        return self._csr

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / _prod(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros where pruned)."""
        return self.csr.to_dense(self.values.detach()).reshape(self.weight_shape)

    def weight_mask(self) -> torch.Tensor:
        return self.csr.mask().reshape(self.weight_shape)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """The op on x (B, K, M) or (N, K), through autograd only when a gradient is needed."""
        values, bias = self.values, self.bias
        if x.dtype != values.dtype:
            raise TypeError(f"{type(self).__name__} holds {values.dtype} weights but got a {x.dtype} input; "
                            "cast the input or the module (module.to(dtype))")
        if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or
                                        (bias is not None and bias.requires_grad)):
            return _SparseMM.apply(x, values, bias, self.csr)
        # Inference calls the op directly: autograd.Function's bookkeeping costs about 10 us.
        return _ops.sparse_mm(self.row_ptr, self.col_idx, values, x, bias)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class SparseLinear(SparseModule):
    """``nn.Linear`` with a row-compressed weight; inputs (..., in_features)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_sparse(weight, mask, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """From an ``nn.Linear``; ``mask`` defaults to its nonzero weights."""
        weight = linear.weight
        return cls(weight, weight != 0 if mask is None else mask, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dim() == 2:
            return self._mm(x)
        return self._mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        _copy_dense(dense, self)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.3f}"


class SparseConv2d(SparseModule):
    """``nn.Conv2d`` (groups=1, zero padding) with a row-compressed weight: a 1x1
    convolution with stride 1 runs on the input as is, others on its unfolding."""

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros" or \
                isinstance(conv.padding, str):
            raise ValueError("SparseConv2d supports nn.Conv2d with groups=1, padding_mode='zeros' and numeric "
                             f"padding; got {conv!r}. Leave this layer dense.")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, \
            conv.dilation
        weight = conv.weight
        self._init_sparse(weight, weight != 0 if mask is None else mask, conv.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> "SparseConv2d":
        return cls(conv, mask)

    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel trusts the weight's column indices, so the input size is checked here.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects inputs (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        n, _, h, w = x.shape
        if self._pointwise():
            return self._mm(x.reshape(n, self.in_channels, h * w)).reshape(n, self.out_channels, h, w)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return self._mm(cols).reshape(n, self.out_channels, ho, wo)

    def to_dense(self) -> nn.Conv2d:
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device=self.values.device,
                          dtype=self.values.dtype)
        _copy_dense(dense, self)
        return dense

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, sparsity={self.sparsity:.3f}")


def _copy_dense(dense: nn.Module, sparse: SparseModule) -> None:
    with torch.no_grad():
        dense.weight.copy_(sparse.dense_weight())
        if sparse.bias is not None:
            dense.bias.copy_(sparse.bias)
