// Per-sample gradient statistics of a linear map, shared by the CPU and CUDA ops.
//
// Every supported layer is reduced to a grouped linear map: for sample n, group
// g and position t, out[n,g,t,:] = W_g in[n,g,t,:], with x = inputs (N, G, T, K)
// and dy = output gradients (N, G, T, O). The per-sample gradient is
// G_n = sum_t dy[n,g,t]^T x[n,g,t], flattened as weight.flatten() (group-major).
// Only tiles of S samples are ever formed, never all N x params at once.
#pragma once
#include <ATen/ATen.h>

#include "buffer_cache.h"

namespace fastprune {

// Float32 accumulation for half and bfloat16; float64 stays float64.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_stats_inputs(const at::Tensor& x, const at::Tensor& dy, const char* op) {
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, op, ": expected x (N, G, T, K) and dy (N, G, T, O), got x ",
              x.sizes(), " and dy ", dy.sizes());
  TORCH_CHECK(x.size(0) == dy.size(0) && x.size(1) == dy.size(1) && x.size(2) == dy.size(2), op,
              ": x ", x.sizes(), " and dy ", dy.sizes(), " disagree on (N, G, T)");
  TORCH_CHECK(x.is_floating_point() && dy.is_floating_point(), op, ": x and dy must be floating point");
  TORCH_CHECK(x.device() == dy.device(), op, ": x is on ", x.device(), " but dy is on ", dy.device());
}

// Samples per tile so that a tile of per-sample gradients stays near 16 Mi elements.
inline int64_t samples_per_tile(int64_t params) { return std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(params, 1)); }

// Batched products only pay off on CPU for small per-sample matrices; larger ones
// run faster as one GEMM call each (torch's CPU bmm is about 2x slower than MKL gemm).
inline bool prefer_gemm_loop(const at::Tensor& x, const at::Tensor& dy) {
  return x.device().is_cpu() && dy.size(3) * x.size(3) * x.size(2) >= (int64_t{1} << 16);
}

// G_n of one sample, written into out (G, O, K).
inline void per_sample_into(const at::Tensor& x, const at::Tensor& dy, int64_t n, at::Tensor& out) {
  for (int64_t g = 0; g < x.size(1); ++g) {
    auto o = out.select(0, g);
    at::mm_out(o, dy[n][g].t(), x[n][g]);
  }
}

// Per-sample gradients of samples [s0, s1) as an (S, G*O*K) contiguous tensor.
inline at::Tensor per_sample_tile(const at::Tensor& x, const at::Tensor& dy, int64_t s0, int64_t s1) {
  const auto xs = x.slice(0, s0, s1), dys = dy.slice(0, s0, s1);
  at::Tensor tile = empty_cached({s1 - s0, x.size(1), dy.size(3), x.size(3)}, x.options());
  if (x.size(2) == 1) {  // outer products
    at::mul_out(tile, dys.select(2, 0).unsqueeze(-1), xs.select(2, 0).unsqueeze(-2));
    return tile.view({s1 - s0, -1});
  }
  if (!prefer_gemm_loop(x, dy)) {
    at::matmul_out(tile, dys.transpose(-1, -2), xs);
    return tile.view({s1 - s0, -1});
  }
  for (int64_t n = s0; n < s1; ++n) {
    auto t = tile.select(0, n - s0);
    per_sample_into(x, dy, n, t);
  }
  return tile.view({s1 - s0, -1});
}

// Sums for the bias of the same layer: its per-sample gradient is b_n = sum_t
// dy[n, :, t, :] (G, O), so (sum_n b_n, sum_n b_n^2), each (G, O), come from the
// output gradients alone. dy2 = dy^2 when T == 1 (already formed for the weight).
template <typename Reduce>
std::tuple<at::Tensor, at::Tensor> bias_sums(const at::Tensor& dy, const at::Tensor& dy2, Reduce reduce) {
  const int64_t N = dy.size(0), G = dy.size(1), O = dy.size(3);
  if (dy.size(2) == 1) {
    at::Tensor grad = empty_cached({G, O}, dy.options()), sq = empty_cached({G, O}, dy.options());
    at::sum_out(grad, dy.select(2, 0), {0});
    at::sum_out(sq, dy2, {0});
    return {grad, sq};
  }
  at::Tensor per_sample = empty_cached({N, G, O}, dy.options());
  at::sum_out(per_sample, dy, {2});
  at::Tensor grad = empty_cached({G, O}, dy.options()).zero_(), sq = empty_cached({G, O}, dy.options()).zero_();
  const at::Tensor flat = per_sample.view({N, G * O});
  at::Tensor g = grad.view({G * O}), q = sq.view({G * O});
  if (N > 0) reduce(flat, g, q);
  return {grad, sq};
}

