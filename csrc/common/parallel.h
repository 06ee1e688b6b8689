// CPU-only scheduling helpers (not included by .cu files).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace ck {

// Runs f(t) for every t in [0, n) on torch's intra-op threads, handing out items one at a time as threads
// free up (a dynamic schedule). at::parallel_for splits a range into equal static chunks, which idles
// threads when items differ a lot in cost (bands of a density map crossing a crowd or an empty sky).
// Each item must own its outputs: the result is then the same whichever thread runs which item.
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n; ++t) f(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed))
      f(t);
  });
}

}  // namespace ck
