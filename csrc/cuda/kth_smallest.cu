// CUDA k-th smallest over a list of tensors: the same MSD radix select as the
// CPU kernel, with 8-bit digits so each block keeps its histogram in shared
// memory. The 256 counts of a pass are scanned on the host (one small copy per
// pass); the data is read once per pass and never concatenated.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kth_smallest.h"

namespace fastprune {
namespace {

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 256;

template <typename scalar_t, typename key_t>
__global__ void digit_histogram_kernel(const scalar_t* __restrict__ data, int64_t n, key_t prefix,
                                       key_t prefix_mask, int shift, unsigned long long* __restrict__ hist,
                                       unsigned long long* __restrict__ nan_count) {
  using wide_t = typename KeyTraits<scalar_t>::wide_t;
  __shared__ unsigned long long local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  unsigned long long nans = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const wide_t v = static_cast<wide_t>(data[i]);
    if (v != v) {
      ++nans;
      continue;
    }
    const key_t key = float_to_key(v);
    if ((key & prefix_mask) == prefix) atomicAdd(&local[(key >> shift) & (kBins - 1)], 1ull);
  }
  if (nans) atomicAdd(nan_count, nans);
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], local[b]);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> kth_smallest_impl(const std::vector<at::Tensor>& tensors, int64_t k) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto device_opts = tensors[0].options().dtype(at::kLong);
  // Slots 0..kBins-1 hold the histogram, slot kBins the NaN count.
  at::Tensor counts = at::zeros({kBins + 1}, device_opts);
  auto* hist = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  std::vector<int64_t> host(kBins + 1);

  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (const auto& t : tensors) contiguous.push_back(t.contiguous());

  key_t prefix = 0, prefix_mask = 0;
  int64_t rank = k - 1, num_less = 0;
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    counts.zero_();
    for (const auto& src : contiguous) {
      const int64_t n = src.numel();
      if (n == 0) continue;
      const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 4096);
      digit_histogram_kernel<scalar_t, key_t><<<blocks, kThreads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), n, prefix, prefix_mask, shift, hist, hist + kBins);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(host.data(), hist, sizeof(int64_t) * (kBins + 1), cudaMemcpyDeviceToHost,
                                   stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    TORCH_CHECK(host[kBins] == 0, "kth_smallest: scores contain ", host[kBins], " NaN values; scores must be finite");
    const int64_t bin = select_bin(host.data(), rank, num_less);
    prefix |= static_cast<key_t>(bin) << shift;
    prefix_mask |= static_cast<key_t>(kBins - 1) << shift;
  }
  return {at::scalar_tensor(key_to_float(prefix), tensors[0].options()),
          at::scalar_tensor(num_less, device_opts)};
}

std::tuple<at::Tensor, at::Tensor> kth_smallest_cuda(at::TensorList tensors, int64_t k) {
  std::vector<at::Tensor> list(tensors.begin(), tensors.end());
  check_kth_inputs(list, k);
  const c10::cuda::CUDAGuard guard(list[0].device());
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, list[0].scalar_type(), "kth_smallest_cuda", [&] {
    out = kth_smallest_impl<scalar_t>(list, k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("kth_smallest", &kth_smallest_cuda); }

}  // namespace fastprune
