"""The compiled op library: loads ``fastprune._C`` and wraps ``torch.ops.fastprune``.

Importing ``fastprune._C`` registers the ops with the dispatcher. Fake kernels
registered here let the ops trace under ``torch.compile``.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastprune.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "fastprune's compiled op library (fastprune._C) is missing or failed to load: "
        f"{exc}. Build it from the repository root with `make build` or "
        "`pip install --no-build-isolation -e .` (torch must be installed first)."
    ) from exc

__all__ = ["acc_dtype", "kth_smallest", "grad_sq", "grad_bias_sq", "conv_grad_bias_sq", "sum_sq", "empty_cache", "per_sample_grads", "grad_blocks_accumulate", "fisher_inverse",
           "lowrank_factor", "sparsegpt_sweep", "masked_sgd_", "masked_adam_", "sparse_mm", "sparse_mm_values_grad", "has_cuda_kernels", "cpu_isa"]


@torch.library.register_fake("fastprune::kth_smallest")
def _kth_smallest_fake(tensors, k):
    torch._check(len(tensors) > 0, lambda: "kth_smallest: got an empty list of tensors")
    ref = tensors[0]
    return ref.new_empty(()), ref.new_empty((), dtype=torch.long)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every statistic and inverse accumulates in, as the C++/CUDA ops do:
    float64 for float64 inputs, float32 for everything else (16-bit included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastprune::grad_sq")
def _grad_sq_fake(x, dy):
    shape = (x.shape[1], dy.shape[3], x.shape[3])
    return x.new_empty(shape, dtype=acc_dtype(x.dtype)), x.new_empty(shape, dtype=acc_dtype(x.dtype))


@torch.library.register_fake("fastprune::grad_bias_sq")
def _grad_bias_sq_fake(x, dy, scale=1.0):
    acc = acc_dtype(x.dtype)
    weight, bias = (x.shape[1], dy.shape[3], x.shape[3]), (x.shape[1], dy.shape[3])
    return (x.new_empty(weight, dtype=acc), x.new_empty(weight, dtype=acc), x.new_empty(bias, dtype=acc),
            x.new_empty(bias, dtype=acc), x.new_empty((), dtype=acc))


@torch.library.register_fake("fastprune::conv_grad_bias_sq")
def _conv_grad_bias_sq_fake(x, dy, kernel_size, stride, padding, dilation, groups, scale=1.0):
    acc = acc_dtype(x.dtype)
    weight = (groups, dy.shape[1] // groups, x.shape[1] // groups * kernel_size[0] * kernel_size[1])
    bias = (groups, dy.shape[1] // groups)
    return (x.new_empty(weight, dtype=acc), x.new_empty(weight, dtype=acc), x.new_empty(bias, dtype=acc),
            x.new_empty(bias, dtype=acc), x.new_empty((), dtype=acc))


@torch.library.register_fake("fastprune::sum_sq")
def _sum_sq_fake(per_sample):
    shape = per_sample.shape[1:]
    return per_sample.new_empty(shape, dtype=acc_dtype(per_sample.dtype)), per_sample.new_empty(shape, dtype=acc_dtype(per_sample.dtype))


@torch.library.register_fake("fastprune::per_sample_grads")
def _per_sample_grads_fake(x, dy):
    return x.new_empty((x.shape[0], x.shape[1] * dy.shape[3] * x.shape[3]), dtype=acc_dtype(x.dtype))


@torch.library.register_fake("fastprune::grad_blocks_accumulate")
def _grad_blocks_accumulate_fake(x, dy, blocks):
    return None


@torch.library.register_fake("fastprune::fisher_inverse")
def _fisher_inverse_fake(blocks, damp):
    return blocks.new_empty(blocks.shape, dtype=acc_dtype(blocks.dtype))


@torch.library.register_fake("fastprune::lowrank_factor")
def _lowrank_factor_fake(grads, damp):
    return grads.new_empty(grads.shape, dtype=acc_dtype(grads.dtype))


@torch.library.register_fake("fastprune::sparsegpt_sweep")
def _sparsegpt_sweep_fake(weight, hinv_upper, block_size, sparsity, prune_n, prune_m, fixed=None):
    return torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool), weight.new_empty(weight.shape[0])


@torch.library.register_fake("fastprune::sparse_mm")
def _sparse_mm_fake(row_ptr, col_idx, values, x, bias):
    if x.dim() == 2:
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, x.shape[2]))


@torch.library.register_fake("fastprune::sparse_mm_values_grad")
def _sparse_mm_values_grad_fake(row_ptr, col_idx, values, x, dy):
    return torch.empty_like(values)


@torch.library.register_fake("fastprune::masked_sgd_")
def _masked_sgd_fake(param, grad, momentum_buffer, mask, lr, momentum, dampening, weight_decay, nesterov, maximize,
                     first_step):
    return None


@torch.library.register_fake("fastprune::masked_adam_")
def _masked_adam_fake(param, grad, exp_avg, exp_avg_sq, mask, lr, beta1, beta2, eps, weight_decay, step, decoupled,
                      maximize):
    return None


def grad_sq(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over samples of the per-sample gradients G_n and of G_n**2 of a grouped
    linear map with inputs ``x`` (N, G, T, K) and output gradients ``dy`` (N, G, T, O),
    where G_n = sum_t dy[n, :, t]^T x[n, :, t]. Each result is (G, O, K), float32 for
    16-bit inputs. Per-sample gradients are only formed a tile at a time."""
    return torch.ops.fastprune.grad_sq(x, dy)


