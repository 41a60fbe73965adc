// CUDA sparse x dense products (see sparse_mm.h). Float32 accumulation for
// half and bfloat16.
//
// Wide activations (M >= 8): a thread per (row, column), 32 columns per warp, so
// each nonzero's value and column are broadcast and x's row is read coalesced.
// Narrow ones (Linear at small batch): a warp per row, lanes stride over the
// row's nonzeros and reduce with shuffles.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_mm.h"

namespace fastprune {
namespace {

template <typename I>
__device__ __forceinline__ int64_t col_at(const I* c, int64_t j) {
  if constexpr (sizeof(I) == 2) return static_cast<uint16_t>(c[j]);
  else return c[j];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// grid (ceil(O / 8), ceil(M / 32), B), block (32, 8).
template <typename T, typename I>
__global__ void spmm_wide(const int32_t* __restrict__ rp, const I* __restrict__ ci, const T* __restrict__ v,
                          const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, int64_t O,
                          int64_t K, int64_t M) {
  using acc_t = at::opmath_type<T>;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.z;
  if (o >= O || m >= M) return;
  const T* xb = x + b * K * M;
  acc_t acc = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
  for (int32_t j = rp[o]; j < rp[o + 1]; ++j) acc += static_cast<acc_t>(v[j]) * static_cast<acc_t>(xb[col_at(ci, j) * M + m]);
  out[(b * O + o) * M + m] = static_cast<T>(acc);
}

// grid (ceil(O / 8), B), block (32, 8): one warp per row, all M columns.
template <typename T, typename I>
__global__ void spmm_narrow(const int32_t* __restrict__ rp, const I* __restrict__ ci, const T* __restrict__ v,
                            const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, int64_t O,
                            int64_t K, int64_t M) {
  using acc_t = at::opmath_type<T>;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t b = blockIdx.y;
  if (o >= O) return;  // whole warps exit together: a warp is one row
  const T* xb = x + b * K * M;
  for (int64_t m = 0; m < M; ++m) {
    acc_t acc = 0;
    for (int32_t j = rp[o] + threadIdx.x; j < rp[o + 1]; j += 32)
      acc += static_cast<acc_t>(v[j]) * static_cast<acc_t>(xb[col_at(ci, j) * M + m]);
    acc = warp_sum(acc);
    if (threadIdx.x == 0) out[(b * O + o) * M + m] = static_cast<T>(acc + (bias ? static_cast<acc_t>(bias[o]) : acc_t(0)));
  }
}

// grid (ceil(O / 8)), block (32, 8): a warp per row, lanes stride over B x M per nonzero.
template <typename T, typename I>
__global__ void values_grad_kernel(const int32_t* __restrict__ rp, const I* __restrict__ ci,
                                   const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dv, int64_t B,
                                   int64_t O, int64_t K, int64_t M) {
  using acc_t = at::opmath_type<T>;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (o >= O) return;
  for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
    const int64_t c = col_at(ci, j);
    acc_t acc = 0;
    for (int64_t t = threadIdx.x; t < B * M; t += 32) {
      const int64_t b = t / M, m = t % M;
      acc += static_cast<acc_t>(dy[(b * O + o) * M + m]) * static_cast<acc_t>(x[(b * K + c) * M + m]);
    }
    acc = warp_sum(acc);
    if (threadIdx.x == 0) dv[j] = static_cast<T>(acc);
  }
}

template <typename F>
void with_index_type(const at::Tensor& col_idx, F&& f) {
  if (col_idx.scalar_type() == at::kShort) f(int16_t{});
  else f(int32_t{});
}

at::Tensor sparse_mm_cuda_3d(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                          const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in) {
  check_csr(row_ptr, col_idx, values, "sparse_mm");
  check_activations(x_in, values, "sparse_mm");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t O = row_ptr.size(0) - 1, B = x_in.size(0), K = x_in.size(1), M = x_in.size(2);
  TORCH_CHECK(B <= 65535, "sparse_mm: at most 65535 right-hand sides on CUDA, got ", B);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = checked_bias(bias_in, O, values);
  at::Tensor out = at::empty({B, O, M}, x.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(32, 8);
  const unsigned row_blocks = static_cast<unsigned>((O + 7) / 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_mm_cuda", [&] {
    with_index_type(col_idx, [&](auto idx) {
      using I = decltype(idx);
      const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      if (M >= 8) {
        const dim3 grid(row_blocks, static_cast<unsigned>((M + 31) / 32), static_cast<unsigned>(B));
        spmm_wide<scalar_t, I><<<grid, block, 0, stream>>>(row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<I>(),
                                                           values.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                           bp, out.data_ptr<scalar_t>(), O, K, M);
      } else {
        const dim3 grid(row_blocks, static_cast<unsigned>(B));
        spmm_narrow<scalar_t, I><<<grid, block, 0, stream>>>(row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<I>(),
                                                             values.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                             bp, out.data_ptr<scalar_t>(), O, K, M);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor sparse_mm_values_grad_cuda_3d(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                                      const at::Tensor& x_in, const at::Tensor& dy_in) {
  check_csr(row_ptr, col_idx, values, "sparse_mm_values_grad");
  check_activations(x_in, values, "sparse_mm_values_grad");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t O = row_ptr.size(0) - 1, B = x_in.size(0), K = x_in.size(1), M = x_in.size(2);
  check_output_grad(dy_in, B, O, M, values);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  at::Tensor dv = at::empty_like(values);
  if (O == 0 || dv.numel() == 0) return dv;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_mm_values_grad_cuda", [&] {
    with_index_type(col_idx, [&](auto idx) {
      using I = decltype(idx);
      values_grad_kernel<scalar_t, I><<<static_cast<unsigned>((O + 7) / 8), dim3(32, 8), 0, stream>>>(
          row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<I>(), x.const_data_ptr<scalar_t>(),
          dy.const_data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, O, K, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dv;
}

at::Tensor transpose_cuda(const at::Tensor& t) { return t.t().contiguous(); }

at::Tensor sparse_mm_cuda(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                         const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return sparse_mm_any_layout(sparse_mm_cuda_3d, transpose_cuda, row_ptr, col_idx, values, x, bias);
}

at::Tensor sparse_mm_values_grad_cuda(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                                     const at::Tensor& x, const at::Tensor& dy) {
  return values_grad_any_layout(sparse_mm_values_grad_cuda_3d, transpose_cuda, row_ptr, col_idx, values, x, dy);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("sparse_mm", &sparse_mm_cuda);
  m.impl("sparse_mm_values_grad", &sparse_mm_values_grad_cuda);
}

}  // namespace fastprune
