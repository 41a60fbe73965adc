// Shared by the CPU and CUDA kth_smallest kernels: input checks and the
// order-preserving float -> unsigned integer key transform used by radix select.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastprune {

// Validates the inputs and returns the total element count.
inline int64_t check_kth_inputs(const std::vector<at::Tensor>& tensors, int64_t k) {
  TORCH_CHECK(!tensors.empty(), "kth_smallest: got an empty list of tensors; pass at least one tensor");
  const auto dtype = tensors[0].scalar_type();
  const auto device = tensors[0].device();
  TORCH_CHECK(at::isFloatingType(dtype), "kth_smallest: scores must be floating point, got ", dtype,
              "; convert them with .float()");
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "kth_smallest: tensor ", i, " has dtype ",
                tensors[i].scalar_type(), " but tensor 0 has ", dtype, "; convert all scores to one dtype");
    TORCH_CHECK(tensors[i].device() == device, "kth_smallest: tensor ", i, " is on ", tensors[i].device(),
                " but tensor 0 is on ", device, "; move all scores to one device");
    total += tensors[i].numel();
  }
  TORCH_CHECK(k >= 1 && k <= total, "kth_smallest: k=", k, " is out of range [1, ", total,
              "] for ", total, " elements in total");
  return total;
}

// One radix-select step: finds the bin holding 0-based `rank` in a histogram of
// the elements matching the current prefix, and moves `rank` and `num_less` past
// the bins before it. Returns the bin.
inline int64_t select_bin(const int64_t* hist, int64_t& rank, int64_t& num_less) {
  int64_t bin = 0;
  while (rank >= hist[bin]) {
    rank -= hist[bin];
    num_less += hist[bin];
    ++bin;
  }
  return bin;
}

// Bits of the radix key: 64 for double, 32 for every narrower float (half and
// bfloat16 are widened to float exactly).
template <typename scalar_t>
struct KeyTraits {
  using key_t = uint32_t;
  using wide_t = float;
};
template <>
struct KeyTraits<double> {
  using key_t = uint64_t;
  using wide_t = double;
};

// Maps floats to unsigned integers with the same order. -0.0 is folded onto
// +0.0 so both compare equal, as they do for torch.kthvalue.
C10_HOST_DEVICE inline uint32_t float_to_key(float v) {
  if (v == 0.0f) v = 0.0f;
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
C10_HOST_DEVICE inline uint64_t float_to_key(double v) {
  if (v == 0.0) v = 0.0;
  uint64_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
inline float key_to_float(uint32_t k) {
  uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}
inline double key_to_float(uint64_t k) {
  uint64_t u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
  double v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

}  // namespace fastprune
