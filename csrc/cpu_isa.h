// Which x86 vector extension the sparse_mm and conv_grad_bias_sq CPU kernels use,
// chosen at run time: the widest the CPU (and OS) supports, as torch's own CPU
// dispatch does, unless a caller asks for a narrower one (tests run every path on one
// machine; benchmarks compare them). The other CPU kernels pick theirs with
// target_clones, unaffected by this.
#pragma once
#include <string>

namespace fastprune {

enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The level the kernels use now.
CpuIsa cpu_isa();

// The cpu_isa op: "" returns the level in use; "auto", "avx512", "avx2" or
// "generic" sets it (a level above the CPU's is refused) and returns it.
std::string cpu_isa_op(const std::string& request);

}  // namespace fastprune
