// CUDA masked optimizer steps: one grid-stride pass per tensor with the shared
// per-element updates of masked_optim.h (the square root is CUDA's correctly
// rounded sqrt; torch's CUDA Adam kernels are not matched bit for bit).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../masked_optim.h"

namespace fastprune {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

template <typename T>
__global__ void sgd_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                           const bool* __restrict__ mask, int64_t n, SgdScalars<T> s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool keep = mask == nullptr || mask[i];
    if (buf != nullptr) {
      sgd_element<T, true>(p[i], g[i], buf[i], keep, s);
    } else {
      T unused = T(0);
      sgd_element<T, false>(p[i], g[i], unused, keep, s);
    }
  }
}

template <typename T>
__global__ void adam_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            const bool* __restrict__ mask, int64_t n, AdamScalars<T> s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool keep = mask == nullptr || mask[i];
    T w = p[i], mi = m[i], vi = v[i];
    const T v_new = adam_moments(w, g[i], mi, vi, keep, s);
    p[i] = adam_param(w, mi, sqrt_t(v_new), keep, s);
    m[i] = mi;
    v[i] = vi;
  }
}

void masked_sgd_cuda(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                     const std::optional<at::Tensor>& mask, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_sgd_args(param, grad, momentum_buffer, mask, momentum);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = param.numel();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "masked_sgd_cuda", [&] {
    using T = scalar_t;
    const auto s = sgd_scalars<T>(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
    T* buf = momentum != 0 ? momentum_buffer->data_ptr<T>() : nullptr;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    sgd_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(param.data_ptr<T>(), grad.const_data_ptr<T>(), buf, m, n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void masked_adam_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                      const std::optional<at::Tensor>& mask, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step, bool decoupled, bool maximize) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, mask, step);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = param.numel();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "masked_adam_cuda", [&] {
    using T = scalar_t;
    const auto s = adam_scalars<T>(lr, beta1, beta2, eps, weight_decay, step, decoupled, maximize);
    const bool* k = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    adam_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(param.data_ptr<T>(), grad.const_data_ptr<T>(),
                                                           exp_avg.data_ptr<T>(), exp_avg_sq.data_ptr<T>(), k, n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("masked_sgd_", &masked_sgd_cuda);
  m.impl("masked_adam_", &masked_adam_cuda);
}

}  // namespace fastprune
