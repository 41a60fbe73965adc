// CPU sparse x dense products: Y = W X for a row-compressed W, and the gradient
// of the stored values, dW[j] = <dY[row_j], X[col_j]> summed over B.
//
// Each work item is one (b, column tile, row): the row's nonzeros stream once
// while a tile of output columns (the batch, for Linear) stays in registers, and
// every nonzero adds a contiguous run of X's row col_j. The vectors are the
// widest the CPU has (64 bytes with AVX-512, 32 with AVX2), chosen at run time
// (cpu_isa.h); tiles are narrowed so that one tile of X stays in L2.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../buffer_cache.h"
#include "../cpu_isa.h"
#include "../sparse_mm.h"
#include "simd.h"

namespace fastprune {
namespace {

// Column indices are stored as int16 and read as unsigned (up to 65536 columns).
template <typename I>
C10_ALWAYS_INLINE int64_t col(const I* c, int64_t j) {
  if constexpr (sizeof(I) == 2) return static_cast<uint16_t>(c[j]);
  else return c[j];
}

struct Tile {
  int64_t m0, width;
};

// Widths of 8, 4, 2 and 1 vectors of `lanes` (fixed widths keep the accumulators
// in registers), then one half vector, then a tail narrower than that.
std::vector<Tile> column_tiles(int64_t M, int64_t lanes) {
  std::vector<Tile> tiles;
  int64_t m0 = 0;
  const int64_t widest = 8 * lanes;
  for (; M - m0 >= widest; m0 += widest) tiles.push_back({m0, widest});
  for (int64_t w = widest / 2; w >= lanes / 2; w /= 2) {  // each narrower width at most once
    if (M - m0 >= w) {
      tiles.push_back({m0, w});
      m0 += w;
    }
  }
  if (m0 < M) tiles.push_back({m0, M - m0});
  return tiles;
}

// One output row over V vectors of VB bytes from column m0. Narrow tiles run U
// independent accumulator sets over interleaved nonzeros, so at least eight FMA
// chains are in flight: two FMA units of four cycles' latency. (Four chains left
// batch 8 at half speed: 2 cycles a nonzero on the EPYC.)
template <typename T, typename I, int VB, int V>
C10_ALWAYS_INLINE void row_tile(const int32_t* __restrict__ rp, const I* __restrict__ ci, const T* __restrict__ v,
                                const T* __restrict__ xb, int64_t M, int64_t m0, int64_t o, T bias,
                                T* __restrict__ dst) {
  using vec = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes, U = V >= 8 ? 1 : 8 / V;
  vec acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < V; ++k) acc[u][k] = vec{};
  const int32_t begin = rp[o], end = rp[o + 1];
  int32_t j = begin;
  for (; j + U <= end; j += U) {
    for (int u = 0; u < U; ++u) {
      const T w = v[j + u];
      const vec* xr = reinterpret_cast<const vec*>(xb + col(ci, j + u) * M + m0);
      for (int k = 0; k < V; ++k) acc[u][k] += w * xr[k];
    }
  }
  for (; j < end; ++j) {
    const vec* xr = reinterpret_cast<const vec*>(xb + col(ci, j) * M + m0);
    for (int k = 0; k < V; ++k) acc[0][k] += v[j] * xr[k];
  }
  for (int u = 1; u < U; ++u)
    for (int k = 0; k < V; ++k) acc[0][k] += acc[u][k];
  for (int k = 0; k < V; ++k) *reinterpret_cast<vec*>(dst + k * L) = acc[0][k] + bias;
}

// Fewer than half a vector of columns (M == 1 is Linear at batch 1): scalar
// multiply-adds over NW columns, four nonzeros in flight.
template <typename T, typename I, int NW>
C10_ALWAYS_INLINE void row_narrow(const int32_t* __restrict__ rp, const I* __restrict__ ci, const T* __restrict__ v,
                                  const T* __restrict__ xb, int64_t M, int64_t m0, int64_t o, T bias,
                                  T* __restrict__ dst) {
  T acc[4][NW] = {};
  const int32_t begin = rp[o], end = rp[o + 1];
  int32_t j = begin;
  for (; j + 4 <= end; j += 4) {
    for (int u = 0; u < 4; ++u) {
      const T w = v[j + u];
      const T* xr = xb + col(ci, j + u) * M + m0;
      for (int c = 0; c < NW; ++c) acc[u][c] += w * xr[c];
    }
  }
  for (; j < end; ++j) {
    const T* xr = xb + col(ci, j) * M + m0;
    for (int c = 0; c < NW; ++c) acc[0][c] += v[j] * xr[c];
  }
  for (int c = 0; c < NW; ++c) dst[c] = (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]) + bias;
}

