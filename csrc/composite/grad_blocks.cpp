// Per-sample gradients and Fisher blocks of a grouped linear map, built from the
// tiles of grad_stats.h and batched GEMMs only, so one definition serves every device.
#include <torch/library.h>

#include "../grad_stats.h"

namespace fastprune {
namespace {

at::Tensor per_sample_grads(const at::Tensor& x, const at::Tensor& dy) {
  check_stats_inputs(x, dy, "per_sample_grads");
  const auto acc = acc_type(x.scalar_type());
  return per_sample_tile(x.to(acc), dy.to(acc), 0, x.size(0));
}

// blocks[b] += sum_n G_n[b] G_n[b]^T for blocks of B consecutive weights; the last
// block is zero-padded when B does not divide the weight count.
void grad_blocks_accumulate(const at::Tensor& x_in, const at::Tensor& dy_in, at::Tensor blocks) {
  check_stats_inputs(x_in, dy_in, "grad_blocks_accumulate");
  const int64_t N = x_in.size(0), P = x_in.size(1) * dy_in.size(3) * x_in.size(3);
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), "grad_blocks_accumulate: blocks must be "
              "(num_blocks, B, B), got ", blocks.sizes());
  const int64_t nb = blocks.size(0), B = blocks.size(1);
  TORCH_CHECK(nb * B >= P && (nb - 1) * B < P, "grad_blocks_accumulate: ", nb, " blocks of ", B,
              " do not tile ", P, " weights; use ceil(", P, " / ", B, ") blocks");
  TORCH_CHECK(blocks.is_contiguous() && blocks.scalar_type() == acc_type(x_in.scalar_type()) &&
              blocks.device() == x_in.device(), "grad_blocks_accumulate: blocks must be contiguous, of dtype ",
              acc_type(x_in.scalar_type()), " and on ", x_in.device());
  const auto acc = blocks.scalar_type();
  const at::Tensor x = x_in.to(acc), dy = dy_in.to(acc);
  const int64_t step = samples_per_tile(nb * B);
  for (int64_t s0 = 0; s0 < N; s0 += step) {
    at::Tensor g = per_sample_tile(x, dy, s0, std::min(N, s0 + step));
    if (nb * B != P) g = at::constant_pad_nd(g, {0, nb * B - P});
    const at::Tensor gt = g.view({g.size(0), nb, B}).permute({1, 2, 0});  // (nb, B, S)
    blocks.baddbmm_(gt, gt.transpose(1, 2));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("per_sample_grads", &per_sample_grads);
  m.impl("grad_blocks_accumulate", &grad_blocks_accumulate);
}

}  // namespace fastprune
