// Inverses of damped empirical-Fisher blocks, F_b = damp I + (1/N) sum_n g_n[b] g_n[b]^T.
//
// Dense path: one batched Cholesky over all blocks (instead of WoodFisher's N
// sequential Sherman-Morrison updates). Low-rank path (N < B): the B x B matrix is never formed; with
// L L^T = N damp I + G G^T (N x N), W = L^-1 G gives F^-1 = (I - W^T W) / damp exactly.
// Built from ATen's batched GEMM / Cholesky / triangular solves, so one definition
// serves CPU (LAPACK/MKL) and CUDA (cuBLAS/cuSOLVER batched).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../grad_stats.h"

namespace fastprune {
namespace {

void check_damp(double damp, const char* op) {
  TORCH_CHECK(damp > 0.0 && std::isfinite(damp), op, ": damp must be a positive finite number, got ", damp,
              " (it keeps F invertible; 1e-5 is WoodFisher's default)");
}

void check_finite(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), op, ": ", what,
              " contain NaN or inf; check the model, data and loss for overflow");
}

// Cholesky factors of a batch of SPD matrices, with an error that names the fix.
at::Tensor cholesky(const at::Tensor& a, const char* op) {
  auto [factor, info] = at::linalg_cholesky_ex(a);
  TORCH_CHECK(info.max().item<int64_t>() == 0, op, ": a damped Fisher block is not numerically positive "
              "definite in ", a.scalar_type(), "; increase damp or use float64");
  return factor;
}

// (damp I + blocks)^-1 for blocks (nb, B, B), the mean outer products of gradients.
at::Tensor fisher_inverse(const at::Tensor& blocks_in, double damp) {
  check_damp(damp, "fisher_inverse");
  TORCH_CHECK(blocks_in.dim() == 3 && blocks_in.size(1) == blocks_in.size(2) && blocks_in.is_floating_point(),
              "fisher_inverse: expected floating-point blocks (num_blocks, B, B), got ", blocks_in.sizes());
  check_finite(blocks_in, "blocks", "fisher_inverse");
  at::Tensor f = blocks_in.to(acc_type(blocks_in.scalar_type()), /*non_blocking=*/false, /*copy=*/true);
  f.diagonal(0, 1, 2).add_(damp);
  const at::Tensor inv = at::cholesky_inverse(cholesky(f, "fisher_inverse"));
  // LAPACK returns it column-major; it is symmetric, so the transpose is the same
  // matrix in row-major order at no cost.
  if (inv.is_contiguous()) return inv;
  return inv.mT().is_contiguous() ? inv.mT() : inv.contiguous();
}

// W (nb, N, B) with (damp I + G^T G / N)^-1 = (I - W^T W) / damp for grads G (nb, N, B).
at::Tensor lowrank_factor(const at::Tensor& grads_in, double damp) {
  check_damp(damp, "lowrank_factor");
  TORCH_CHECK(grads_in.dim() == 3 && grads_in.is_floating_point() && grads_in.size(1) > 0,
              "lowrank_factor: expected floating-point grads (num_blocks, N, B) with N >= 1, got ",
              grads_in.sizes());
  check_finite(grads_in, "gradients", "lowrank_factor");
  const at::Tensor g = grads_in.to(acc_type(grads_in.scalar_type()));
  at::Tensor core = at::bmm(g, g.transpose(1, 2));  // (nb, N, N)
  core.diagonal(0, 1, 2).add_(damp * static_cast<double>(g.size(1)));
  // Row-major like the input, whatever layout the triangular solve picked.
  return at::linalg_solve_triangular(cholesky(core, "lowrank_factor"), g, /*upper=*/false).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("fisher_inverse", &fisher_inverse);
  m.impl("lowrank_factor", &lowrank_factor);
}

}  // namespace fastprune
