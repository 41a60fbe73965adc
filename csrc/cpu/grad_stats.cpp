// CPU per-sample gradient statistics: the fused column reduction behind grad_sq and
// sum_sq, and the rank-1 (T = 1) sums in one pass (csrc/cuda/grad_stats.cu is the CUDA
// counterpart; the tiles come from grad_stats.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cpu_isa.h"
#include "../grad_stats.h"
#include "simd.h"
#include "sq_tile.h"

namespace fastprune {
namespace {

// Rank-1 sums: g = scale dy^T x and q = scale (dy^2)^T x^2 over the N samples, both
// GEMMs in one pass. A chunk of samples at a time, x and x^2 are packed into panels of
// W = NV vectors of columns (zero-padded) and dy, dy^2 into rows padded to whole tiles;
// a tile of MR output rows by one panel keeps both sums in registers while n runs over
// the chunk, dy[n, o] and dy^2[n, o] broadcast. The GEMMs it replaces are MKL's,
// which runs its AVX2 code on AMD CPUs: on the AVX-512 EPYC the pass is about 1.5x
// faster than the two sgemm calls.
struct Rank1Shape {
  int64_t S, K, O, Op, panels;  // S: the samples packed (one chunk)
};

// The register tile: accumulators for both sums plus the panel row fill the vector
// registers (32 with AVX-512, 16 otherwise).
template <int VB>
struct Rank1Tile {
  static constexpr int NV = VB == 64 ? 3 : 2, MR = VB == 64 ? 4 : 3;
};

template <typename T, int VB>
C10_ALWAYS_INLINE void rank1_tile(const T* __restrict__ xp, const T* __restrict__ x2p, const T* __restrict__ dyp,
                                  const T* __restrict__ dy2p, const Rank1Shape& s, int64_t n0, int64_t n1, int64_t o0,
                                  int64_t k0, T scale, bool add, T* __restrict__ g, T* __restrict__ q) {
  using vec = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes, NV = Rank1Tile<VB>::NV, MR = Rank1Tile<VB>::MR, W = NV * L;
  vec ag[MR][NV], aq[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) ag[r][v] = aq[r][v] = vec{};
  for (int64_t n = n0; n < n1; ++n) {
    const vec* xr = reinterpret_cast<const vec*>(xp + n * W);
    const vec* x2r = reinterpret_cast<const vec*>(x2p + n * W);
    vec xv[NV], x2v[NV];
    for (int v = 0; v < NV; ++v) xv[v] = xr[v], x2v[v] = x2r[v];
    const T* d = dyp + n * s.Op + o0;
    const T* d2 = dy2p + n * s.Op + o0;
    for (int r = 0; r < MR; ++r) {
      const T a = d[r], a2 = d2[r];
      for (int v = 0; v < NV; ++v) {
        ag[r][v] += a * xv[v];
        aq[r][v] += a2 * x2v[v];
      }
    }
  }
  const int rows = static_cast<int>(std::min<int64_t>(MR, s.O - o0));
  const int64_t width = std::min<int64_t>(W, s.K - k0);
  for (int r = 0; r < rows; ++r) {
    T* gr = g + (o0 + r) * s.K + k0;
    T* qr = q + (o0 + r) * s.K + k0;
    if (width == W) {  // whole vectors: stored directly
      for (int v = 0; v < NV; ++v) {
        vec* gv = reinterpret_cast<vec*>(gr + v * L);
        vec* qv = reinterpret_cast<vec*>(qr + v * L);
        *gv = add ? *gv + ag[r][v] * scale : ag[r][v] * scale;
        *qv = add ? *qv + aq[r][v] * scale : aq[r][v] * scale;
      }
      continue;
    }
    alignas(64) T tg[W], tq[W];
    for (int v = 0; v < NV; ++v) {
      *reinterpret_cast<vec*>(tg + v * L) = ag[r][v] * scale;
      *reinterpret_cast<vec*>(tq + v * L) = aq[r][v] * scale;
    }
    if (add) {
      for (int64_t j = 0; j < width; ++j) gr[j] += tg[j], qr[j] += tq[j];
    } else {
      for (int64_t j = 0; j < width; ++j) gr[j] = tg[j], qr[j] = tq[j];
    }
  }
}

// Samples per packed chunk: both panels of a chunk stay in L2 across the o tiles, and the
// packed copies stay small whatever the batch.
constexpr int64_t kRank1Chunk = 256;

// Work items [begin, end) of (panel, block of MR-row tiles) over one packed chunk; `add`:
// the sums already hold earlier chunks'.
template <typename T, int VB>
C10_ALWAYS_INLINE void rank1_items(const T* xp, const T* x2p, const T* dyp, const T* dy2p, const Rank1Shape& s,
                                   int64_t row_blocks, T scale, bool add, T* g, T* q, int64_t begin, int64_t end) {
  constexpr int L = Vec<T, VB>::lanes, W = Rank1Tile<VB>::NV * L, MR = Rank1Tile<VB>::MR;
  const int64_t tiles = s.Op / MR, per_block = (tiles + row_blocks - 1) / row_blocks;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / row_blocks, b = item % row_blocks;
    const int64_t t0 = b * per_block, t1 = std::min(tiles, t0 + per_block);
    for (int64_t t = t0; t < t1; ++t)
      rank1_tile<T, VB>(xp + p * s.S * W, x2p + p * s.S * W, dyp, dy2p, s, 0, s.S, t * MR, p * W, scale, add, g, q);
  }
}

#define FASTPRUNE_RANK1_ENTRY(ATTR, NAME, T, VB)                                                             \
  ATTR void NAME(const T* xp, const T* x2p, const T* dyp, const T* dy2p, const Rank1Shape& s, int64_t blocks, \
                 T scale, bool add, T* g, T* q, int64_t begin, int64_t end) {                                \
    rank1_items<T, VB>(xp, x2p, dyp, dy2p, s, blocks, scale, add, g, q, begin, end);                         \
  }
#define FASTPRUNE_RANK1_ENTRIES(ATTR, ISA, VB)        \
  FASTPRUNE_RANK1_ENTRY(ATTR, rank1_##ISA, float, VB) \
  FASTPRUNE_RANK1_ENTRY(ATTR, rank1_##ISA, double, VB)
FASTPRUNE_EACH_ISA(FASTPRUNE_RANK1_ENTRIES)

template <typename T>
void rank1_dispatch(CpuIsa isa, const T* xp, const T* x2p, const T* dyp, const T* dy2p, const Rank1Shape& s,
                    int64_t blocks, T scale, bool add, T* g, T* q, int64_t begin, int64_t end) {
#ifdef FASTPRUNE_X86
  if (isa == CpuIsa::avx512) return rank1_avx512(xp, x2p, dyp, dy2p, s, blocks, scale, add, g, q, begin, end);
  if (isa == CpuIsa::avx2) return rank1_avx2(xp, x2p, dyp, dy2p, s, blocks, scale, add, g, q, begin, end);
#endif
  rank1_generic(xp, x2p, dyp, dy2p, s, blocks, scale, add, g, q, begin, end);
}

// Rows [0, s.S) of x (row stride ldx, unit column stride) and dy (contiguous) packed as
// rank1_items reads them (panels of W columns), with the row sums of x^2. Unit-stride
// rows pack as vectorised copies (the row sums reordered, hence `omp simd reduction`).
template <typename T>
void pack_chunk(const T* xd, int64_t ldx, const T* dd, const Rank1Shape& s, int64_t W, T* xpd, T* x2pd, T* dypd,
                T* dy2pd, T* rows) {
  at::parallel_for(0, s.S, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* src = xd + n * ldx;
      T total = 0;
      for (int64_t p = 0; p < s.panels; ++p) {
        T* __restrict__ dst = xpd + (p * s.S + n) * W;
        T* __restrict__ dst2 = x2pd + (p * s.S + n) * W;
        const int64_t width = std::min<int64_t>(W, s.K - p * W);
        const T* part = src + p * W;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < width; ++j) {
          const T v = part[j];
          dst[j] = v, dst2[j] = v * v;
          total += v * v;
        }
        for (int64_t j = width; j < W; ++j) dst[j] = dst2[j] = T(0);
      }
      rows[n] = total;
      T* __restrict__ d = dypd + n * s.Op;
      T* __restrict__ d2 = dy2pd + n * s.Op;
      const T* dn = dd + n * s.O;
#pragma omp simd
      for (int64_t o = 0; o < s.O; ++o) d[o] = dn[o], d2[o] = dn[o] * dn[o];
      for (int64_t o = s.O; o < s.Op; ++o) d[o] = d2[o] = T(0);
    }
  });
}