// What grad_sq_impl returns: the weight's (sum_n G_n, sum_n G_n^2), each (G, O, K); with
// `bias`, the bias's sums of bias_sums; and `bound`, a 0-dim tensor at least every entry
// of both squared sums, finite exactly when they all are (their non-negative total).
struct GradSums {
  at::Tensor grad, sq, bias_grad, bias_sq, bound;
};

// A device's own kernels for the weight sums, each returning false to leave its case to
// the ATen GEMMs of grad_sq_impl (these defaults):
// - rank1(x (N, K), dy (N, O), grad (O, K), sq (O, K), x_sq_rows (N), scale):
//   one group's T = 1 sums, times scale, and the row sums of x^2 (for the bound);
// - positions(x (N, G, T, K), dy (N, G, T, O), grad, sq): the T > 1 sums added into the
//   zeroed (G, O, K) grad and sq, unscaled.
struct AtenKernels {
  bool rank1(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
             double) const {
    return false;
  }
  bool positions(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&) const { return false; }
};

// The sums, all times `scale`. `reduce(tile, grad, sq)` adds a tile's column sums and
// column sums of squares into the flat accumulators in one pass; `kernels` as AtenKernels.
template <typename Reduce, typename Kernels = AtenKernels>
GradSums grad_sq_impl(const at::Tensor& x_in, const at::Tensor& dy_in, Reduce reduce, bool bias = false,
                      double scale = 1.0, Kernels kernels = {}) {
  check_stats_inputs(x_in, dy_in, "grad_sq");
  const auto acc = acc_type(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc), dy = dy_in.to(acc);
  const int64_t N = x.size(0), G = x.size(1), K = x.size(3), O = dy.size(3);
  GradSums out;
  if (x.size(2) == 1) {
    // Rank-1 per-sample gradients: sum_n (dy_n x_n^T)^2 = (dy^2)^T x^2, two GEMMs, the
    // scale applied by the GEMMs (beta 0: the outputs are not read).
    // Square before permuting: elementwise ops on the (N, G, .) layout stay contiguous.
    const auto x1 = x.select(2, 0), dy1 = dy.select(2, 0);
    // Every buffer comes from the host cache (see buffer_cache.h); mul is about 2x
    // faster than square() on CPU.
    at::Tensor dy2 = empty_cached(dy1.sizes(), x.options());
    at::mul_out(dy2, dy1, dy1);
    out.grad = empty_cached({G, O, K}, x.options());
    out.sq = empty_cached({G, O, K}, x.options());
    at::Tensor g0 = out.grad.select(0, 0), q0 = out.sq.select(0, 0);
    at::Tensor x_sq_rows = empty_cached({N}, x.options());
    // sum_ok sq = sum_n sum_g |dy2_ng| |x2_ng| from the inputs: no pass over the sums.
    if (G == 1 && kernels.rank1(x1.select(1, 0), dy1.select(1, 0), g0, q0, x_sq_rows, scale)) {
      out.bound = (dy2.select(1, 0).sum(-1) * x_sq_rows).sum() * scale;
    } else {
      at::Tensor x2 = empty_cached(x1.sizes(), x.options());
      at::mul_out(x2, x1, x1);
      if (G == 1) {
        at::addmm_out(g0, g0, dy1.select(1, 0).t(), x1.select(1, 0), 0, scale);
        at::addmm_out(q0, q0, dy2.select(1, 0).t(), x2.select(1, 0), 0, scale);
      } else {
        at::baddbmm_out(out.grad, out.grad, dy1.permute({1, 2, 0}), x1.permute({1, 0, 2}), 0, scale);
        at::baddbmm_out(out.sq, out.sq, dy2.permute({1, 2, 0}), x2.permute({1, 0, 2}), 0, scale);
      }
      out.bound = (dy2.sum(-1) * x2.sum(-1)).sum() * scale;
    }
    if (bias) {
      std::tie(out.bias_grad, out.bias_sq) = bias_sums(dy, dy2, reduce);
      if (scale != 1.0) {
        out.bias_grad.mul_(scale);
        out.bias_sq.mul_(scale);
      }
      out.bound = out.bound + out.bias_sq.sum();
    }
    return out;
  }
  if (bias) std::tie(out.bias_grad, out.bias_sq) = bias_sums(dy, at::Tensor(), reduce);
  out.grad = empty_cached({G, O, K}, x.options()).zero_();
  out.sq = empty_cached({G, O, K}, x.options()).zero_();
  if (kernels.positions(x, dy, out.grad, out.sq)) {
    // the device's kernel added them
  } else if (prefer_gemm_loop(x, dy)) {
    // One sample at a time: its gradient stays cache-resident between GEMM and reduction.
    at::Tensor buf = empty_cached({G, O, K}, x.options());
    const at::Tensor row = buf.view({1, -1});
    for (int64_t n = 0; n < N; ++n) {
      per_sample_into(x, dy, n, buf);
      reduce(row, out.grad, out.sq);
    }
  } else {
    const int64_t step = samples_per_tile(G * O * K);
    for (int64_t s0 = 0; s0 < N; s0 += step) {
      reduce(per_sample_tile(x, dy, s0, std::min(N, s0 + step)), out.grad, out.sq);
    }
  }
  for (at::Tensor* t : {&out.grad, &out.sq, &out.bias_grad, &out.bias_sq}) {
    if (t->defined() && scale != 1.0) t->mul_(scale);
  }
  out.bound = bias ? out.sq.sum() + out.bias_sq.sum() : out.sq.sum();
  return out;
}

