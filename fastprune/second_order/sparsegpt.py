"""Layer-wise pruning from calibration data: SparseGPT (Frantar & Alistarh, 2023) and Wanda on one
Linear layer's input Hessian H = 2/n sum_i x_i x_i^T.

For a layer y = W x the reconstruction error ||W X - W' X||^2 is a quadratic in each
row of W' with Hessian H, so pruning a row is an OBS problem on H. SparseGPT sweeps
the columns left to right with the upper Cholesky factor U of H^-1: pruning column j
costs (w_j - q_j)^2 / U_jj^2 and moves the columns to its right by the OBS update,
which is exact for the columns not yet processed. The sweep itself is the
``sparsegpt_sweep`` op (C++/CUDA); this module builds H, damps it and factors it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import _ops
from ..errors import check_finite
from ..profiling import phase, timed
from ..select import parse_pattern
from ..validate import integer, real

__all__ = ["LayerHessian", "HessianFactor", "factor_hessian", "sparsegpt_prune", "refit", "reconstruction_error",
           "wanda_prune"]


class LayerHessian:
    """H = 2/n sum_i x_i x_i^T over every input row of a layer (the last dim is the
    features; all others are positions), accumulated in ``dtype`` (float32 by default,
    float64 for a reference). With ``diagonal=True`` only diag(H) = 2/n sum_i x_i^2 is
    kept (all Wanda needs: O(cols) memory and work per row instead of O(cols^2))."""

    def __init__(self, columns: int, device=None, dtype: torch.dtype = torch.float32, diagonal: bool = False):
        self.columns = integer(columns, "columns", 1)
        shape = (columns,) if diagonal else (columns, columns)
        self.hessian = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Adds the rows of ``x`` (..., columns)."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"inputs have {x.shape[-1]} features, the Hessian {self.columns}")
        x = x.reshape(-1, self.columns).to(self.hessian.dtype)
        m = len(x)
        if m == 0:
            return
        # A running mean: H stays on the scale of one input row, whatever n grows to.
        total = self.rows + m
        with phase("hessian"):
            if self.hessian.dim() == 1:
                self.hessian.mul_(self.rows / total).add_(x.square().sum(0), alpha=2.0 / total)
            else:
                _add_gram(self.hessian, x, self.rows / total, 2.0 / total)
        self.rows = total

    def all_reduce(self, group) -> None:
        """Makes H the running mean over every rank's rows (ranks of ``group``; None: as is)."""
        if group is None:
            return
        from ..distributed import all_reduce_sum
        rows = torch.tensor([float(self.rows)], dtype=self.hessian.dtype, device=self.hessian.device)
        self.hessian.mul_(self.rows)
        all_reduce_sum([self.hessian, rows], group)
        self.rows = int(rows.item())
        self.hessian.div_(max(self.rows, 1))


def _add_gram(out: torch.Tensor, x: torch.Tensor, beta: float, alpha: float, panel: int = 192) -> None:
    """out = beta * out + alpha * x^T x, computing only the panels on and above the diagonal
    (x^T x is symmetric; BLAS syrk is not reachable from torch) and mirroring them: about
    0.6x the multiply-adds of one addmm for a few hundred columns or more."""
    cols = x.shape[1]
    if cols < 2 * panel:
        out.addmm_(x.T, x, beta=beta, alpha=alpha)
        return
    edges = list(range(0, cols, panel)) + [cols]
    spans = list(zip(edges[:-1], edges[1:]))
    for i, (a, b) in enumerate(spans):
        out[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=beta, alpha=alpha)
        for c, d in spans[:i]:
            out[a:b, c:d] = out[c:d, a:b].T


@dataclass
class HessianFactor:
    """What SparseGPT's sweep needs from one input Hessian, computed once and shared by
    every layer reading that input (q/k/v, gate/up): ``upper`` with
    ``upper^T upper = (H + damp I)^-1``, the ``dead`` inputs (always 0), the
    ``percdamp`` that made H + damp I positive definite, and ``hessian``, H + damp I
    itself (for :func:`refit`)."""

    upper: torch.Tensor
    dead: torch.Tensor
    percdamp: float
    hessian: torch.Tensor