// x (N, K) and dy (N, O), any strides; grad and sq (O, K) contiguous. See GemmRank1.
template <typename T>
void rank1_sums(const at::Tensor& x, const at::Tensor& dy, at::Tensor& grad, at::Tensor& sq, at::Tensor& x_sq_rows,
                double scale) {
  const CpuIsa isa = cpu_isa();
  const int vb = each_isa_vector_bytes(isa);
  const int64_t L = vb / static_cast<int64_t>(sizeof(T)), W = (vb == 64 ? 3 : 2) * L, MR = vb == 64 ? 4 : 3;
  const int64_t N = x.size(0), K = x.size(1), O = dy.size(1), C = std::min(N, kRank1Chunk);
  const int64_t Op = (O + MR - 1) / MR * MR, panels = (K + W - 1) / W;
  at::Tensor xp = empty_cached({panels, C, W}, x.options()), x2p = empty_cached({panels, C, W}, x.options());
  at::Tensor dyp = empty_cached({C, Op}, x.options()), dy2p = empty_cached({C, Op}, x.options());
  // A transposed x (Linear's input may be) is made contiguous first.
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous(), dc = dy.contiguous();
  const T* xd = xc.const_data_ptr<T>();
  const T* dd = dc.const_data_ptr<T>();
  const int64_t ldx = xc.stride(0);
  T* xpd = xp.data_ptr<T>();
  T* x2pd = x2p.data_ptr<T>();
  T* dypd = dyp.data_ptr<T>();
  T* dy2pd = dy2p.data_ptr<T>();
  T* rows = x_sq_rows.data_ptr<T>();
  T* g = grad.data_ptr<T>();
  T* q = sq.data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(Op / MR, (threads + panels - 1) / panels));
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const Rank1Shape s{std::min(C, N - c0), K, O, Op, panels};
    pack_chunk(xd + c0 * ldx, ldx, dd + c0 * O, s, W, xpd, x2pd, dypd, dy2pd, rows + c0);
    at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
      rank1_dispatch<T>(isa, xpd, x2pd, dypd, dy2pd, s, blocks, static_cast<T>(scale), c0 > 0, g, q, begin, end);
    });
  }
}