// Output row o over one column tile, written to dst (the tile's first column).
template <typename T, typename I, int VB>
C10_ALWAYS_INLINE void row_any(const int32_t* rp, const I* ci, const T* v, const T* xb, int64_t M, const Tile& tile,
                               int64_t o, T bo, T* dst) {
  constexpr int L = Vec<T, VB>::lanes;
  switch (tile.width / L) {
    case 8: return row_tile<T, I, VB, 8>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 4: return row_tile<T, I, VB, 4>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 2: return row_tile<T, I, VB, 2>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 1: return row_tile<T, I, VB, 1>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
  }
  if (tile.width == L / 2) return row_tile<T, I, VB / 2, 1>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
  switch (tile.width) {  // under half a vector: at most 7 floats or 3 doubles
    case 1: return row_narrow<T, I, 1>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 2: return row_narrow<T, I, 2>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 3: return row_narrow<T, I, 3>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 4: return row_narrow<T, I, 4>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 5: return row_narrow<T, I, 5>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    case 6: return row_narrow<T, I, 6>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
    default: return row_narrow<T, I, 7>(rp, ci, v, xb, M, tile.m0, o, bo, dst);
  }
}

// Rows per work item when the output is (B, M, O): they are staged in a small
// buffer and stored as runs of kRowBlock contiguous outputs per column, instead
// of one 4-byte store per O-strided line (which thrashes L1 when O*4 is 4 KiB).
constexpr int64_t kRowBlock = 8;

// Work items [begin, end) of (b, column tile, row block); a row block is one row
// for the (B, O, M) output and kRowBlock rows for (B, M, O) (rows_last).
template <typename T, typename I, int VB>
C10_ALWAYS_INLINE void spmm_items(const int32_t* rp, const I* ci, const T* v, const T* x, const T* bias, T* out,
                                  int64_t O, int64_t K, int64_t M, const Tile* tiles, int64_t num_tiles,
                                  int64_t begin, int64_t end, bool rows_last) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t rows = rows_last ? kRowBlock : 1, blocks = (O + rows - 1) / rows;
  alignas(64) T stage[kRowBlock][8 * L];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t o0 = (item % blocks) * rows, t = (item / blocks) % num_tiles, b = item / (blocks * num_tiles);
    const int64_t o1 = std::min(O, o0 + rows);
    const T* xb = x + b * K * M;
    const Tile tile = tiles[t];
    if (!rows_last) {
      row_any<T, I, VB>(rp, ci, v, xb, M, tile, o0, bias ? bias[o0] : T(0), out + (b * O + o0) * M + tile.m0);
      continue;
    }
    for (int64_t o = o0; o < o1; ++o)
      row_any<T, I, VB>(rp, ci, v, xb, M, tile, o, bias ? bias[o] : T(0), stage[o - o0]);
    for (int64_t m = 0; m < tile.width; ++m) {
      T* orow = out + (b * M + tile.m0 + m) * O + o0;
      for (int64_t r = 0; r < o1 - o0; ++r) orow[r] = stage[r][m];
    }
  }
}

struct SpmmArgs {
  int64_t O, K, M;
  const Tile* tiles;
  int64_t num_tiles;
  bool rows_last;
};

