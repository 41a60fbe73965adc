// Vector types and target attributes shared by the CPU kernels that pick their
// vector extension at run time (cpu_isa.h): each kernel is compiled once per
// extension, as a plain function carrying the matching target attribute.
#pragma once
#include "../cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_X86 1
#define FASTPRUNE_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTPRUNE_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

// ENTRIES(ATTR, ISA, VB) once per extension: generic (16-byte vectors, the x86-64
// baseline), then on x86 GCC builds AVX2 (32) and AVX-512 (64).
#ifdef FASTPRUNE_X86
#define FASTPRUNE_EACH_ISA(ENTRIES) \
  ENTRIES(, generic, 16)            \
  ENTRIES(FASTPRUNE_AVX2, avx2, 32) \
  ENTRIES(FASTPRUNE_AVX512, avx512, 64)
#else
#define FASTPRUNE_EACH_ISA(ENTRIES) ENTRIES(, generic, 16)
#endif

namespace fastprune {

// The vector bytes of FASTPRUNE_EACH_ISA's entry for an extension.
inline int each_isa_vector_bytes(CpuIsa isa) { return isa == CpuIsa::avx512 ? 64 : isa == CpuIsa::avx2 ? 32 : 16; }

// GCC vectors of VB bytes, loadable from any element-aligned address.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB), aligned(sizeof(T))));
  static constexpr int lanes = VB / sizeof(T);
};

}  // namespace fastprune