// T > 1 (Linear over positions): G_n summed over t and squared in registers by sq_rows,
// x[n, g, t, k] read in place through offset tables (any strides), dy's rows in place
// when they are whole unit-stride vectors, else copied into zero-padded rows. It
// replaces one GEMM per sample plus a pass over each G_n (MKL's AVX2 code on AMD CPUs):
// the token FFN's 256->512 layer at batch 64 x 64 tokens took 6.5 ms that way.
struct PositionsWork {
  int64_t N, G, T, K, O, Op, chunks;
  int64_t xn, xg, dn, dg, dt, dout;  // strides of x (samples, groups) and dy
  const int64_t* toff;               // (T) t * x's position stride
  const int64_t* koff;               // (K) k * x's feature stride
  bool direct;                       // dy's rows are read in place
};

template <typename T, int VB>
C10_ALWAYS_INLINE void positions_items(const T* x, const T* dy, const PositionsWork& w, T* gt, T* qt, T* scratch,
                                       int64_t begin, int64_t end) {
  const int64_t chunk = (w.K + w.chunks - 1) / w.chunks;
  if (!w.direct) std::fill(scratch, scratch + w.T * w.Op, T(0));  // the padding columns stay zero
  for (int64_t item = begin; item < end; ++item) {
    const int64_t g = item / w.chunks, k0 = (item % w.chunks) * chunk, k1 = std::min(w.K, k0 + chunk);
    if (k0 >= k1) continue;
    for (int64_t n = 0; n < w.N; ++n) {
      const T* dyb = dy + n * w.dn + g * w.dg;
      if (!w.direct) {
        for (int64_t t = 0; t < w.T; ++t)
          for (int64_t o = 0; o < w.O; ++o) scratch[t * w.Op + o] = dyb[t * w.dt + o * w.dout];
      }
      sq_rows<T, VB>(x + n * w.xn + g * w.xg, w.koff, w.K, k0, k1, w.toff, w.T, w.direct ? dyb : scratch,
                     w.direct ? w.dt : w.Op, w.Op, gt + g * w.K * w.Op, qt + g * w.K * w.Op);
    }
  }
}

#define FASTPRUNE_POSITIONS_ENTRY(ATTR, NAME, T, VB)                                                          \
  ATTR void NAME(const T* x, const T* dy, const PositionsWork& w, T* gt, T* qt, T* scratch, int64_t begin,   \
                 int64_t end) {                                                                             \
    positions_items<T, VB>(x, dy, w, gt, qt, scratch, begin, end);                                         \
  }