def grad_bias_sq(x: torch.Tensor, dy: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """:func:`grad_sq` plus the layer's bias sums in the same call, everything times
    ``scale``: the bias's per-sample gradient is ``dy[n].sum(1)`` (G, O). Returns (weight
    sum, weight sum of squares, bias sum, bias sum of squares, bound), the bias ones
    (G, O) and ``bound`` a 0-dim total of both sums of squares, finite exactly when
    every entry of them is (computed from ``x`` and ``dy`` when T = 1, so checking the
    statistics costs no pass over them)."""
    return torch.ops.fastprune.grad_bias_sq(x, dy, float(scale))


def conv_grad_bias_sq(x: torch.Tensor, dy: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                      scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """:func:`grad_bias_sq` of a Conv2d layer from its input ``x`` (N, C, H, W) and output
    gradient ``dy`` (N, O, H', W'), with zero ``padding`` (two values each for
    ``kernel_size``, ``stride``, ``padding`` and ``dilation``). The weight sums are
    (groups, O/groups, C/groups*kh*kw), the weight's flattened order. On CPU the input is
    never unfolded: an implicit-GEMM kernel squares each sample's gradient in registers."""
    return torch.ops.fastprune.conv_grad_bias_sq(x, dy, list(kernel_size), list(stride), list(padding),
                                                 list(dilation), int(groups), float(scale))


def sum_sq(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_sample.sum(0), per_sample.square().sum(0))`` in one pass, float32 for
    16-bit inputs (the statistics of parameters with closed-form per-sample gradients)."""
    return torch.ops.fastprune.sum_sq(per_sample)


def empty_cache() -> int:
    """Frees the host buffers fastprune's statistics ops keep for reuse and returns
    the bytes released.

    On CPU, the ops take their outputs and temporaries from a cache (at most
    ``FASTPRUNE_CPU_CACHE_MB`` MiB, default 256) to which freed results return:
    repeated calls then reuse warm memory instead of page-faulting fresh memory from
    the OS. Call this to hand that memory back, e.g. after pruning a large model.
    """
    return int(torch.ops.fastprune.empty_cache())


def per_sample_grads(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """All per-sample gradients G_n (same layout as :func:`grad_sq`) as (N, G*O*K)."""
    return torch.ops.fastprune.per_sample_grads(x, dy)


def grad_blocks_accumulate(x: torch.Tensor, dy: torch.Tensor, blocks: torch.Tensor) -> None:
    """``blocks[b] += sum_n G_n[b] G_n[b]^T`` in place, for blocks of B consecutive
    entries of the flattened G_n; ``blocks`` is (ceil(G*O*K / B), B, B), the last
    block zero-padded."""
    torch.ops.fastprune.grad_blocks_accumulate(x, dy, blocks)


def fisher_inverse(blocks: torch.Tensor, damp: float) -> torch.Tensor:
    """(damp I + blocks[b])^-1 for every block of ``blocks`` (num_blocks, B, B), by one
    batched Cholesky; float32 for 16-bit inputs."""
    return torch.ops.fastprune.fisher_inverse(blocks, float(damp))


def lowrank_factor(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """W (num_blocks, N, B) with (damp I + G_b^T G_b / N)^-1 = (I - W_b^T W_b) / damp for
    gradients ``grads`` (num_blocks, N, B); exact, never forms a B x B matrix."""
    return torch.ops.fastprune.lowrank_factor(grads, float(damp))


def sparsegpt_sweep(weight: torch.Tensor, hinv_upper: torch.Tensor, block_size: int = 128, sparsity: float = 0.0,
                    prune_n: int = 0, prune_m: int = 0, fixed: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep of ``weight`` (rows, cols) with ``hinv_upper``, the upper
    Cholesky factor of the damped inverse layer Hessian: unstructured at ``sparsity``
    per column block when ``prune_m`` is 0, else ``prune_n`` pruned of every ``prune_m``
    columns of each row. Returns the updated weight (pruned entries 0), the keep mask and
    each row's sum of (w - q)^2 / [H^-1]_jj; float32 or float64. ``fixed`` (bool, like
    ``weight``) marks weights pruned whatever their score (an earlier step's mask);
    a block prunes at least those."""
    return torch.ops.fastprune.sparsegpt_sweep(weight, hinv_upper, int(block_size), float(sparsity), int(prune_n),
                                               int(prune_m), fixed)


def masked_sgd_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                mask: torch.Tensor | None, *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                first_step: bool = False) -> None:
    """One in-place SGD step of torch.optim.SGD's single-tensor rule on the kept
    elements (``mask`` True, or all without a mask); pruned elements of ``param``
    and ``momentum_buffer`` become 0. ``first_step`` initialises the buffer from
    the gradient. All tensors contiguous, of the parameter's shape and dtype."""
    torch.ops.fastprune.masked_sgd_(param, grad, momentum_buffer, mask, float(lr), float(momentum), float(dampening),
                                    float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


def masked_adam_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 mask: torch.Tensor | None, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: int, decoupled: bool, maximize: bool = False) -> None:
    """One in-place Adam (``decoupled=False``) or AdamW step, as torch.optim's
    single-tensor rule, on the kept elements; ``step`` is the count after this
    update (1 first). Pruned elements of param and both moments become 0."""
    torch.ops.fastprune.masked_adam_(param, grad, exp_avg, exp_avg_sq, mask, float(lr), float(beta1), float(beta2),
                                     float(eps), float(weight_decay), int(step), bool(decoupled), bool(maximize))


def sparse_mm(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W @ x[b] + bias`` for every b, as (B, O, M), with W (O, K) row-compressed:
    ``row_ptr`` (O + 1, int32), ``col_idx`` (nnz; int16 read as unsigned, or int32)
    and ``values`` (nnz); ``x`` is (B, K, M) in the values' dtype. A 2-D ``x``
    (N, K) is Linear's layout: the result is ``x @ W.T + bias``, (N, O)."""
    return torch.ops.fastprune.sparse_mm(row_ptr, col_idx, values, x, bias)


def sparse_mm_values_grad(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                          dy: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`sparse_mm`'s output w.r.t. ``values`` for output gradient ``dy``
    (B, O, M): ``dv[j] = sum_b <dy[b, row_j], x[b, col_j]>``; or ``x`` (N, K) and
    ``dy`` (N, O) in Linear's layout."""
    return torch.ops.fastprune.sparse_mm_values_grad(row_ptr, col_idx, values, x, dy)


def kth_smallest(tensors: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int]:
    """Exact ``k``-th smallest value (1-based) over all elements of ``tensors``.

    Equivalent to ``torch.cat([t.flatten() for t in tensors]).kthvalue(k)`` without
    building the concatenation (radix select, a few streaming passes). Returns the
    value as a 0-dim tensor and the number of elements strictly smaller than it, so
    callers can break ties deterministically. NaN, an empty list, mixed dtypes or
    devices and ``k`` outside ``[1, numel]`` raise ``RuntimeError``.
    """
    value, num_less = torch.ops.fastprune.kth_smallest(list(tensors), int(k))
    return value, int(num_less)


def has_cuda_kernels() -> bool:
    """True when the op library was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastprune::kth_smallest", "CUDA")


def cpu_isa(request: str = "") -> str:
    """The x86 vector extension the sparse layers' CPU kernel (``sparse_mm``) and the conv
    statistics kernel (``conv_grad_bias_sq``) run with: ``"avx512"``, ``"avx2"`` or
    ``"generic"``. By default the widest this CPU supports, detected at load time (the
    other CPU kernels choose theirs per function).

    ``cpu_isa("avx2")`` (or ``"generic"``) switches to a narrower one, e.g. to compare
    them; ``cpu_isa("auto")`` goes back to the widest. Asking for more than the CPU
    has raises ``RuntimeError``.
    """
    return torch.ops.fastprune.cpu_isa(request)