@timed("cholesky")
def factor_hessian(hessian: torch.Tensor, percdamp: float = 0.01, tries: int = 4) -> HessianFactor:
    """Damps H by ``percdamp`` x mean(diag H) and factors its inverse. Dead inputs (diag 0)
    get H_jj = 1, as in the reference, so their weights go first at no cost. A
    factorisation that fails is retried with ten times the damping, up to ``tries``
    times, with a warning naming the damping used; never silently the identity."""
    percdamp = real(percdamp, "percdamp", 0, low_open=True)
    h = hessian.to(_ops.acc_dtype(hessian.dtype), copy=True)
    check_finite([("hessian", h)], "non-finite layer Hessian", "check the calibration activations for overflow")
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    damp, mean_diag = percdamp, float(h.diagonal().mean())
    for _ in range(tries):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                if damp != percdamp:
                    warnings.warn(f"fastprune: the layer Hessian needed percdamp={damp:g} (asked {percdamp:g}) to "
                                  "be positive definite", stacklevel=3)
                return HessianFactor(upper, dead, damp, damped)
        damp *= 10
    raise RuntimeError(f"the layer Hessian is not positive definite even with percdamp={damp / 10:g}; the "
                       "calibration inputs may be degenerate (all zero, or NaN-free but tiny): use more or other "
                       "calibration data")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: float = 0.5,
                    pattern: str | None = None, block_size: int = 128, percdamp: float = 0.01,
                    factor: HessianFactor | None = None, fixed: torch.Tensor | None = None, refit_iters: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prunes ``weight`` (rows, cols) of a layer with input Hessian ``hessian`` (cols, cols).

    Args:
        sparsity: fraction pruned, unstructured within each column block (the paper's
            adaptive mask selection); ignored with ``pattern``.
        pattern: ``"N:M"`` keeps N of every M consecutive weights of each row (2:4, 4:8).
        block_size: columns per block (the lazy-update width, 128 in the paper).
        percdamp: damping, as a fraction of the mean diagonal of H (0.01 in the paper);
            raised tenfold, up to three times, if H + damp I is not positive definite.
        factor: :func:`factor_hessian` of ``hessian``, when several layers share it
            (``hessian`` may then be None; ``percdamp`` is the factor's).
        fixed: bool (rows, cols), weights already pruned (an earlier step's mask): they
            stay pruned, and the sweep compensates for them like for the others.
        refit_iters: after the sweep, up to this many conjugate-gradient iterations of
            :func:`refit` (0: none), which solve for the least-squares optimal kept
            weights of the chosen mask.

    Returns:
        ``(new_weight, keep_mask, info)``: the weight with pruned entries 0 and the rest
        updated, in the weight's dtype; the bool keep mask; ``info`` with ``loss`` (the
        reconstruction error sum of the sweep, 1/2 sum (w - q)^2 / [H^-1]_jj),
        ``percdamp`` (the damping used), ``dead`` (columns whose inputs were all zero:
        their weights are pruned, as in the reference) and ``error``, the layer's
        reconstruction error tr((W - W') H (W - W')^T) / 2 on the damped H (with a refit,
        also ``error_sweep``, before it).
    """
    cols = weight.shape[-1]
    if factor is None:
        if weight.dim() != 2 or hessian is None or hessian.shape != (cols, cols):
            raise ValueError(f"weight must be (rows, cols) and hessian (cols, cols); got {tuple(weight.shape)} and "
                             f"{None if hessian is None else tuple(hessian.shape)}")
        factor = factor_hessian(hessian, percdamp)
    elif weight.dim() != 2 or factor.upper.shape != (cols, cols):
        raise ValueError(f"weight must be (rows, cols) and the factor (cols, cols); got {tuple(weight.shape)} and "
                         f"{tuple(factor.upper.shape)}")
    block_size = integer(block_size, "block_size", 1)
    prune_n = prune_m = 0
    if pattern is not None:
        keep_n, prune_m = parse_pattern(pattern)
        prune_n = prune_m - keep_n
        if cols % prune_m:
            raise ValueError(f"pattern {pattern!r} needs the {cols} input features to be a multiple of {prune_m}")
        block_size = max(prune_m, block_size - block_size % prune_m)
        sparsity = 0.0
    else:
        sparsity = real(sparsity, "sparsity", 0, 1, high_open=True)
    w = weight.detach().to(factor.upper.dtype, copy=True)
    w[:, factor.dead] = 0.0  # an input that is always 0: its weights do nothing and go first
    if fixed is not None:
        fixed = fixed.to(w.device, torch.bool)
        if pattern is not None:
            fixed = None  # an N:M step prunes in one go: nothing earlier to keep
    with phase("sweep"):
        new, keep, losses = _ops.sparsegpt_sweep(w, factor.upper, block_size, sparsity, prune_n, prune_m, fixed)
    keep &= ~factor.dead.unsqueeze(0)
    new = new * keep
    info = {"loss": float(losses.sum()) / 2, "percdamp": factor.percdamp, "dead": int(factor.dead.sum()),
            "error": reconstruction_error(w, new, factor.hessian)}
    if refit_iters:
        info["error_sweep"] = info["error"]
        new = refit(w, factor.hessian, keep, new, refit_iters)
        info["error"] = reconstruction_error(w, new, factor.hessian)
    return new.to(weight.dtype), keep, info


def reconstruction_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T) / 2: half the squared error of the layer's outputs over
    the calibration inputs (times 2/n), for input Hessian H."""
    d = weight - new
    return float((d @ hessian * d).sum()) / 2


@timed("refit")
def refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, start: torch.Tensor | None = None,
          iters: int = 50, tol: float | None = None) -> torch.Tensor:
    """The kept weights that best reconstruct the layer's outputs for a fixed mask:
    per row r, min ||(w_r - w'_r) X||^2 over w'_r zero outside ``keep[r]``, i.e. the
    normal equations H_KK w'_K = (H w_r)_K on the row's kept set K. Every row is solved
    at once by Jacobi-preconditioned conjugate gradients (one (rows, cols) x H product
    per iteration), from ``start`` (e.g. SparseGPT's weights) for ``iters`` iterations or
    until every row's residual is below ``tol`` (relative; default 1e-6 in float32,
    1e-10 in float64). SparseGPT's sequential updates are optimal only for the columns
    not yet swept; this recovers the rest."""
    keep = keep.to(weight.dtype)
    tol = (1e-10 if weight.dtype == torch.float64 else 1e-6) if tol is None else tol
    inv_diag = 1.0 / hessian.diagonal()
    b = (weight @ hessian) * keep
    x = (weight * keep if start is None else start * keep).clone()
    r = b - (x @ hessian) * keep
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    stop = tol * tol * (b * b).sum(1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(iters):
        if bool(((r * r).sum(1, keepdim=True) <= stop).all()):
            break
        ap = (p @ hessian) * keep
        alpha = rz / (p * ap).sum(1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        p.mul_(rz_next / rz.clamp_min(torch.finfo(b.dtype).tiny)).add_(z)
        rz = rz_next
    return x * keep


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5, pattern: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al., 2024): score |W_ij| * ||x_j|| and prune each output row's lowest
    ``sparsity`` fraction (floor(sparsity * cols) weights, as the reference), or, with
    ``pattern="N:M"``, keep the N best of every M consecutive inputs of each row; no
    weight update. ``||x_j||`` comes from the
    diagonal of the same Hessian SparseGPT uses (H_jj = 2/n ||x_j||^2, so the ranking is
    the same), so one calibration pass serves both; ``hessian`` may also be just that
    diagonal (cols,). Returns ``(new_weight, keep_mask)``; ties keep the lower index."""
    cols = weight.shape[-1]
    if weight.dim() != 2 or hessian.shape not in ((cols, cols), (cols,)):
        raise ValueError(f"weight must be (rows, cols) and hessian (cols, cols) or its diagonal (cols,); got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    diag = hessian if hessian.dim() == 1 else hessian.diagonal()
    score = weight.detach().abs().to(_ops.acc_dtype(weight.dtype)) * diag.clamp_min(0).sqrt()
    check_finite([("score", score)], "non-finite Wanda scores", "check the calibration activations for overflow")
    rows, cols = score.shape
    if pattern is not None:
        keep_n, m = parse_pattern(pattern)
        if cols % m:
            raise ValueError(f"pattern {pattern!r} needs the {cols} input features to be a multiple of {m}")
        groups = score.reshape(rows, cols // m, m)
        best = groups.argsort(dim=2, descending=True, stable=True)[..., :keep_n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, best, True).view(rows, cols)
    else:
        # floor(sparsity * cols) per row, as the reference code counts.
        prune = int(real(sparsity, "sparsity", 0, 1, high_open=True) * cols)
        order = score.argsort(dim=1, stable=True)  # ascending: the first `prune` of each row go
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, order[:, :prune], False)
    return weight.detach() * keep, keep
