// Per-element masked SGD and Adam/AdamW updates, shared by the CPU and CUDA ops.
//
// Each update reproduces torch.optim's single-tensor step for the same scalars
// rounding for rounding (ATen's CPU kernels compute add(alpha), addcmul and lerp
// with one fused multiply-add, so fma() appears exactly where they use it); a
// pruned element (keep == false) gets its weight and optimizer state set to 0.
// The scalars are cast to the element type once, as ATen casts Python scalars.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastprune {

// fma and sqrt in T itself: the unqualified C names would compute float in double
// and round once at the end, which differs from ATen's float kernels.
#ifdef __CUDA_ARCH__
template <typename T>
__device__ C10_ALWAYS_INLINE T fma_t(T a, T b, T c) { return ::fma(a, b, c); }
template <typename T>
__device__ C10_ALWAYS_INLINE T sqrt_t(T a) { return ::sqrt(a); }
#else
template <typename T>
C10_ALWAYS_INLINE T fma_t(T a, T b, T c) { return std::fma(a, b, c); }
template <typename T>
C10_ALWAYS_INLINE T sqrt_t(T a) { return std::sqrt(a); }
#endif

template <typename T>
struct SgdScalars {
  T neg_lr, momentum, keep_grad, weight_decay;  // keep_grad = 1 - dampening
  bool first_step, nesterov, maximize, decay;
};

template <typename T>
SgdScalars<T> sgd_scalars(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize, bool first_step) {
  return {static_cast<T>(-lr), static_cast<T>(momentum), static_cast<T>(1 - dampening), static_cast<T>(weight_decay),
          first_step, nesterov, maximize, weight_decay != 0};
}

// Branches are selects on loop-invariant flags, so CPU loops vectorise.
template <typename T, bool kMomentum>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_element(T& p, T g, T& buf, bool keep, const SgdScalars<T>& s) {
  g = s.maximize ? -g : g;
  g = s.decay ? fma_t(p, s.weight_decay, g) : g;  // grad.add(param, alpha=weight_decay)
  if constexpr (kMomentum) {
    // First step: buf = grad; then buf.mul_(momentum).add_(grad, alpha=1 - dampening).
    const T b = s.first_step ? g : fma_t(g, s.keep_grad, buf * s.momentum);
    g = s.nesterov ? fma_t(b, s.momentum, g) : b;
    buf = keep ? b : T(0);
  }
  p = keep ? fma_t(g, s.neg_lr, p) : T(0);  // param.add_(grad, alpha=-lr)
}

template <typename T>
struct AdamScalars {
  T decay_factor;    // AdamW: 1 - lr * weight_decay
  T weight_decay;    // Adam: added to the gradient
  T avg_weight;      // 1 - beta1, the lerp weight
  T beta2, sq_weight;  // sq_weight = 1 - beta2
  T bias2_sqrt, eps, neg_step_size;  // neg_step_size = -lr / (1 - beta1^step)
  bool decoupled, decay, maximize;
};

// The bias corrections in double, computed as torch.optim does in Python (x ** 0.5 is pow).
template <typename T>
AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                            bool decoupled, bool maximize) {
  const double bias1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<T>(1 - lr * weight_decay), static_cast<T>(weight_decay), static_cast<T>(1 - beta1),
          static_cast<T>(beta2), static_cast<T>(1 - beta2), static_cast<T>(std::pow(bias2, 0.5)),
          static_cast<T>(eps), static_cast<T>(-(lr / bias1)), decoupled, weight_decay != 0, maximize};
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lerp_like_aten(T start, T end, T weight) {
  // ATen's lerp: start + w (end - start) for |w| < 0.5, else end - (1 - w)(end - start).
  const T diff = end - start;
  return (weight < T(0.5) && weight > T(-0.5)) ? fma_t(weight, diff, start) : fma_t(weight - T(1), diff, end);
}

// Adam in two phases around the square root, so the CPU op can take it from ATen
// (torch's sqrt is MKL's, which is not always correctly rounded). Phase 1 decays
// the weight and updates the moments; it returns the new exp_avg_sq.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T adam_moments(T& p, T g, T& m, T& v, bool keep, const AdamScalars<T>& s) {
  g = s.maximize ? -g : g;
  p = s.decay && s.decoupled ? p * s.decay_factor : p;              // param.mul_(1 - lr * weight_decay)
  g = s.decay && !s.decoupled ? fma_t(p, s.weight_decay, g) : g;    // grad.add(param, alpha=weight_decay)
  const T m_new = lerp_like_aten(m, g, s.avg_weight);               // exp_avg.lerp_(grad, 1 - beta1)
  const T v_new = fma_t(s.sq_weight * g, g, v * s.beta2);  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  m = keep ? m_new : T(0);
  v = keep ? v_new : T(0);
  return v_new;
}

// Phase 2, with root = sqrt(exp_avg_sq) and m the updated exp_avg:
// param.addcdiv_(exp_avg, root / bias2_sqrt + eps, value=-step_size).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T adam_param(T p, T m, T root, bool keep, const AdamScalars<T>& s) {
  const T denom = root / s.bias2_sqrt + s.eps;
  return keep ? p + (s.neg_step_size * m) / denom : T(0);
}

// Argument checks shared by the CPU and CUDA ops.
inline void check_optim_tensor(const at::Tensor& param, const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.sizes() == param.sizes() && t.scalar_type() == param.scalar_type() && t.device() == param.device(),
              op, ": ", what, " must match the parameter (shape ", param.sizes(), ", ", param.scalar_type(), ", ",
              param.device(), "), got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous; call .contiguous() or use the "
              "unfused path (fastprune.optim falls back to it automatically)");
}

inline void check_optim_mask(const at::Tensor& param, const std::optional<at::Tensor>& mask, const char* op) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = keep), got ",
              mask->scalar_type(), "; convert it with mask.bool()");
  TORCH_CHECK(mask->sizes() == param.sizes() && mask->device() == param.device() && mask->is_contiguous(), op,
              ": mask must be a contiguous bool tensor of the parameter's shape ", param.sizes(), " on ",
              param.device(), ", got ", mask->sizes(), " on ", mask->device());
}

inline void check_sgd_args(const at::Tensor& param, const at::Tensor& grad,
                           const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& mask,
                           double momentum) {
  const char* op = "masked_sgd_";
  check_optim_tensor(param, param, "param", op);
  check_optim_tensor(param, grad, "grad", op);
  if (momentum_buffer.has_value()) check_optim_tensor(param, *momentum_buffer, "momentum_buffer", op);
  check_optim_mask(param, mask, op);
  TORCH_CHECK(momentum == 0 || momentum_buffer.has_value(), op, ": momentum != 0 needs a momentum_buffer");
}

inline void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& mask, int64_t step) {
  const char* op = "masked_adam_";
  TORCH_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  check_optim_tensor(param, param, "param", op);
  check_optim_tensor(param, grad, "grad", op);
  check_optim_tensor(param, exp_avg, "exp_avg", op);
  check_optim_tensor(param, exp_avg_sq, "exp_avg_sq", op);
  check_optim_mask(param, mask, op);
}

}  // namespace fastprune
