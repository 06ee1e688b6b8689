// Function multiversioning for the CPU hot loops (not included by .cu files).
//
// The extension is built for baseline x86-64, like torch's own wheels, so it loads on any x86-64 CPU. A
// hot loop is defined twice, once with CK_TARGET_AVX2 and once with CK_TARGET_DEFAULT, with the same
// signature; GCC resolves the call once at load time from the CPU's feature bits (cpuid). Feature bits,
// not CPU names: target_clones("arch=haswell") checks the CPU *model* and picks the baseline version on
// every AMD chip, which is how an earlier version of this code ran SSE2 loops on an AVX2 EPYC.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CK_HAS_FMV 1
#define CK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CK_TARGET_DEFAULT __attribute__((target("default")))
#else
#define CK_HAS_FMV 0
#define CK_TARGET_AVX2
#define CK_TARGET_DEFAULT
#endif

// On a multiversioned wrapper: inline everything it calls, so that a shared helper too big for the
// inliner's taste is compiled into each version instead of being called in its baseline form.
#if defined(__GNUC__)
#define CK_FLATTEN __attribute__((flatten))
#else
#define CK_FLATTEN
#endif


#include <algorithm>
#include <cstdint>

namespace ck {

// Asks for a 2-D block of memory (rows of row_bytes, row_stride_bytes apart) to be brought into the cache
// ahead of use. Gathers from small crops of large feature maps are latency-bound otherwise: each crop row
// is a fresh cache miss, and the hardware prefetcher does not see the pattern in time.
inline void prefetch_block(const void* p, int64_t rows, int64_t row_stride_bytes, int64_t row_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < rows; ++r, c += row_stride_bytes)
    for (int64_t b = 0; b < row_bytes + 63; b += 64) __builtin_prefetch(c + std::min<int64_t>(b, row_bytes - 1));
}

}  // namespace ck