// The grad_sq op (weight sums only) and the grad_bias_sq op (weight and bias sums,
// scaled, with their bound).
template <typename Reduce, typename Kernels = AtenKernels>
std::tuple<at::Tensor, at::Tensor> grad_sq_only(const at::Tensor& x, const at::Tensor& dy, Reduce reduce,
                                                Kernels kernels = {}) {
  GradSums s = grad_sq_impl(x, dy, reduce, false, 1.0, kernels);
  return {s.grad, s.sq};
}

template <typename Reduce, typename Kernels = AtenKernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_bias_sq_op(const at::Tensor& x,
                                                                                     const at::Tensor& dy,
                                                                                     double scale, Reduce reduce,
                                                                                     Kernels kernels = {}) {
  GradSums s = grad_sq_impl(x, dy, reduce, true, scale, kernels);
  return {s.grad, s.sq, s.bias_grad, s.bias_sq, s.bound};
}

// (sum_n t_n, sum_n t_n^2) over the first dim of t (N, *shape), each of shape
// `shape` in the accumulation type, by the same one-pass column reduction.
template <typename Reduce>
std::tuple<at::Tensor, at::Tensor> sum_sq_impl(const at::Tensor& t, Reduce reduce) {
  TORCH_CHECK(t.dim() >= 1 && t.is_floating_point(), "sum_sq: expected a floating-point tensor (N, ...), got ",
              t.scalar_type(), " of shape ", t.sizes());
  const auto acc = acc_type(t.scalar_type());
  const at::Tensor flat = t.to(acc).contiguous().view({t.size(0), c10::multiply_integers(t.sizes().slice(1))});
  at::Tensor grad = empty_cached(t.sizes().slice(1), flat.options()).zero_();
  at::Tensor sq = empty_cached(t.sizes().slice(1), flat.options()).zero_();
  if (flat.numel() > 0) reduce(flat, grad, sq);
  return {grad, sq};
}

}  // namespace fastprune
