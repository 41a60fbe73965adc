// Per-sample gradient statistics of a Conv2d layer straight from its input and output
// gradient (the conv_grad_bias_sq op), shared by the CPU and CUDA kernels.
//
// The weight's per-sample gradient is G_n[o, k] = sum_t dy[n, o, t] X_n[k, t], where
// X_n is the unfolded (im2col) input of sample n, k = (c, i, j) runs over a group's
// C/G input channels and the kernel window (the weight's flattened order) and t over
// the output positions. The op returns what grad_bias_sq returns for the unfolded
// input, without the unfolded input (CPU: see csrc/cpu/conv_grad_stats.cpp).
#pragma once
#include <ATen/ATen.h>

namespace fastprune {

struct ConvGeometry {
  int64_t N, C, H, W, O, Ho, Wo, groups, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Cg() const { return C / groups; }
  int64_t Og() const { return O / groups; }
  int64_t Kg() const { return Cg() * kh * kw; }
  int64_t T() const { return Ho * Wo; }
};

inline ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& dy, at::IntArrayRef kernel,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  constexpr const char* op = "conv_grad_bias_sq";
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, op, ": expected input (N, C, H, W) and output gradient (N, O, H', W'), got ",
              x.sizes(), " and ", dy.sizes(), " (Conv1d: add a unit height)");
  TORCH_CHECK(x.is_floating_point() && dy.is_floating_point(), op, ": input and output gradient must be floating point");
  TORCH_CHECK(x.device() == dy.device(), op, ": input is on ", x.device(), " but the output gradient is on ", dy.device());
  TORCH_CHECK(x.size(0) == dy.size(0), op, ": input and output gradient disagree on the batch: ", x.sizes(), " and ",
              dy.sizes());
  for (auto list : {kernel, stride, padding, dilation})
    TORCH_CHECK(list.size() == 2, op, ": kernel_size, stride, padding and dilation take two values each");
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 &&
                  dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              op, ": kernel_size, stride and dilation must be >= 1 and padding >= 0, got ", kernel, ", ", stride, ", ",
              dilation, ", ", padding);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && dy.size(1) % groups == 0, op, ": groups=", groups,
              " must divide the input's ", x.size(1), " and the output gradient's ", dy.size(1), " channels");
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), dy.size(1), dy.size(2), dy.size(3), groups,
                 kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const int64_t ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho == ho && g.Wo == wo, op, ": an input ", x.sizes(), " gives outputs of ", ho, " x ", wo,
              " with these kernel_size, stride, padding and dilation, but the output gradient is ", dy.sizes());
  return g;
}

}  // namespace fastprune
