// CUDA conv_grad_bias_sq: the unfolded input (at::im2col) and the grad_bias_sq op.
// On a GPU the batched GEMMs behind grad_bias_sq are already the fast route; this keeps
// the op's results identical on both devices (csrc/cpu/conv_grad_stats.cpp avoids the
// unfold on CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../conv_grad_stats.h"
#include "../grad_stats.h"

namespace fastprune {
namespace {

using Sums = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Sums conv_grad_bias_sq_cuda(const at::Tensor& x_in, const at::Tensor& dy_in, at::IntArrayRef kernel,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            double scale) {
  const ConvGeometry g = conv_geometry(x_in, dy_in, kernel, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_type(x_in.scalar_type());
  // (N, C*kh*kw, T) -> (N, G, T, Kg); dy (N, O, H', W') -> (N, G, T, Og).
  const at::Tensor u = at::im2col(x_in.to(acc), kernel, dilation, padding, stride);
  const at::Tensor x = u.view({g.N, groups, g.Kg(), g.T()}).transpose(2, 3);
  const at::Tensor dy = dy_in.to(acc).reshape({g.N, groups, g.Og(), g.T()}).transpose(2, 3);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastprune::grad_bias_sq", "")
                             .typed<Sums(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, dy, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("conv_grad_bias_sq", &conv_grad_bias_sq_cuda); }

}  // namespace fastprune
