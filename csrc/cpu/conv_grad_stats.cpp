// CPU conv_grad_bias_sq: per-sample Conv2d weight (and bias) statistics by implicit
// GEMM, never unfolding the input.
//
// For each sample, the kernel pads the input into a small buffer and transposes the
// output gradient to (T, O) rows. A register tile (sq_tile.h) then holds G_n for MR
// weight rows k by up to three vectors of output channels o, summed over the positions
// t: each step broadcasts X_n[k, t] (read from the padded input through per-row and
// per-position offsets: no im2col) against one row of dy^T. The tile is squared
// and added to the sums while still in registers, so G_n is never stored. Unlike
// im2col + one GEMM per sample (the grad_bias_sq route), nothing the size of the
// unfolded batch is written or read again; threads own weight rows, so the sums
// need no reduction across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../buffer_cache.h"
#include "../conv_grad_stats.h"
#include "../cpu_isa.h"
#include "../grad_stats.h"
#include "simd.h"
#include "sq_tile.h"

namespace fastprune {
namespace {

// Sums are kept transposed, (G, Kg, Op) with Op = Og rounded up to whole vectors, so
// that a tile row is whole vectors of o.
struct Work {
  ConvGeometry g;
  int64_t Op;            // padded output channels per group
  int64_t row_chunks;    // work items per group, each a range of weight rows
  const int64_t* toff;   // (T) offset of position t in the padded input
  const int64_t* koff;   // (Kg) offset of weight row k in the padded input
  int64_t scratch;       // elements of one thread's scratch: padded input and dy^T
};

// An L x L block of src (rows ld_src apart) written transposed to dst (rows ld_dst
// apart), L the lanes of one vector: log2(L) rounds of interleaving rows i and
// i + L/2 give the transpose, about 4x faster than scalar copies. (__builtin_shuffle is
// GCC's; other compilers copy scalars.)
template <typename T, int VB>
C10_ALWAYS_INLINE void transpose_block(const T* __restrict__ src, int64_t ld_src, T* __restrict__ dst, int64_t ld_dst) {
#if !(defined(__GNUC__) && !defined(__clang__))
  constexpr int L = Vec<T, VB>::lanes;
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#else
  using vec = typename Vec<T, VB>::type;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_t;
  typedef index_t mask __attribute__((vector_size(VB)));
  constexpr int L = Vec<T, VB>::lanes;
  mask lo, hi;
  for (int k = 0; k < L / 2; ++k) {
    lo[2 * k] = k, lo[2 * k + 1] = L + k;
    hi[2 * k] = L / 2 + k, hi[2 * k + 1] = L + L / 2 + k;
  }
  vec r[L], out[L];
  for (int i = 0; i < L; ++i) r[i] = *reinterpret_cast<const vec*>(src + i * ld_src);
  for (int round = 1; round < L; round *= 2) {
    for (int i = 0; i < L / 2; ++i) {
      out[2 * i] = __builtin_shuffle(r[i], r[i + L / 2], lo);
      out[2 * i + 1] = __builtin_shuffle(r[i], r[i + L / 2], hi);
    }
    for (int i = 0; i < L; ++i) r[i] = out[i];
  }
  for (int i = 0; i < L; ++i) *reinterpret_cast<vec*>(dst + i * ld_dst) = r[i];
#endif
}

// dy of one sample and group, (Og, Tn) rows, into dyt (Tn, Op): whole vector blocks
// by transpose_block, the edges by scalars. Columns from Og on stay as they are (zero).
template <typename T, int VB>
C10_ALWAYS_INLINE void transpose_dy(const T* src, int64_t Og, int64_t Tn, T* dyt, int64_t Op) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t of = Og / L * L, tf = Tn / L * L;
  for (int64_t o0 = 0; o0 < of; o0 += L) {
    for (int64_t t0 = 0; t0 < tf; t0 += L) transpose_block<T, VB>(src + o0 * Tn + t0, Tn, dyt + t0 * Op + o0, Op);
    for (int64_t t = tf; t < Tn; ++t)
      for (int64_t o = o0; o < o0 + L; ++o) dyt[t * Op + o] = src[o * Tn + t];
  }
  for (int64_t o = of; o < Og; ++o)
    for (int64_t t = 0; t < Tn; ++t) dyt[t * Op + o] = src[o * Tn + t];
}

// Weight rows [k0, k1) of group grp over every sample: gt/qt point at the group's
// (Kg, Op) sums, bias_ps (N, O) gets the per-sample bias gradients when non-null.
template <typename T, int VB>
C10_ALWAYS_INLINE void rows_task(const T* x, const T* dy, const Work& w, int64_t grp, int64_t k0, int64_t k1, T* gt,
                                 T* qt, T* bias_ps, T* scratch) {
  const ConvGeometry& g = w.g;
  const int64_t Cg = g.Cg(), Og = g.Og(), Kg = g.Kg(), Tn = g.T(), Op = w.Op;
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  T* padded = scratch;  // (Cg, Hp, Wp), then dy^T (Tn, Op): their borders stay zero
  T* dyt = scratch + Cg * Hp * Wp;
  std::fill(scratch, scratch + w.scratch, T(0));
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < Cg; ++c) {
      const T* src = x + ((n * g.C + grp * Cg + c) * g.H) * g.W;
      for (int64_t h = 0; h < g.H; ++h)
        std::memcpy(padded + (c * Hp + h + g.ph) * Wp + g.pw, src + h * g.W, g.W * sizeof(T));
    }
    transpose_dy<T, VB>(dy + (n * g.O + grp * Og) * Tn, Og, Tn, dyt, Op);
    if (bias_ps) {  // sums over t of dy^T's rows: independent lanes, so they vectorise
      T* b = bias_ps + n * g.O + grp * Og;
      std::fill(b, b + Og, T(0));
      for (int64_t t = 0; t < Tn; ++t) {
        const T* row = dyt + t * Op;
#pragma omp simd
        for (int64_t o = 0; o < Og; ++o) b[o] += row[o];
      }
    }
    sq_rows<T, VB>(padded, w.koff, Kg, k0, k1, w.toff, Tn, dyt, Op, Op, gt, qt);
  }
}

