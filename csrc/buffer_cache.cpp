// The host buffer cache of buffer_cache.h: exact-size free lists under one mutex.
#include "buffer_cache.h"

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace fastprune {
namespace {

// Smaller buffers come from glibc's bins, which it keeps.
constexpr size_t kMinBytes = size_t{64} << 10;

struct Cache {
  std::mutex mutex;
  std::unordered_multimap<size_t, void*> free;
  size_t cached = 0;
  size_t limit = 0;
};

Cache& cache() {
  // Never destroyed: tensors freed during interpreter shutdown still return here.
  static Cache* c = [] {
    auto* c = new Cache;
    const char* mb = std::getenv("FASTPRUNE_CPU_CACHE_MB");
    c->limit = (mb ? std::strtoull(mb, nullptr, 10) : 256) << 20;
    return c;
  }();
  return *c;
}

void give_back(void* ptr, size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.cached + bytes <= c.limit) {
      c.free.emplace(bytes, ptr);
      c.cached += bytes;
      return;
    }
  }
  c10::GetCPUAllocator()->raw_deallocate(ptr);
}

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!options.device().is_cpu() || bytes < kMinBytes) return at::empty(sizes, options);
  void* ptr = nullptr;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free.find(bytes);
    if (it != c.free.end()) {
      ptr = it->second;
      c.free.erase(it);
      c.cached -= bytes;
    }
  }
  if (ptr == nullptr) ptr = c10::GetCPUAllocator()->raw_allocate(bytes);
  return at::from_blob(ptr, sizes, [bytes](void* p) { give_back(p, bytes); }, options);
}

int64_t release_cached_buffers() {
  Cache& c = cache();
  std::unordered_multimap<size_t, void*> drained;
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    drained.swap(c.free);
    std::swap(bytes, c.cached);
  }
  for (auto& [size, ptr] : drained) c10::GetCPUAllocator()->raw_deallocate(ptr);
  return static_cast<int64_t>(bytes);
}

// No tensor arguments to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(fastprune, CompositeImplicitAutograd, m) { m.impl("empty_cache", &release_cached_buffers); }

}  // namespace fastprune
