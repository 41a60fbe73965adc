// SparseGPT's column sweep (Frantar & Alistarh, "SparseGPT", 2023), shared by the CPU
// and CUDA ops: checks, the block loop, the unstructured mask of each block and the
// lazy update of the columns right of it, all in ATen; the sequential in-block part
// (one row at a time, the rows in parallel) is the device's kernel.
//
// For a row-major weight W (rows, cols) and the upper Cholesky factor U of H^-1
// (H = 2/n X X^T, damped), column block [i1, i2):
//   mask: unstructured, the k = round(sparsity * rows * count) lowest w^2 / U_jj^2 of
//         the rows x count tile at the block's start (ties in flat index order), the
//         `fixed` weights first (k grows to their count if it must);
//         N:M, the prune_n lowest of every prune_m columns of each row, chosen when
//         the sweep reaches the group (on the weights updated so far);
//   per column j, per row: q = pruned ? 0 : w_j, err = (w_j - q) / U_jj,
//         loss += (w_j - q)^2 / U_jj^2, w_c -= err * U_jc for c in (j, i2), w_j = q;
//   lazy: W[:, i2:] -= Err U[i1:i2, i2:].
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>

namespace fastprune {

inline void check_sweep_inputs(const at::Tensor& w, const at::Tensor& u, int64_t block_size, double sparsity,
                               int64_t prune_n, int64_t prune_m, const std::optional<at::Tensor>& fixed) {
  TORCH_CHECK(!fixed || (fixed->sizes() == w.sizes() && fixed->scalar_type() == at::kBool &&
                         fixed->device() == w.device()),
              "sparsegpt_sweep: fixed must be a bool tensor shaped and placed like the weight");
  TORCH_CHECK(!fixed || prune_m == 0, "sparsegpt_sweep: fixed weights are for unstructured sweeps (prune_m = 0)");
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "sparsegpt_sweep: weight must be a 2-D float32 or float64 tensor (rows, cols), got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == w.size(1) && u.size(1) == w.size(1) &&
              u.scalar_type() == w.scalar_type() && u.device() == w.device(),
              "sparsegpt_sweep: hinv_upper must be (cols, cols) = (", w.size(1), ", ", w.size(1),
              ") of the weight's dtype and device, got ", u.sizes(), " ", u.scalar_type());
  TORCH_CHECK(block_size >= 1, "sparsegpt_sweep: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "sparsegpt_sweep: sparsity must be in [0, 1), got ", sparsity);
  if (prune_m > 0) {
    TORCH_CHECK(prune_n > 0 && prune_n < prune_m, "sparsegpt_sweep: need 0 < prune_n < prune_m, got ", prune_n,
                ":", prune_m);
    TORCH_CHECK(w.size(1) % prune_m == 0 && block_size % prune_m == 0, "sparsegpt_sweep: the ", w.size(1),
                " columns and block_size ", block_size, " must be multiples of prune_m=", prune_m);
  }
}

// Kernel(w, u, pruned, err, losses, i1, count, prune_n, prune_m) sweeps one block in place.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_sweep_impl(const at::Tensor& weight,
                                                                    const at::Tensor& hinv_upper, int64_t block_size,
                                                                    double sparsity, int64_t prune_n, int64_t prune_m,
                                                                    const std::optional<at::Tensor>& fixed,
                                                                    Kernel kernel) {
  check_sweep_inputs(weight, hinv_upper, block_size, sparsity, prune_n, prune_m, fixed);
  at::Tensor w = weight.contiguous().clone();
  const at::Tensor u = hinv_upper.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor pruned = at::zeros({rows, cols}, w.options().dtype(at::kBool));
  at::Tensor losses = at::zeros({rows}, w.options());
  const at::Tensor diag = u.diagonal();
  for (int64_t i1 = 0; i1 < cols; i1 += block_size) {
    const int64_t count = std::min(block_size, cols - i1), i2 = i1 + count;
    if (prune_m == 0) {
      // Half to even, as Python's round and torch.nn.utils.prune count.
      int64_t k = static_cast<int64_t>(std::nearbyint(sparsity * static_cast<double>(rows * count)));
      at::Tensor score = (w.narrow(1, i1, count).square() / diag.narrow(0, i1, count).square()).flatten();
      if (fixed) {
        // Scores are >= 0, so -1 puts the fixed weights first.
        const at::Tensor tile = fixed->narrow(1, i1, count).flatten();
        score.masked_fill_(tile, -1.0);
        k = std::max(k, tile.sum().item<int64_t>());
      }
      if (k > 0) {
        // fastprune's radix select (kth_smallest), several times faster than kthvalue here.
        static const auto kth = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fastprune::kth_smallest", "")
                                    .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, int64_t)>();
        const auto [t, less] = kth.call({score}, k);
        at::Tensor chosen = score < t;
        const at::Tensor tied = score == t;  // ties at the threshold, in flat index order
        chosen.logical_or_(tied.logical_and(tied.cumsum(0) <= k - less));
        pruned.narrow(1, i1, count).copy_(chosen.view({rows, count}));
      }
    }
    at::Tensor err = at::empty({rows, count}, w.options());
    kernel(w, u, pruned, err, losses, i1, count, prune_n, prune_m);
    if (i2 < cols) w.narrow(1, i2, cols - i2).addmm_(err, u.narrow(0, i1, count).narrow(1, i2, cols - i2), 1, -1);
  }
  return {w, pruned.logical_not(), losses};
}

}  // namespace fastprune
