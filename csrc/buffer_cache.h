// Host memory for the statistics ops' outputs and temporaries, reused across calls.
//
// glibc returns freed heap memory to the OS once enough of it sits at the top of
// the heap, and serves allocations above its mmap threshold with fresh mappings:
// either way, the next call of an op touches fresh pages and pays a page fault per
// 4 KiB. fisher_diag on LeNet-300-100 took about 1000 faults a call (1.6 ms of
// 3.3 ms in the sums) against 7 for a training step, whose tensors glibc keeps.
// Buffers freed by their tensors go back to this cache instead, up to
// FASTPRUNE_CPU_CACHE_MB (default 256), and are handed out again for the same size.
#pragma once
#include <ATen/ATen.h>

namespace fastprune {

// An uninitialised tensor; on CPU its buffer comes from (and returns to) the cache.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the bytes released.
int64_t release_cached_buffers();

}  // namespace fastprune
