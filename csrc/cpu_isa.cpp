// Run-time choice of the CPU kernels' vector extension (see cpu_isa.h).
#include "cpu_isa.h"

#include <torch/library.h>

#include <atomic>

namespace fastprune {
namespace {

CpuIsa detected() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // as the kernels' target attributes
  __builtin_cpu_init();
  // libgcc's checks include the OS saving the wider registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
  return CpuIsa::generic;
}

const CpuIsa kDetected = detected();
std::atomic<int> g_isa{static_cast<int>(kDetected)};

const char* name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(g_isa.load(std::memory_order_relaxed)); }

std::string cpu_isa_op(const std::string& request) {
  if (!request.empty()) {
    CpuIsa want;
    if (request == "auto") want = kDetected;
    else if (request == "avx512") want = CpuIsa::avx512;
    else if (request == "avx2") want = CpuIsa::avx2;
    else if (request == "generic") want = CpuIsa::generic;
    else TORCH_CHECK(false, "cpu_isa: expected 'auto', 'avx512', 'avx2' or 'generic', got '", request, "'");
    TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(kDetected), "cpu_isa: this CPU supports up to ",
                name(kDetected), ", so '", request, "' cannot run here");
    g_isa.store(static_cast<int>(want), std::memory_order_relaxed);
  }
  return name(cpu_isa());
}

TORCH_LIBRARY_IMPL(fastprune, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa_op); }

}  // namespace fastprune
