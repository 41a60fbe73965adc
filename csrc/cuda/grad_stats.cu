// CUDA per-sample gradient statistics: the fused column reduction for grad_sq.
// Tiles and GEMMs come from the shared header (cuBLAS through ATen).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../grad_stats.h"

namespace fastprune {
namespace {

// One thread per column: consecutive threads read consecutive addresses of each row.
template <typename scalar_t>
__global__ void reduce_tile_kernel(const scalar_t* __restrict__ tile, int64_t S, int64_t P,
                                   scalar_t* __restrict__ grad, scalar_t* __restrict__ sq) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < P; j += stride) {
    scalar_t g = 0, q = 0;
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t v = tile[s * P + j];
      g += v;
      q += v * v;
    }
    grad[j] += g;
    sq[j] += q;
  }
}

void reduce_tile_cuda(const at::Tensor& tile, at::Tensor& grad, at::Tensor& sq) {
  const int64_t S = tile.size(0), P = tile.size(1);
  if (P == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((P + threads - 1) / threads, 65535);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "grad_sq_reduce_cuda", [&] {
    reduce_tile_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        tile.const_data_ptr<scalar_t>(), S, P, grad.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> grad_sq_cuda(const at::Tensor& x, const at::Tensor& dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  return grad_sq_only(x, dy, reduce_tile_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_bias_sq_cuda(
    const at::Tensor& x, const at::Tensor& dy, double scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  return grad_bias_sq_op(x, dy, scale, reduce_tile_cuda);
}

std::tuple<at::Tensor, at::Tensor> sum_sq_cuda(const at::Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  return sum_sq_impl(t, reduce_tile_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("grad_sq", &grad_sq_cuda);
  m.impl("grad_bias_sq", &grad_bias_sq_cuda);
  m.impl("sum_sq", &sum_sq_cuda);
}

}  // namespace fastprune
