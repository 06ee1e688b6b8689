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

#include <algorithm>
#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace ck {

// Copies a finished block of output to memory that will not be read again soon, with non-temporal
// (streaming) stores where the CPU has them: they skip reading each destination line into the cache
// first, which halves the memory traffic of writing a large fresh output. SSE2, so every x86-64 CPU has
// it. The caller must call stream_fence() before another thread may read dst.
inline void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::copy(src, src + n, dst);
#endif
}

inline void stream_copy(const double* src, double* dst, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::copy(src, src + n, dst);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

}  // namespace ck