template <typename T, int VB>
C10_ALWAYS_INLINE void conv_items(const T* x, const T* dy, const Work& w, T* gt, T* qt, T* bias_ps, T* scratch,
                                  int64_t begin, int64_t end) {
  const int64_t Kg = w.g.Kg(), chunk = (Kg + w.row_chunks - 1) / w.row_chunks;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t grp = item / w.row_chunks, c = item % w.row_chunks;
    const int64_t k0 = c * chunk, k1 = std::min(Kg, k0 + chunk);
    if (k0 >= k1) continue;
    const int64_t at = grp * Kg * w.Op;
    rows_task<T, VB>(x, dy, w, grp, k0, k1, gt + at, qt + at, c == 0 ? bias_ps : nullptr, scratch);
  }
}

#define FASTPRUNE_CONV_ENTRY(ATTR, NAME, T, VB)                                                           \
  ATTR void NAME(const T* x, const T* dy, const Work& w, T* gt, T* qt, T* bias_ps, T* scratch, int64_t begin, \
                 int64_t end) {                                                                             \
    conv_items<T, VB>(x, dy, w, gt, qt, bias_ps, scratch, begin, end);                                      \
  }
#define FASTPRUNE_CONV_ENTRIES(ATTR, ISA, VB)         \
  FASTPRUNE_CONV_ENTRY(ATTR, conv_##ISA, float, VB)   \
  FASTPRUNE_CONV_ENTRY(ATTR, conv_##ISA, double, VB)
FASTPRUNE_EACH_ISA(FASTPRUNE_CONV_ENTRIES)

template <typename T>
void conv_dispatch(CpuIsa isa, const T* x, const T* dy, const Work& w, T* gt, T* qt, T* bias_ps, T* scratch,
                   int64_t begin, int64_t end) {
#ifdef FASTPRUNE_X86
  if (isa == CpuIsa::avx512) return conv_avx512(x, dy, w, gt, qt, bias_ps, scratch, begin, end);
  if (isa == CpuIsa::avx2) return conv_avx2(x, dy, w, gt, qt, bias_ps, scratch, begin, end);
#endif
  conv_generic(x, dy, w, gt, qt, bias_ps, scratch, begin, end);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_grad_bias_sq_cpu(
    const at::Tensor& x_in, const at::Tensor& dy_in, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double scale) {
  const ConvGeometry g = conv_geometry(x_in, dy_in, kernel, stride, padding, dilation, groups);
  const auto acc = acc_type(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc).contiguous(), dy = dy_in.to(acc).contiguous();
  const int64_t G = groups, Og = g.Og(), Kg = g.Kg(), Tn = g.T();
  const CpuIsa isa = cpu_isa();
  const int64_t lanes = each_isa_vector_bytes(isa) / x.element_size(), Op = (Og + lanes - 1) / lanes * lanes;
  // Host-cached buffers (buffer_cache.h): fresh ones fault on every call.
  at::Tensor gt = empty_cached({G, Kg, Op}, x.options()).zero_(), qt = empty_cached({G, Kg, Op}, x.options()).zero_();
  at::Tensor bias_ps = empty_cached({g.N, g.O}, x.options());
  std::vector<int64_t> toff(Tn), koff(Kg);
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  for (int64_t t = 0; t < Tn; ++t) toff[t] = (t / g.Wo) * g.sh * Wp + (t % g.Wo) * g.sw;
  for (int64_t k = 0; k < Kg; ++k) {
    const int64_t c = k / (g.kh * g.kw), i = (k / g.kw) % g.kh, j = k % g.kw;
    koff[k] = (c * Hp + i * g.dh) * Wp + j * g.dw;
  }
  // Enough row ranges per group to give every thread work; at least 8 rows each.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((threads + G - 1) / G, Kg / 8));
  const Work w{g, Op, chunks, toff.data(), koff.data(), g.Cg() * Hp * Wp + Tn * Op};
  if (g.N > 0 && Tn > 0 && Kg > 0 && Og > 0) {
    at::Tensor scratch = empty_cached({threads, w.scratch}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_grad_bias_sq_cpu", [&] {
      at::parallel_for(0, G * chunks, 1, [&](int64_t begin, int64_t end) {
        conv_dispatch<scalar_t>(isa, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), w,
                                gt.data_ptr<scalar_t>(), qt.data_ptr<scalar_t>(), bias_ps.data_ptr<scalar_t>(),
                                scratch.data_ptr<scalar_t>() + at::get_thread_num() * w.scratch, begin, end);
      });
    });
  } else {
    bias_ps.zero_();
  }
  // (G, Kg, Op) -> (G, Og, Kg), times scale.
  at::Tensor grad = empty_cached({G, Og, Kg}, x.options()), sq = empty_cached({G, Og, Kg}, x.options());
  at::mul_out(grad, gt.narrow(2, 0, Og).transpose(1, 2), at::scalar_tensor(scale, x.options()));
  at::mul_out(sq, qt.narrow(2, 0, Og).transpose(1, 2), at::scalar_tensor(scale, x.options()));
  at::Tensor bias_grad = (bias_ps.sum(0) * scale).view({G, Og});
  at::Tensor bias_sq = ((bias_ps * bias_ps).sum(0) * scale).view({G, Og});
  at::Tensor bound = sq.sum() + bias_sq.sum();
  return {grad, sq, bias_grad, bias_sq, bound};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("conv_grad_bias_sq", &conv_grad_bias_sq_cpu); }

}  // namespace fastprune