#define FASTPRUNE_POSITIONS_ENTRIES(ATTR, ISA, VB)            \
  FASTPRUNE_POSITIONS_ENTRY(ATTR, positions_##ISA, float, VB) \
  FASTPRUNE_POSITIONS_ENTRY(ATTR, positions_##ISA, double, VB)
FASTPRUNE_EACH_ISA(FASTPRUNE_POSITIONS_ENTRIES)

template <typename T>
void positions_dispatch(CpuIsa isa, const T* x, const T* dy, const PositionsWork& w, T* gt, T* qt, T* scratch,
                        int64_t begin, int64_t end) {
#ifdef FASTPRUNE_X86
  if (isa == CpuIsa::avx512) return positions_avx512(x, dy, w, gt, qt, scratch, begin, end);
  if (isa == CpuIsa::avx2) return positions_avx2(x, dy, w, gt, qt, scratch, begin, end);
#endif
  positions_generic(x, dy, w, gt, qt, scratch, begin, end);
}

// Output channels per group from which the kernel beats the GEMM loop (the same cut as
// the conv kernel's, IMPLICIT_CONV_MIN_CHANNELS in fastprune/stats/formulas.py).
constexpr int64_t kPositionsMinOutputs = 32;

template <typename T>
void positions_sums(const at::Tensor& x, const at::Tensor& dy, at::Tensor& grad, at::Tensor& sq) {
  const CpuIsa isa = cpu_isa();
  const int64_t L = each_isa_vector_bytes(isa) / static_cast<int64_t>(sizeof(T));
  const int64_t N = x.size(0), G = x.size(1), Tn = x.size(2), K = x.size(3), O = dy.size(3);
  const int64_t Op = (O + L - 1) / L * L, threads = at::get_num_threads();
  std::vector<int64_t> toff(Tn), koff(K);
  for (int64_t t = 0; t < Tn; ++t) toff[t] = t * x.stride(2);
  for (int64_t k = 0; k < K; ++k) koff[k] = k * x.stride(3);
  const bool direct = dy.stride(3) == 1 && Op == O;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((threads + G - 1) / G, K / 8));
  const PositionsWork w{N, G, Tn, K, O, Op, chunks, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                        dy.stride(2), dy.stride(3), toff.data(), koff.data(), direct};
  at::Tensor gt = empty_cached({G, K, Op}, x.options()).zero_(), qt = empty_cached({G, K, Op}, x.options()).zero_();
  at::Tensor scratch = empty_cached({threads, direct ? 1 : Tn * Op}, x.options());
  at::parallel_for(0, G * chunks, 1, [&](int64_t begin, int64_t end) {
    positions_dispatch<T>(isa, x.const_data_ptr<T>(), dy.const_data_ptr<T>(), w, gt.data_ptr<T>(),
                          qt.data_ptr<T>(), scratch.data_ptr<T>() + at::get_thread_num() * scratch.size(1), begin,
                          end);
  });
  grad.copy_(gt.narrow(2, 0, O).transpose(1, 2));
  sq.copy_(qt.narrow(2, 0, O).transpose(1, 2));
}

// The CPU's kernels for grad_sq_impl (see AtenKernels).
struct CpuKernels {
  bool rank1(const at::Tensor& x, const at::Tensor& dy, at::Tensor& grad, at::Tensor& sq,
             at::Tensor& x_sq_rows, double scale) const {
    if (x.size(0) == 0 || !grad.is_contiguous() || !sq.is_contiguous()) return false;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grad_sq_rank1_cpu",
                               [&] { rank1_sums<scalar_t>(x, dy, grad, sq, x_sq_rows, scale); });
    return true;
  }
  bool positions(const at::Tensor& x, const at::Tensor& dy, at::Tensor& grad, at::Tensor& sq) const {
    if (x.size(0) == 0 || dy.size(3) < kPositionsMinOutputs) return false;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grad_sq_positions_cpu",
                               [&] { positions_sums<scalar_t>(x, dy, grad, sq); });
    return true;
  }
};

// grad[j] += sum_s tile[s, j]; sq[j] += sum_s tile[s, j]^2 in one read of the tile.
// Threads own column ranges, so rows are read contiguously and vectorise.
template <typename scalar_t>
void reduce_tile_kernel(const scalar_t* t, int64_t S, int64_t P, scalar_t* g, scalar_t* q) {
  at::parallel_for(0, P, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t* row = t + s * P;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t v = row[j];
        g[j] += v;
        q[j] += v * v;
      }
    }
  });
}

void reduce_tile_cpu(const at::Tensor& tile, at::Tensor& grad, at::Tensor& sq) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "grad_sq_reduce_cpu", [&] {
    reduce_tile_kernel<scalar_t>(tile.const_data_ptr<scalar_t>(), tile.size(0), tile.size(1),
                                 grad.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> grad_sq_cpu(const at::Tensor& x, const at::Tensor& dy) {
  return grad_sq_only(x, dy, reduce_tile_cpu, CpuKernels{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_bias_sq_cpu(
    const at::Tensor& x, const at::Tensor& dy, double scale) {
  return grad_bias_sq_op(x, dy, scale, reduce_tile_cpu, CpuKernels{});
}

std::tuple<at::Tensor, at::Tensor> sum_sq_cpu(const at::Tensor& t) { return sum_sq_impl(t, reduce_tile_cpu); }

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("grad_sq", &grad_sq_cpu);
  m.impl("grad_bias_sq", &grad_bias_sq_cpu);
  m.impl("sum_sq", &sum_sq_cpu);
}

}  // namespace fastprune
