"""Exact per-sample gradient formulas for the layers fastprune supports natively.

Each formula turns a module's captured calls ``[(input, output_grad), ...]`` into
per-sample statistics of its parameters. Weights of Linear and Conv1d/Conv2d are
reduced to a grouped linear map (x, dy) handled by the C++/CUDA ops (on CPU, the
sums of a wide conv come straight from its input via ``conv_grad_bias_sq``); biases,
norm affines and embeddings use short closed forms. Multiple calls of one module
(weight sharing) add up inside each sample's gradient, as autograd would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops

__all__ = ["formula_for", "PerSampleFormula", "weight_per_sample", "UNFOLD_BYTES"]

# Unfolded conv inputs (and direct per-sample gradients) are processed in sample tiles
# of about this many bytes. The blocks' rank-S updates want many samples per tile; the
# diagonal's sums do not, and small tiles there stay in cache and under glibc's 32 MiB
# limit above which every allocation is mapped afresh (page faults on every call). On
# the benchmark CNN an in-process A/B gave 160 -> 132 ms for unfolded tiles; direct
# tiles of 4 or 16 MiB ran alike on ResNet-20.
UNFOLD_BYTES = 256 << 20
_SUM_TILE_BYTES = 4 << 20
# Per-sample conv weight gradients come from one grouped backward-weights convolution
# over the samples for filters with at most this many inputs (C_in/groups * kernel), and
# from im2col + GEMMs for wider ones. Measured on CPU, batch 64-128 (ms, grouped vs im2col):
# 3x3 16->16 at 32x32 11 vs 28, 32->32 at 16x16 5 vs 16, 32->64 stride 2 at 16x16 4 vs 8,
# 64->64 at 8x8 21 vs 13, 128->128 at 16x16 67 vs 60, 256->256 at 8x8 167 vs 60.
DIRECT_CONV_MAX_FAN_IN = 288
# The sums of a CPU conv with at least this many output channels per group come from the
# conv_grad_bias_sq op (implicit GEMM, no per-sample gradients). Measured at batch 128
# (ms, best older route vs the op; AMD EPYC, AVX-512): 3->32 at 32x32 5.6 vs 1.8,
# 32->64 at 16x16 5.5 vs 4.3, 64->128 at 8x8 11.4 vs 3.9, 64->64 at 8x8 7.5 vs 2.2,
# 32->32 at 16x16 2.3 vs 2.2; below it, 16->16 at 32x32 2.2 vs 3.1 (one vector of
# channels leaves the op's tile short of loads).
IMPLICIT_CONV_MIN_CHANNELS = 32


def _cat_calls(parts: list[torch.Tensor]) -> torch.Tensor:
    """Joins the calls of a shared module along the position dim (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def _sample_chunks(t: torch.Tensor):
    """(s0, s1) ranges of samples of about _SUM_TILE_BYTES of ``t`` each: the norm formulas'
    activation-sized temporaries stay in cache and are reused, not mapped afresh per
    layer (ResNet-20 at batch 128 touched 640 MB of new pages a call with whole-batch ones)."""
    n = t.shape[0]
    step = max(1, _SUM_TILE_BYTES // max(1, t[:1].numel() * t.element_size()))
    return [(s0, min(n, s0 + step)) for s0 in range(0, n, step)]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(t: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """Samples [s0, s1) of t, without a slicing call when that is all of them."""
    return t if s0 == 0 and s1 == t.shape[0] else t[s0:s1]


class PerSampleFormula:
    """The exact per-sample gradient formula of one module type's own parameters.

    The weight of Linear and Conv layers is reached through :meth:`weight_tiles`, the
    one place that picks its per-sample route; the small parameters (biases, norm
    affines) through :meth:`per_sample`; :meth:`sums` reduces both."""

    #: parameters (local names) this formula covers
    handles: tuple[str, ...] = ()
    #: trailing feature dims of the output; the formula treats every dim before them as
    #: positions, so the samples may sit in any of those (moved to dim 0 first). None:
    #: the samples must be dim 0 (convolutions, BatchNorm).
    feature_dims: int | None = None

    def __init__(self, module: nn.Module):
        self.module = module

    @staticmethod
    def capture(args: tuple, kwargs: dict):
        """What the formula keeps of a call's arguments: the input."""
        return args[0].detach()

    @property
    def has_weight_tiles(self) -> bool:
        """Whether the weight's per-sample gradients come in :meth:`weight_tiles`."""
        return type(self).grouped is not PerSampleFormula.grouped

    def grouped(self, calls, s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight as a grouped linear map over samples [s0, s1): x (S, G, T, K), dy (S, G, T, O)."""
        return None

    def has_direct_weight(self) -> bool:
        """Whether :meth:`per_sample_weight` has a direct route for this layer."""
        return False

    def per_sample_weight(self, calls, s0: int, s1: int) -> torch.Tensor | None:
        """Per-sample weight gradients (S, numel) of samples [s0, s1) by the layer's direct
        route (faster than the grouped-linear ops where :meth:`has_direct_weight`)."""
        return None

    def grouped_bytes_per_sample(self, calls) -> int:
        """Bytes one sample of :meth:`grouped` takes beyond the captured tensors (0: none)."""
        return 0

    def weight_tiles(self, calls, budget: int | None):
        """The weight's per-sample gradients over sample tiles of about ``budget`` bytes
        (None: one tile), by the layer's route. Yields ``("direct", (S, numel))`` tiles of
        per-sample gradients, or ``("grouped", (x, dy))`` tiles of the grouped linear map
        for the fused ops; tiles are of equal size (no small ragged last one)."""
        n = calls[0][0].shape[0]
        direct = self.has_direct_weight()
        per_sample = 4 * self.module.weight.numel() if direct else self.grouped_bytes_per_sample(calls)
        step = n if budget is None or per_sample == 0 else max(1, min(n, budget // per_sample))
        step = -(-n // -(-n // step))
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            yield ("direct", self.per_sample_weight(calls, s0, s1)) if direct else \
                ("grouped", self.grouped(calls, s0, s1))

    def per_sample(self, calls) -> dict[str, torch.Tensor]:
        """Per-sample gradients (N, *shape) of the small parameters."""
        return {}

    def sums(self, calls, names: set[str], scale: float = 1.0) -> dict[str, tuple]:
        """{name: (sum_n g_n, sum_n g_n**2, bound)} times ``scale`` for the requested local
        parameter names. ``bound`` is a 0-dim tensor that is finite exactly when the sum
        of squares is (checking it needs no pass over that sum), or None."""
        out = {}
        if "weight" in names and self.has_weight_tiles:
            # The grouped op sums weight and bias (Linear, Conv: sum over positions of dy)
            # in one call per tile; the direct route leaves the bias to per_sample.
            fuse = "bias" in names and "bias" in self.handles and self.module.bias is not None
            sums = None
            for route, tile in self.weight_tiles(calls, _SUM_TILE_BYTES):
                if route == "direct":
                    fuse = False
                    part = [t.mul_(scale) if scale != 1.0 else t for t in _ops.sum_sq(tile)] + [None, None, None]
                else:
                    part = list(_ops.grad_bias_sq(*tile, scale=scale))
                sums = part if sums is None else [a if b is None else a.add_(b) for a, b in zip(sums, part)]
            shape = self.module.weight.shape
            out["weight"] = (sums[0].reshape(shape), sums[1].reshape(shape), sums[4])  # bound None: direct
            if fuse:
                out["bias"] = (sums[2].reshape(-1), sums[3].reshape(-1), sums[4])
        if names - out.keys():
            for name, ps in self.per_sample(calls).items():
                if name in names and name not in out:
                    g, q = _ops.sum_sq(ps)
                    out[name] = (g.mul_(scale), q.mul_(scale), None) if scale != 1.0 else (g, q, None)
        return out


def weight_per_sample(formula: PerSampleFormula, calls) -> torch.Tensor:
    """All per-sample weight gradients (N, numel) of one module's captured calls."""
    parts = [tile if route == "direct" else _ops.per_sample_grads(*tile)
             for route, tile in formula.weight_tiles(calls, None)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class LinearFormula(PerSampleFormula):
    handles = ("weight", "bias")
    feature_dims = 1

    def grouped(self, calls, s0, s1):
        m = self.module
        x = _cat_calls([_rows(inp, s0, s1).reshape(s1 - s0, 1, -1, m.in_features) for inp, _ in calls])
        dy = _cat_calls([_rows(g, s0, s1).reshape(s1 - s0, 1, -1, m.out_features) for _, g in calls])
        return x, dy

    def per_sample(self, calls):
        n, o = calls[0][0].shape[0], self.module.out_features
        # A 2-D output gradient already is the per-sample bias gradient: skip the reduction's copy.
        parts = [g if g.dim() == 2 else g.reshape(n, -1, o).sum(1) for _, g in calls]
        return {"bias": parts[0] if len(parts) == 1 else sum(parts)}


class ConvFormula(PerSampleFormula):
    """Conv1d / Conv2d with any stride, padding (incl. 'same' and non-zero modes), dilation, groups."""

    handles = ("weight", "bias")

    def _unfold_args(self, inp: torch.Tensor):
        m = self.module
        one_d = isinstance(m, nn.Conv1d)
        k, s, d = m.kernel_size, m.stride, m.dilation
        if m.padding_mode != "zeros":
            inp, pad = F.pad(inp, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0,) * len(k)
        elif m.padding == "same":
            pads = []
            for kk, dd in zip(reversed(k), reversed(d)):  # F.pad lists the last dim first
                total = dd * (kk - 1)
                pads += [total // 2, total - total // 2]
            inp, pad = F.pad(inp, pads), (0,) * len(k)
        else:
            pad = (0,) * len(k) if m.padding == "valid" else m.padding
        if one_d:
            inp, k, s, d, pad = inp.unsqueeze(2), (1, *k), (1, *s), (1, *d), (0, *pad)
        return inp, k, d, pad, s

    def grouped(self, calls, s0, s1):
        m = self.module
        groups, n = m.groups, s1 - s0
        xs, dys = [], []
        for inp, g in calls:
            inp, k, d, pad, s = self._unfold_args(inp[s0:s1])
            u = F.unfold(inp, k, dilation=d, padding=pad, stride=s)  # (S, Cin*kh*kw, L)
            xs.append(u.view(n, groups, -1, u.shape[-1]).transpose(2, 3))
            dys.append(g[s0:s1].reshape(n, groups, m.out_channels // groups, -1).transpose(2, 3))
        return _cat_calls(xs), _cat_calls(dys)

    def sums(self, calls, names, scale=1.0):
        m = self.module
        if "weight" not in names or len(calls) > 1 or calls[0][0].device.type != "cpu" or \
                m.out_channels // m.groups < IMPLICIT_CONV_MIN_CHANNELS:
            return super().sums(calls, names, scale)  # a shared conv sums its calls' gradients first
        inp, g = calls[0]
        inp, k, d, pad, s = self._unfold_args(inp)
        g = g.unsqueeze(2) if g.dim() == 3 else g
        grad, sq, bias_grad, bias_sq, bound = _ops.conv_grad_bias_sq(inp, g, k, s, pad, d, m.groups, scale)
        out = {"weight": (grad.reshape(m.weight.shape), sq.reshape(m.weight.shape), bound)}
        if "bias" in names and m.bias is not None:
            out["bias"] = (bias_grad.reshape(-1), bias_sq.reshape(-1), bound)
        return out

    def has_direct_weight(self):
        m = self.module
        return m.weight.numel() // max(m.out_channels, 1) <= DIRECT_CONV_MAX_FAN_IN

    def per_sample_weight(self, calls, s0, s1):
        # Per-sample weight gradients are the weight gradient of one convolution over the
        # samples side by side: input (1, S*C, H, W), output gradient (1, S*O, H', W'), groups
        # S*G. The backward-weights kernel does all of them without im2col; it wins while
        # each group's filters are narrow (DIRECT_CONV_MAX_FAN_IN).
        m = self.module
        total = 0
        for inp, g in calls:
            inp, k, d, pad, s = self._unfold_args(_rows(inp, s0, s1))
            g = _rows(g, s0, s1)
            g = g.unsqueeze(2) if g.dim() == 3 else g
            acc = _ops.acc_dtype(g.dtype)
            n, c, o = inp.shape[0], inp.shape[1], g.shape[1]
            shape = (n * o, c // m.groups, *k)  # only its shape is read: the result does not depend on W
            res = torch.ops.aten.convolution_backward(
                g.to(acc).reshape(1, n * o, *g.shape[2:]), inp.to(acc).reshape(1, n * c, *inp.shape[2:]),
                inp.new_empty(shape, dtype=acc), None, s, pad, d, False, [0, 0], n * m.groups,
                [False, True, False])[1]
            total = total + res.reshape(n, -1)
        return total

    def grouped_bytes_per_sample(self, calls):
        # Unfolded input: (Cin/G * kernel) * G * output positions, summed over calls.
        m = self.module
        return sum(m.weight.numel() // m.out_channels * m.groups * g[0, 0].numel() * 4 for _, g in calls)

    def per_sample(self, calls):
        n = calls[0][0].shape[0]
        return {"bias": sum(g.reshape(n, self.module.out_channels, -1).sum(2) for _, g in calls)}


class LayerNormFormula(PerSampleFormula):
    handles = ("weight", "bias")

    @property
    def feature_dims(self):
        return len(self.module.normalized_shape)

    def per_sample(self, calls):
        m = self.module
        n, size = calls[0][0].shape[0], m.normalized_shape
        numel = torch.Size(size).numel()
        w = b = 0
        for inp, g in calls:
            parts = []
            for s0, s1 in _sample_chunks(inp):
                xhat = F.layer_norm(inp[s0:s1], size, None, None, m.eps)
                parts.append(xhat.mul_(g[s0:s1]).reshape(s1 - s0, -1, numel).sum(1))
            w = w + _join(parts)
            b = b + g.reshape(n, -1, numel).sum(1)
        return {"weight": w.reshape(n, *size), "bias": b.reshape(n, *size)}


class BatchNormFormula(PerSampleFormula):
    """BatchNorm in eval mode: a per-channel affine map of the running statistics."""

    handles = ("weight", "bias")

    def per_sample(self, calls):
        m = self.module
        n, c = calls[0][0].shape[0], m.num_features
        shape = (1, c) + (1,) * (calls[0][0].dim() - 2)
        w = b = 0
        rstd = torch.rsqrt(m.running_var.view(shape) + m.eps)
        for inp, g in calls:
            parts = []
            for s0, s1 in _sample_chunks(inp):
                xhat = (inp[s0:s1] - m.running_mean.view(shape)).mul_(rstd)
                parts.append(xhat.mul_(g[s0:s1]).reshape(s1 - s0, c, -1).sum(2))
            w = w + _join(parts)
            b = b + g.reshape(n, c, -1).sum(2)
        return {"weight": w, "bias": b}


class EmbeddingFormula(PerSampleFormula):
    """Per-sample gradient rows are sums of output gradients over equal token ids."""

    handles = ("weight",)
    feature_dims = 1

    def sums(self, calls, names, scale=1.0):
        m = self.module
        n, (vocab, dim) = calls[0][0].shape[0], m.weight.shape
        ids = torch.cat([inp.reshape(n, -1) for inp, _ in calls], 1)
        dy = torch.cat([g.reshape(n, -1, dim) for _, g in calls], 1)
        acc = _ops.acc_dtype(dy.dtype)
        dy = dy.to(acc)
        if m.padding_idx is not None:
            dy = dy.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0)
        key = (torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids).flatten()
        rows, inverse = torch.unique(key, return_inverse=True)  # one row per (sample, token id)
        per_row = dy.new_zeros(len(rows), dim).index_add_(0, inverse, dy.reshape(-1, dim))
        token = rows % vocab
        grad = dy.new_zeros(vocab, dim).index_add_(0, token, per_row, alpha=scale)
        sq = dy.new_zeros(vocab, dim).index_add_(0, token, per_row.square(), alpha=scale)
        return {"weight": (grad, sq, None)}


class EmbeddingBagFormula(PerSampleFormula):
    """nn.EmbeddingBag in mode 'sum' or 'mean': each bag is a sample, whose gradient row
    for a token sums the bag's output gradient over the token's entries (times its
    per_sample_weights, or over the bag's size for 'mean'); bags are (N, L) tensors or
    1-D ids with offsets."""

    handles = ("weight",)

    @staticmethod
    def capture(args, kwargs):
        # (input, offsets, per_sample_weights), passed by position or by name.
        named = ("input", "offsets", "per_sample_weights")
        got = [args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(named)]
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in got)

    def sums(self, calls, names, scale=1.0):
        m = self.module
        vocab, dim = m.weight.shape
        keys, rows = [], []
        for (ids, offsets, weights), g in calls:
            n, acc = g.shape[0], _ops.acc_dtype(g.dtype)
            if ids.dim() == 2:
                bag, flat = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1]), ids.flatten()
            else:
                starts = offsets[:-1] if m.include_last_offset else offsets
                bag, flat = torch.bucketize(torch.arange(len(ids), device=ids.device), starts, right=True) - 1, ids
            w = torch.ones(len(flat), dtype=acc, device=ids.device) if weights is None else weights.flatten().to(acc)
            if m.padding_idx is not None:  # padding entries count neither in the sum nor in the mean
                w = w.masked_fill(flat == m.padding_idx, 0)
            if m.mode == "mean":
                sizes = w.new_zeros(n).index_add_(0, bag, (w != 0).to(acc))
                w = w / sizes[bag].clamp_min(1)
            keys.append(bag * vocab + flat)
            rows.append(g.to(acc)[bag] * w.unsqueeze(1))
        key, dy = torch.cat(keys), torch.cat(rows)
        unique, inverse = torch.unique(key, return_inverse=True)  # one row per (sample, token id)
        per_row = dy.new_zeros(len(unique), dim).index_add_(0, inverse, dy)
        token = unique % vocab
        grad = dy.new_zeros(vocab, dim).index_add_(0, token, per_row, alpha=scale)
        sq = dy.new_zeros(vocab, dim).index_add_(0, token, per_row.square(), alpha=scale)
        return {"weight": (grad, sq, None)}


_FORMULAS = ((nn.Linear, LinearFormula), (nn.Conv1d, ConvFormula), (nn.Conv2d, ConvFormula),
             (nn.LayerNorm, LayerNormFormula), (nn.modules.batchnorm._BatchNorm, BatchNormFormula),
             (nn.Embedding, EmbeddingFormula), (nn.EmbeddingBag, EmbeddingBagFormula))


def formula_for(module: nn.Module) -> PerSampleFormula | None:
    """The exact formula for ``module``'s type, or None (then torch.func is the fallback)."""
    for kind, formula in _FORMULAS:
        if type(module) is kind or (kind is nn.modules.batchnorm._BatchNorm and isinstance(module, kind)):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
                return None
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and (module.max_norm is not None or module.sparse):
                return None
            if isinstance(module, nn.EmbeddingBag) and module.mode not in ("sum", "mean"):
                return None
            return formula(module)
    return None
