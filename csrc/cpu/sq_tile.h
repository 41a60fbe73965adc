// The register tile shared by the CPU statistics kernels that sum a per-sample gradient
// G_n = sum_t dy[t, :]^T x[:, t] over positions t and square it in registers
// (conv_grad_stats.cpp for convolutions, grad_stats.cpp for Linear over positions).
//
// x is read through offset tables, x[k, t] = origin[koff[k] + toff[t]], so that a padded
// image (conv windows) and a strided (T, K) activation are the same code; dy comes as
// rows of whole vectors of output channels (row t at dyt + t * ldd).
#pragma once
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace fastprune {

// MR weight rows by NV vectors of output channels, summed over the positions, then
// added (g) and squared (q) into rows ldg apart: rows [0, rows) of the tile are stored.
template <typename T, int VB, int MR, int NV>
C10_ALWAYS_INLINE void sq_tile(const T* const* base, const int64_t* __restrict__ toff, const T* __restrict__ dyt,
                               int64_t ldd, int64_t positions, T* __restrict__ g, T* __restrict__ q, int64_t ldg,
                               int rows) {
  using vec = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t t = 0; t < positions; ++t) {
    const vec* d = reinterpret_cast<const vec*>(dyt + t * ldd);
    vec dv[NV];
    for (int v = 0; v < NV; ++v) dv[v] = d[v];
    const int64_t off = toff[t];
    for (int r = 0; r < MR; ++r) {
      const T xs = base[r][off];
      for (int v = 0; v < NV; ++v) acc[r][v] += xs * dv[v];
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < NV; ++v) {
      vec* gr = reinterpret_cast<vec*>(g + r * ldg + v * L);
      vec* qr = reinterpret_cast<vec*>(q + r * ldg + v * L);
      *gr += acc[r][v];
      *qr += acc[r][v] * acc[r][v];
    }
  }
}

// Rows per tile: the accumulators and the dy vectors fill the vector registers (32 with
// AVX-512, 16 otherwise) and keep at least eight FMA chains in flight.
template <int VB, int NV>
constexpr int sq_tile_rows() {
  return VB == 64 ? 8 : (NV == 3 ? 4 : 6);
}

// Weight rows [k0, k1) of one sample's G_n (K rows) into gt/qt ((K, Op), Op whole
// vectors of output channels), over tiles of 3, then 2 or 1 vectors.
template <typename T, int VB>
C10_ALWAYS_INLINE void sq_rows(const T* origin, const int64_t* koff, int64_t K, int64_t k0, int64_t k1,
                               const int64_t* toff, int64_t positions, const T* dyt, int64_t ldd, int64_t Op, T* gt,
                               T* qt) {
  constexpr int L = Vec<T, VB>::lanes;
  auto run = [&](auto nv_tag, int64_t o0) {
    constexpr int NV = decltype(nv_tag)::value, MR = sq_tile_rows<VB, NV>();
    for (int64_t k = k0; k < k1; k += MR) {
      const T* base[MR];
      for (int r = 0; r < MR; ++r) base[r] = origin + koff[std::min(k + r, K - 1)];
      sq_tile<T, VB, MR, NV>(base, toff, dyt + o0, ldd, positions, gt + k * Op + o0, qt + k * Op + o0, Op,
                             static_cast<int>(std::min<int64_t>(MR, k1 - k)));
    }
  };
  int64_t o0 = 0;
  for (; Op - o0 >= 3 * L; o0 += 3 * L) run(std::integral_constant<int, 3>{}, o0);
  if (Op - o0 == 2 * L) run(std::integral_constant<int, 2>{}, o0);
  else if (Op - o0 == L) run(std::integral_constant<int, 1>{}, o0);
}

}  // namespace fastprune
