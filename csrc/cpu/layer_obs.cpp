// CPU SparseGPT sweep (see layer_obs.h): each thread takes tiles of whole rows and
// sweeps their block segments column by column in cache, the rank-1 updates
// vectorised along the rows; each row of U is read once per tile of rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../layer_obs.h"

namespace fastprune {
namespace {

// Rows per tile: each row of U read from cache serves this many rows' updates.
constexpr int64_t kTile = 8;

// One tile of rows, swept in the contiguous copy seg (tile x count).
template <typename scalar_t>
__attribute__((always_inline)) inline void sweep_tile(scalar_t* seg, const scalar_t* u, bool* pruned,
                                                      scalar_t* err, scalar_t* loss, int64_t tile, int64_t cols,
                                                      int64_t count, int64_t prune_n, int64_t prune_m) {
  scalar_t e[kTile];
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t* urow = u + j * count;
    for (int64_t t = 0; t < tile; ++t) {
      scalar_t* row = seg + t * count;
      bool* drop = pruned + t * cols;
      if (prune_m > 0 && j % prune_m == 0) {
        // The prune_n lowest w^2 / U_cc^2 of this group, on the weights as updated so far
        // (repeated minimum; ties to the lower index).
        for (int64_t n = 0; n < prune_n; ++n) {
          int64_t best = -1;
          scalar_t low = 0;
          for (int64_t c = 0; c < prune_m; ++c) {
            const scalar_t d = u[(j + c) * count + j + c];
            const scalar_t score = row[j + c] * row[j + c] / (d * d);
            if (!drop[j + c] && (best < 0 || score < low)) best = c, low = score;
          }
          drop[j + best] = true;
        }
      }
      const scalar_t q = drop[j] ? scalar_t(0) : row[j];
      e[t] = (row[j] - q) / urow[j];
      loss[t] += e[t] * e[t];
      row[j] = q;
      err[t * count + j] = e[t];
    }
    for (int64_t t = 0; t < tile; ++t) {
      scalar_t* row = seg + t * count;
      const scalar_t et = e[t];
#pragma omp simd
      for (int64_t c = j + 1; c < count; ++c) row[c] -= et * urow[c];
    }
  }
}

// The machine's widest vectors, chosen when the library loads (GCC function multiversioning).
#define FASTPRUNE_SWEEP_TILE(T, NAME)                                                                         \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                                 \
      T* seg, const T* u, bool* pruned, T* err, T* loss, int64_t tile, int64_t cols, int64_t count,          \
      int64_t prune_n, int64_t prune_m) {                                                                     \
    sweep_tile<T>(seg, u, pruned, err, loss, tile, cols, count, prune_n, prune_m);                           \
  }
FASTPRUNE_SWEEP_TILE(float, sweep_tile_f32)
FASTPRUNE_SWEEP_TILE(double, sweep_tile_f64)
#undef FASTPRUNE_SWEEP_TILE

inline void sweep_tile_any(float* seg, const float* u, bool* p, float* e, float* l, int64_t tile, int64_t cols,
                           int64_t count, int64_t pn, int64_t pm) {
  sweep_tile_f32(seg, u, p, e, l, tile, cols, count, pn, pm);
}
inline void sweep_tile_any(double* seg, const double* u, bool* p, double* e, double* l, int64_t tile, int64_t cols,
                           int64_t count, int64_t pn, int64_t pm) {
  sweep_tile_f64(seg, u, p, e, l, tile, cols, count, pn, pm);
}

template <typename scalar_t>
void sweep_rows(scalar_t* w, const scalar_t* u, bool* pruned, scalar_t* err, scalar_t* losses, int64_t rows,
                int64_t cols, int64_t i1, int64_t count, int64_t prune_n, int64_t prune_m) {
  // u is the block's count x count tile of U, contiguous. Rows of W lie cols apart: for
  // a power-of-two width they share cache sets, so each tile of rows is swept in a
  // contiguous copy.
  at::parallel_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> seg(static_cast<size_t>(kTile * count));
    for (int64_t r0 = t0 * kTile; r0 < std::min(rows, t1 * kTile); r0 += kTile) {
      const int64_t tile = std::min(kTile, rows - r0);
      scalar_t loss[kTile] = {};
      for (int64_t t = 0; t < tile; ++t) std::copy_n(w + (r0 + t) * cols + i1, count, seg.data() + t * count);
      sweep_tile_any(seg.data(), u, pruned + r0 * cols + i1, err + r0 * count, loss, tile, cols, count, prune_n,
                     prune_m);
      for (int64_t t = 0; t < tile; ++t) {
        std::copy_n(seg.data() + t * count, count, w + (r0 + t) * cols + i1);
        losses[r0 + t] += loss[t];
      }
    }
  });
}

void sweep_block_cpu(at::Tensor& w, const at::Tensor& u, at::Tensor& pruned, at::Tensor& err, at::Tensor& losses,
                     int64_t i1, int64_t count, int64_t prune_n, int64_t prune_m) {
  const at::Tensor tile = u.narrow(0, i1, count).narrow(1, i1, count).contiguous();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparsegpt_sweep_cpu", [&] {
    sweep_rows<scalar_t>(w.data_ptr<scalar_t>(), tile.const_data_ptr<scalar_t>(), pruned.data_ptr<bool>(),
                         err.data_ptr<scalar_t>(), losses.data_ptr<scalar_t>(), w.size(0), w.size(1), i1, count,
                         prune_n, prune_m);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_sweep_cpu(const at::Tensor& weight, const at::Tensor& hinv,
                                                                   int64_t block_size, double sparsity,
                                                                   int64_t prune_n, int64_t prune_m,
                                                                   const std::optional<at::Tensor>& fixed) {
  return sparsegpt_sweep_impl(weight, hinv, block_size, sparsity, prune_n, prune_m, fixed, sweep_block_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("sparsegpt_sweep", &sparsegpt_sweep_cpu); }

}  // namespace fastprune
