// CPU per-sample gradient statistics: the fused column reduction behind grad_sq and
// sum_sq (csrc/cuda/grad_stats.cu is the CUDA one; the tiles come from grad_stats.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../grad_stats.h"

namespace fastprune {
namespace {

// grad[j] += sum_s tile[s, j]; sq[j] += sum_s tile[s, j]^2 in one read of the tile.
// Threads own column ranges, so rows are read contiguously and vectorise.
template <typename scalar_t>
void reduce_tile_kernel(const scalar_t* t, int64_t S, int64_t P, scalar_t* g, scalar_t* q) {
  at::parallel_for(0, P, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t* row = t + s * P;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t v = row[j];
        g[j] += v;
        q[j] += v * v;
      }
    }
  });
}

void reduce_tile_cpu(const at::Tensor& tile, at::Tensor& grad, at::Tensor& sq) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "grad_sq_reduce_cpu", [&] {
    reduce_tile_kernel<scalar_t>(tile.const_data_ptr<scalar_t>(), tile.size(0), tile.size(1),
                                 grad.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> grad_sq_cpu(const at::Tensor& x, const at::Tensor& dy) {
  return grad_sq_only(x, dy, reduce_tile_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_bias_sq_cpu(
    const at::Tensor& x, const at::Tensor& dy, double scale) {
  return grad_bias_sq_op(x, dy, scale, reduce_tile_cpu);
}

std::tuple<at::Tensor, at::Tensor> sum_sq_cpu(const at::Tensor& t) { return sum_sq_impl(t, reduce_tile_cpu); }

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("grad_sq", &grad_sq_cpu);
  m.impl("grad_bias_sq", &grad_bias_sq_cpu);
  m.impl("sum_sq", &sum_sq_cpu);
}

}  // namespace fastprune