// One plain function per (type, index, vector extension): the target attribute
// compiles the inlined kernel for that extension.
#define FASTPRUNE_SPMM_ENTRY(ATTR, NAME, T, I, VB)                                                          \
  ATTR void NAME(const int32_t* rp, const I* ci, const T* v, const T* x, const T* bias, T* out,               \
                 const SpmmArgs& a, int64_t begin, int64_t end) {                                             \
    spmm_items<T, I, VB>(rp, ci, v, x, bias, out, a.O, a.K, a.M, a.tiles, a.num_tiles, begin, end, a.rows_last); \
  }
#define FASTPRUNE_SPMM_ENTRIES(ATTR, ISA, VB)                   \
  FASTPRUNE_SPMM_ENTRY(ATTR, spmm_##ISA, float, int16_t, VB)    \
  FASTPRUNE_SPMM_ENTRY(ATTR, spmm_##ISA, float, int32_t, VB)    \
  FASTPRUNE_SPMM_ENTRY(ATTR, spmm_##ISA, double, int16_t, VB)   \
  FASTPRUNE_SPMM_ENTRY(ATTR, spmm_##ISA, double, int32_t, VB)
FASTPRUNE_SPMM_ENTRIES(, generic, 32)
#ifdef FASTPRUNE_X86
FASTPRUNE_SPMM_ENTRIES(FASTPRUNE_AVX2, avx2, 32)
FASTPRUNE_SPMM_ENTRIES(FASTPRUNE_AVX512, avx512, 64)
#endif

// The vector width of an extension's kernel, in bytes.
int vector_bytes(CpuIsa isa) { return isa == CpuIsa::avx512 ? 64 : 32; }

template <typename T, typename I>
void spmm_dispatch(CpuIsa isa, const int32_t* rp, const I* ci, const T* v, const T* x, const T* bias, T* out,
                   const SpmmArgs& a, int64_t begin, int64_t end) {
#ifdef FASTPRUNE_X86
  if (isa == CpuIsa::avx512) return spmm_avx512(rp, ci, v, x, bias, out, a, begin, end);
  if (isa == CpuIsa::avx2) return spmm_avx2(rp, ci, v, x, bias, out, a, begin, end);
#endif
  spmm_generic(rp, ci, v, x, bias, out, a, begin, end);
}

// x (B, K, M) -> (B, O, M), or (B, M, O) with rows_last.
at::Tensor spmm_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                    const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in, bool rows_last) {
  check_csr(row_ptr, col_idx, values, "sparse_mm");
  check_activations(x_in, values, "sparse_mm");
  const int64_t O = row_ptr.size(0) - 1, B = x_in.size(0), K = x_in.size(1), M = x_in.size(2);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = checked_bias(bias_in, O, values);
  at::Tensor out = empty_cached(rows_last ? at::IntArrayRef{B, M, O} : at::IntArrayRef{B, O, M}, x.options());
  const CpuIsa isa = cpu_isa();
  const int64_t vb = vector_bytes(isa), lanes = vb / values.element_size();
  const auto tiles = column_tiles(M, lanes);
  const int64_t rows = rows_last ? kRowBlock : 1;
  const int64_t nt = static_cast<int64_t>(tiles.size()), items = B * nt * ((O + rows - 1) / rows);
  if (items == 0) return out;
  const SpmmArgs args{O, K, M, tiles.data(), nt, rows_last};
  // About 4096 multiply-adds per task keeps the scheduling overhead small.
  const int64_t per_row = std::max<int64_t>(1, values.numel() / std::max<int64_t>(O, 1)) * std::min<int64_t>(M, 64);
  const int64_t grain = std::max<int64_t>(1, 4096 / (per_row * rows));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_mm_cpu", [&] {
    const auto run = [&](auto idx) {
      using I = decltype(idx);
      const I* ci = col_idx.const_data_ptr<I>();
      at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
        spmm_dispatch<scalar_t, I>(isa, row_ptr.const_data_ptr<int32_t>(), ci, values.const_data_ptr<scalar_t>(),
                                   x.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                   out.data_ptr<scalar_t>(), args, begin, end);
      });
    };
    if (col_idx.scalar_type() == at::kShort) run(int16_t{});
    else run(int32_t{});
  });
  return out;
}

