// CPU masked optimizer steps: one pass over (param, grad, state, mask) per tensor.
//
// torch.optim followed by re-masking reads and writes every tensor once per
// elementary op (about 9 passes for SGD with momentum, 20 for AdamW); this reads
// each input once and writes param and state once. The loops are compiled twice,
// for AVX2+FMA and for any x86-64, and the loader picks the clone the CPU runs;
// the fma() calls then match ATen's vectorised kernels bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>
#include <torch/library.h>

#include <vector>

#include "../masked_optim.h"

namespace fastprune {
namespace {

constexpr int64_t kGrain = 1 << 15;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTPRUNE_CLONES
#endif

// Scalars are copied and pointers marked restrict so the compiler may keep the
// flags in registers and vectorise (a store through p could otherwise alias s).
template <typename T, bool kMask, bool kBuf>
C10_ALWAYS_INLINE void sgd_loop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                                const bool* __restrict__ mask, int64_t n, const SgdScalars<T>& scalars) {
  const SgdScalars<T> s = scalars;
  T unused = T(0);
  for (int64_t i = 0; i < n; ++i) {
    sgd_element<T, kBuf>(p[i], g[i], kBuf ? buf[i] : unused, kMask ? mask[i] : true, s);
  }
}

// Chunks stay in L2 between the two phases, so memory is still read and written
// once. Only kept elements need a square root: phase 1 packs their exp_avg_sq
// into `out` (returning how many), phase 2 consumes them in the same order.
constexpr int64_t kAdamChunk = 16384;

template <typename T, bool kMask>
C10_ALWAYS_INLINE int64_t adam_moments_loop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                            T* __restrict__ v, const bool* __restrict__ mask, T* __restrict__ out,
                                            int64_t n, const AdamScalars<T>& scalars) {
  const AdamScalars<T> s = scalars;
  if constexpr (!kMask) {
    for (int64_t i = 0; i < n; ++i) out[i] = adam_moments(p[i], g[i], m[i], v[i], true, s);
    return n;
  }
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[j] = adam_moments(p[i], g[i], m[i], v[i], mask[i], s);
    j += mask[i];
  }
  return j;
}

template <typename T, bool kMask>
C10_ALWAYS_INLINE void adam_param_loop(T* __restrict__ p, const T* __restrict__ m, const bool* __restrict__ mask,
                                       const T* __restrict__ root, int64_t n, const AdamScalars<T>& scalars) {
  const AdamScalars<T> s = scalars;
  if constexpr (!kMask) {
    for (int64_t i = 0; i < n; ++i) p[i] = adam_param(p[i], m[i], root[i], true, s);
    return;
  }
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = adam_param(p[i], m[i], root[j], mask[i], s);
    j += mask[i];
  }
}

// One non-template entry per (type, variant): target_clones needs plain functions.
#define FASTPRUNE_SGD_ENTRY(T, M, B)                                                                    \
  FASTPRUNE_CLONES void sgd_##T##_##M##_##B(T* p, const T* g, T* buf, const bool* mask, int64_t n, \
                                             const SgdScalars<T>& s) {                               \
    sgd_loop<T, M, B>(p, g, buf, mask, n, s);                                                        \
  }
FASTPRUNE_SGD_ENTRY(float, true, true)
FASTPRUNE_SGD_ENTRY(float, true, false)
FASTPRUNE_SGD_ENTRY(float, false, true)
FASTPRUNE_SGD_ENTRY(float, false, false)
FASTPRUNE_SGD_ENTRY(double, true, true)
FASTPRUNE_SGD_ENTRY(double, true, false)
FASTPRUNE_SGD_ENTRY(double, false, true)
FASTPRUNE_SGD_ENTRY(double, false, false)

#define FASTPRUNE_ADAM_ENTRY(T, M)                                                                          \
  FASTPRUNE_CLONES int64_t adam_moments_##T##_##M(T* p, const T* g, T* m, T* v, const bool* mask, T* out, \
                                                   int64_t n, const AdamScalars<T>& s) {                  \
    return adam_moments_loop<T, M>(p, g, m, v, mask, out, n, s);                                          \
  }                                                                                                       \
  FASTPRUNE_CLONES void adam_param_##T##_##M(T* p, const T* m, const bool* mask, const T* root, int64_t n, \
                                              const AdamScalars<T>& s) {                                   \
    adam_param_loop<T, M>(p, m, mask, root, n, s);                                                        \
  }
