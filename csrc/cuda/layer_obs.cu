// CUDA SparseGPT sweep (see layer_obs.h): one thread per row; a warp's rows read the
// same row of U at once (a broadcast), and each thread keeps its row's block segment
// in global memory, which it alone touches until the lazy update.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../layer_obs.h"

namespace fastprune {
namespace {

constexpr int kMaxPruneM = 32;

template <typename scalar_t>
__global__ void sweep_rows_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ u, bool* __restrict__ pruned,
                                  scalar_t* __restrict__ err, scalar_t* __restrict__ losses, int64_t rows, int64_t cols,
                                  int64_t i1, int64_t count, int64_t prune_n, int64_t prune_m) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  scalar_t* row = w + r * cols + i1;
  bool* drop = pruned + r * cols + i1;
  scalar_t loss = 0;
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t* urow = u + (i1 + j) * cols + i1;
    if (prune_m > 0 && j % prune_m == 0) {
      // The prune_n lowest w^2 / U_cc^2 of the group (selection by repeated minimum;
      // ties go to the lower index, as the CPU's stable sort gives).
      scalar_t score[kMaxPruneM];
      for (int64_t c = 0; c < prune_m; ++c) {
        const scalar_t d = u[(i1 + j + c) * cols + i1 + j + c];
        score[c] = row[j + c] * row[j + c] / (d * d);
      }
      for (int64_t t = 0; t < prune_n; ++t) {
        int64_t best = -1;
        for (int64_t c = 0; c < prune_m; ++c)
          if (!drop[j + c] && (best < 0 || score[c] < score[best])) best = c;
        drop[j + best] = true;
      }
    }
    const scalar_t d = urow[j];
    const scalar_t q = drop[j] ? scalar_t(0) : row[j];
    const scalar_t e = (row[j] - q) / d;
    loss += e * e;
    for (int64_t c = j + 1; c < count; ++c) row[c] -= e * urow[c];
    row[j] = q;
    err[r * count + j] = e;
  }
  losses[r] += loss;
}

void sweep_block_cuda(at::Tensor& w, const at::Tensor& u, at::Tensor& pruned, at::Tensor& err, at::Tensor& losses,
                      int64_t i1, int64_t count, int64_t prune_n, int64_t prune_m) {
  TORCH_CHECK(prune_m <= kMaxPruneM, "sparsegpt_sweep: prune_m up to ", kMaxPruneM, " on CUDA, got ", prune_m);
  const int threads = 128;
  const int64_t blocks = (w.size(0) + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparsegpt_sweep_cuda", [&] {
    sweep_rows_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), pruned.data_ptr<bool>(), err.data_ptr<scalar_t>(),
        losses.data_ptr<scalar_t>(), w.size(0), w.size(1), i1, count, prune_n, prune_m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_sweep_cuda(const at::Tensor& weight, const at::Tensor& hinv,
                                                                    int64_t block_size, double sparsity,
                                                                    int64_t prune_n, int64_t prune_m,
                                                                    const std::optional<at::Tensor>& fixed) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return sparsegpt_sweep_impl(weight, hinv, block_size, sparsity, prune_n, prune_m, fixed, sweep_block_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("sparsegpt_sweep", &sparsegpt_sweep_cuda); }

}  // namespace fastprune
