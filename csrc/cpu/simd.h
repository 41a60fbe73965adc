// Vector types and target attributes shared by the CPU kernels that pick their
// vector extension at run time (cpu_isa.h): each kernel is compiled once per
// extension, as a plain function carrying the matching target attribute.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_X86 1
#define FASTPRUNE_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTPRUNE_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

namespace fastprune {

// GCC vectors of VB bytes, loadable from any element-aligned address.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB), aligned(sizeof(T))));
  static constexpr int lanes = VB / sizeof(T);
};

}  // namespace fastprune