FASTPRUNE_ADAM_ENTRY(float, true)
FASTPRUNE_ADAM_ENTRY(float, false)
FASTPRUNE_ADAM_ENTRY(double, true)
FASTPRUNE_ADAM_ENTRY(double, false)

template <typename T>
using SgdFn = void (*)(T*, const T*, T*, const bool*, int64_t, const SgdScalars<T>&);
template <typename T>
struct AdamFns {
  int64_t (*moments)(T*, const T*, T*, T*, const bool*, T*, int64_t, const AdamScalars<T>&);
  void (*param)(T*, const T*, const bool*, const T*, int64_t, const AdamScalars<T>&);
};

template <typename T>
SgdFn<T> sgd_entry(bool mask, bool buf);
template <>
SgdFn<float> sgd_entry(bool mask, bool buf) {
  return mask ? (buf ? sgd_float_true_true : sgd_float_true_false) : (buf ? sgd_float_false_true : sgd_float_false_false);
}
template <>
SgdFn<double> sgd_entry(bool mask, bool buf) {
  return mask ? (buf ? sgd_double_true_true : sgd_double_true_false)
              : (buf ? sgd_double_false_true : sgd_double_false_false);
}
template <typename T>
AdamFns<T> adam_entry(bool mask);
template <>
AdamFns<float> adam_entry(bool mask) {
  return mask ? AdamFns<float>{adam_moments_float_true, adam_param_float_true}
              : AdamFns<float>{adam_moments_float_false, adam_param_float_false};
}
template <>
AdamFns<double> adam_entry(bool mask) {
  return mask ? AdamFns<double>{adam_moments_double_true, adam_param_double_true}
              : AdamFns<double>{adam_moments_double_false, adam_param_double_false};
}

void masked_sgd_cpu(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                    const std::optional<at::Tensor>& mask, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_sgd_args(param, grad, momentum_buffer, mask, momentum);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "masked_optim_cpu", [&] {
    using T = scalar_t;
    const bool use_momentum = momentum != 0;
    const auto s = sgd_scalars<T>(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
    T* p = param.data_ptr<T>();
    const T* g = grad.const_data_ptr<T>();
    T* buf = use_momentum ? momentum_buffer->data_ptr<T>() : nullptr;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    const auto fn = sgd_entry<T>(m != nullptr, buf != nullptr);
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
      fn(p + begin, g + begin, buf ? buf + begin : nullptr, m ? m + begin : nullptr, end - begin, s);
    });
  });
}

void masked_adam_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     const std::optional<at::Tensor>& mask, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, bool decoupled, bool maximize) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, mask, step);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "masked_optim_cpu", [&] {
    using T = scalar_t;
    const auto s = adam_scalars<T>(lr, beta1, beta2, eps, weight_decay, step, decoupled, maximize);
    T* p = param.data_ptr<T>();
    const T* g = grad.const_data_ptr<T>();
    T* m = exp_avg.data_ptr<T>();
    T* v = exp_avg_sq.data_ptr<T>();
    const bool* k = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    const auto fns = adam_entry<T>(k != nullptr);
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
      std::vector<T> buffer(std::min(kAdamChunk, end - begin));
      T* root = buffer.data();
      const at::Tensor root_t = at::from_blob(root, {static_cast<int64_t>(buffer.size())}, param.options());
      for (int64_t c = begin; c < end; c += kAdamChunk) {
        const int64_t len = std::min(kAdamChunk, end - c);
        const bool* kc = k ? k + c : nullptr;
        const int64_t kept = fns.moments(p + c, g + c, m + c, v + c, kc, root, len, s);
        auto r = root_t.narrow(0, 0, kept);
        at::sqrt_out(r, r);  // ATen's own sqrt, so the rounding is torch's on every build
        fns.param(p + c, m + c, kc, root, len, s);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("masked_adam_", &masked_adam_cpu);
}

}  // namespace fastprune
