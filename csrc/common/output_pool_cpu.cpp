// See output_pool.h.
#include "common/output_pool.h"

#include "common/common.h"

#include <pthread.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>

namespace ck {
namespace {

constexpr int64_t kMinBytes = int64_t(1) << 20;  // below this, malloc keeps small blocks mapped anyway
constexpr int64_t kAlign = 64;
constexpr int64_t kHeader = 64;  // the block's size, stored in front of the data (keeps the data aligned)

struct Pool {
  std::mutex mutex;
  std::multimap<int64_t, void*> free_blocks;  // size -> raw block
  int64_t cached = 0, limit = 0, hits = 0, misses = 0;

  Pool() {
    const char* env = std::getenv("CROWDKERNELS_CPU_CACHE_MB");
    int64_t mb = 256;
    if (env && *env) {
      try {
        mb = std::stoll(env);
      } catch (...) {
        mb = 256;  // a malformed value keeps the default; the Python layer warns about it
      }
    }
    limit = mb > 0 ? mb << 20 : 0;
  }

  void trim_to(int64_t bytes) {  // caller holds the mutex
    while (cached > bytes && !free_blocks.empty()) {
      auto it = std::prev(free_blocks.end());  // the largest first
      cached -= it->first;
      std::free(it->second);
      free_blocks.erase(it);
    }
  }
};

// Never destroyed: tensors may die after static destructors have run (at interpreter exit).
Pool* g_pool = new Pool();

// A forked child (DataLoader workers) may inherit the mutex locked by another parent thread: it starts
// with a fresh, empty pool instead (the parent's cached blocks are left to the parent).
void reset_in_child() {
  const int64_t limit = g_pool->limit;
  g_pool = new Pool();
  g_pool->limit = limit;
}
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, &reset_in_child);

int64_t& block_size(void* raw) { return *static_cast<int64_t*>(raw); }

void release(void* data) {
  void* raw = static_cast<char*>(data) - kHeader;
  const int64_t size = block_size(raw);
  Pool* pool = g_pool;
  {
    std::lock_guard<std::mutex> lock(pool->mutex);
    if (pool->cached + size <= pool->limit) {
      pool->free_blocks.emplace(size, raw);
      pool->cached += size;
      return;
    }
  }
  std::free(raw);
}

void* acquire(int64_t bytes) {
  Pool* pool = g_pool;
  {
    std::lock_guard<std::mutex> lock(pool->mutex);
    // the smallest cached block that fits, if it wastes at most a quarter of itself
    auto it = pool->free_blocks.lower_bound(bytes);
    if (it != pool->free_blocks.end() && it->first - bytes <= it->first / 4) {
      void* raw = it->second;
      pool->cached -= it->first;
      pool->free_blocks.erase(it);
      ++pool->hits;
      return raw;
    }
    ++pool->misses;
  }
  const int64_t total = (bytes + kHeader + kAlign - 1) / kAlign * kAlign;
  void* raw = std::aligned_alloc(kAlign, total);
  TORCH_CHECK(raw != nullptr, "crowdkernels: out of memory allocating ", total, " bytes");
  block_size(raw) = bytes;
  return raw;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kMinBytes || g_pool->limit == 0 || !options.device().is_cpu())
    return at::empty(sizes, options);
  void* raw = acquire(bytes);
  void* data = static_cast<char*>(raw) + kHeader;
  return at::from_blob(data, sizes, [](void* p) { release(p); }, options);
}

at::Tensor new_pooled_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = pooled_empty(sizes, options);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());  // floating outputs only
  return t;
}

std::vector<int64_t> pool_info() {
  std::lock_guard<std::mutex> lock(g_pool->mutex);
  return {g_pool->cached, g_pool->limit, g_pool->hits, g_pool->misses};
}

void pool_set_limit(int64_t bytes) {
  std::lock_guard<std::mutex> lock(g_pool->mutex);
  g_pool->limit = bytes > 0 ? bytes : 0;
  g_pool->trim_to(g_pool->limit);
}

void pool_empty() {
  std::lock_guard<std::mutex> lock(g_pool->mutex);
  g_pool->trim_to(0);
}

}  // namespace ck
