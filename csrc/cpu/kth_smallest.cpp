// Exact k-th smallest value over a list of tensors by MSD radix select:
// a few streaming passes, each building a histogram of one 16-bit digit of the
// order-preserving key among the elements that still match the selected
// prefix. Extra memory is one histogram per thread, never a concatenation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "../kth_smallest.h"

namespace fastprune {
namespace {

constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t{1} << kDigitBits;

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> kth_smallest_impl(const std::vector<at::Tensor>& tensors, int64_t k) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  using wide_t = typename KeyTraits<scalar_t>::wide_t;
  constexpr int kKeyBits = 8 * sizeof(key_t);

  const int num_threads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(num_threads) * kBins);
  key_t prefix = 0, prefix_mask = 0;
  int64_t rank = k - 1;  // 0-based rank among the elements matching the prefix
  int64_t num_less = 0;

  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    std::fill(hist.begin(), hist.end(), 0);
    for (size_t t = 0; t < tensors.size(); ++t) {
      const at::Tensor src = tensors[t].contiguous();
      const scalar_t* data = src.const_data_ptr<scalar_t>();
      const bool first_pass = prefix_mask == 0;
      at::parallel_for(0, src.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
        int64_t* h = hist.data() + static_cast<int64_t>(at::get_thread_num()) * kBins;
        for (int64_t i = begin; i < end; ++i) {
          const wide_t v = static_cast<wide_t>(data[i]);
          if (first_pass) {
            TORCH_CHECK(v == v, "kth_smallest: tensor ", t, " contains NaN at flat index ", i,
                        "; scores must be finite");
          }
          const key_t key = float_to_key(v);
          if ((key & prefix_mask) == prefix) ++h[(key >> shift) & (kBins - 1)];
        }
      });
    }
    for (int th = 1; th < num_threads; ++th)
      for (int64_t b = 0; b < kBins; ++b) hist[b] += hist[th * kBins + b];
    const int64_t bin = select_bin(hist.data(), rank, num_less);
    prefix |= static_cast<key_t>(bin) << shift;
    prefix_mask |= static_cast<key_t>(kBins - 1) << shift;
  }

  const auto opts = tensors[0].options();
  return {at::scalar_tensor(key_to_float(prefix), opts),
          at::scalar_tensor(num_less, opts.dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> kth_smallest_cpu(at::TensorList tensors, int64_t k) {
  std::vector<at::Tensor> list(tensors.begin(), tensors.end());
  check_kth_inputs(list, k);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, list[0].scalar_type(), "kth_smallest_cpu", [&] {
    out = kth_smallest_impl<scalar_t>(list, k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("kth_smallest", &kth_smallest_cpu); }

}  // namespace fastprune