// dv[j] = sum_b <dy[b, row_j, :], x[b, col_j, :]>: the gradient of the stored values.
template <typename T, typename I>
void values_grad_rows(const int32_t* rp, const I* ci, const T* x, const T* dy, T* dv, int64_t B, int64_t O,
                      int64_t K, int64_t M, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
      T acc = 0;
      const int64_t c = col(ci, j);
      for (int64_t b = 0; b < B; ++b) {
        const T* __restrict__ xr = x + (b * K + c) * M;
        const T* __restrict__ gr = dy + (b * O + o) * M;
#pragma omp simd reduction(+ : acc)
        for (int64_t m = 0; m < M; ++m) acc += gr[m] * xr[m];
      }
      dv[j] = acc;
    }
  }
}

at::Tensor sparse_mm_values_grad_cpu_3d(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                                     const at::Tensor& x_in, const at::Tensor& dy_in) {
  check_csr(row_ptr, col_idx, values, "sparse_mm_values_grad");
  check_activations(x_in, values, "sparse_mm_values_grad");
  const int64_t O = row_ptr.size(0) - 1, B = x_in.size(0), K = x_in.size(1), M = x_in.size(2);
  check_output_grad(dy_in, B, O, M, values);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  at::Tensor dv = at::empty_like(values);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, values.numel() / std::max<int64_t>(O, 1) * B * M));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_mm_values_grad_cpu", [&] {
    const auto run = [&](auto idx) {
      using I = decltype(idx);
      at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
        values_grad_rows<scalar_t, I>(row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<I>(),
                                      x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                      dv.data_ptr<scalar_t>(), B, O, K, M, o0, o1);
      });
    };
    if (col_idx.scalar_type() == at::kShort) run(int16_t{});
    else run(int32_t{});
  });
  return dv;
}

// (R, C) -> contiguous (C, R) in 8 x 8 blocks (8 lines of a 4 KiB-strided side
// still fit one L1 set), threads owning output rows.
template <typename T>
void transpose_blocked(const T* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t C) {
  constexpr int64_t kB = 8;
  // Small inputs (Linear at batch 8: 32k elements) go in one thread: a parallel region's
  // fork and join cost more than the copy.
  const int64_t grain = R * C <= (int64_t{1} << 16) ? (C + kB - 1) / kB : 16;
  at::parallel_for(0, (C + kB - 1) / kB, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kB; c0 < std::min(C, b1 * kB); c0 += kB) {
      const int64_t c1 = std::min(C, c0 + kB);
      for (int64_t r0 = 0; r0 < R; r0 += kB) {
        const int64_t r1 = std::min(R, r0 + kB);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * R + r] = src[r * C + c];
      }
    }
  });
}

at::Tensor transpose_cpu(const at::Tensor& t) {
  if (t.size(0) == 1 || t.size(1) == 1 || !at::isFloatingType(t.scalar_type()) ||
      t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) {
    return t.t().contiguous();  // a view when one side is 1
  }
  const at::Tensor src = t.contiguous();
  at::Tensor dst = empty_cached({t.size(1), t.size(0)}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "transpose_cpu", [&] {
    transpose_blocked(src.const_data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), t.size(0), t.size(1));
  });
  return dst;
}

// Linear's (N, K) layout is read through a transposed copy and written directly.
at::Tensor sparse_mm_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                         const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "sparse_mm: x must be (B, K, M) or (N, K), got ", x.sizes());
  if (x.dim() == 3) return spmm_cpu(row_ptr, col_idx, values, x, bias, false);
  return spmm_cpu(row_ptr, col_idx, values, transpose_cpu(x).unsqueeze(0), bias, true).squeeze(0);
}

at::Tensor sparse_mm_values_grad_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                                     const at::Tensor& x, const at::Tensor& dy) {
  return values_grad_any_layout(sparse_mm_values_grad_cpu_3d, transpose_cpu, row_ptr, col_idx, values, x, dy);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("sparse_mm", &sparse_mm_cpu);
  m.impl("sparse_mm_values_grad", &sparse_mm_values_grad_cpu);
}

}  // namespace fastprune
