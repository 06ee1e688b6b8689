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


// Defines `name` for float and double, each in an AVX2+FMA and a baseline version (only the baseline where
// there is no multiversioning), as a wrapper whose body is `impl<T>(...)`. ARGS is a function-like macro
// giving the parameter list for a type T; the variadic tail is the call's arguments (the parameter names);
// `attrs` adds attributes to every version (CK_FLATTEN, or nothing). One line per hot loop instead of
// four hand-written wrappers that must stay in step.
#define CK_MV_ONE(target, attrs, name, impl, ARGS, T, ...) \
  target attrs void name(ARGS(T)) { impl<T>(__VA_ARGS__); }
#if CK_HAS_FMV
#define CK_MV_AVX2(attrs, name, impl, ARGS, ...)                           \
  CK_MV_ONE(CK_TARGET_AVX2, attrs, name, impl, ARGS, float, __VA_ARGS__) \
  CK_MV_ONE(CK_TARGET_AVX2, attrs, name, impl, ARGS, double, __VA_ARGS__)
#else
#define CK_MV_AVX2(attrs, name, impl, ARGS, ...)
#endif
#define CK_MULTIVERSION(attrs, name, impl, ARGS, ...)                         \
  CK_MV_AVX2(attrs, name, impl, ARGS, __VA_ARGS__)                            \
  CK_MV_ONE(CK_TARGET_DEFAULT, attrs, name, impl, ARGS, float, __VA_ARGS__) \
  CK_MV_ONE(CK_TARGET_DEFAULT, attrs, name, impl, ARGS, double, __VA_ARGS__)

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ck {

// Asks for a 2-D block of memory (rows of row_bytes, row_stride_bytes apart) to be brought into the cache
// ahead of use. Gathers from small crops of large feature maps are latency-bound otherwise: each crop row
// is a fresh cache miss, and the hardware prefetcher does not see the pattern in time.
inline void prefetch_block(const void* p, int64_t rows, int64_t row_stride_bytes, int64_t row_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < rows; ++r, c += row_stride_bytes)
    for (int64_t b = 0; b < row_bytes + 63; b += 64) __builtin_prefetch(c + std::min<int64_t>(b, row_bytes - 1));
}

// exp(d) for d <= 0 (or NaN) as straight-line arithmetic, so that a loop calling it vectorizes (a libm
// exp is an opaque scalar call; at 8 float lanes this is ~10x cheaper). Cody-Waite reduction
// d = n ln2 + r, |r| <= ln2/2, then a Taylor polynomial of r (degree 7 for float, 13 for double: truncation
// below 1e-8 and 1e-17 relative) and 2^n assembled in the exponent bits. Within 2 ulp of exp; exp(0) is
// exactly 1; below -87 (float) / -708 (double) it returns 0 instead of exp's smallest normals and
// subnormals (an absolute error under 2e-38 / 4e-308); NaN gives NaN. Softmax only ever passes d = v - max.
inline float exp_le0(float d) {
  const float x = d < -87.0f ? -87.0f : d;  // NaN compares false and stays NaN
  const float shifter = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;  // ln 2 in two parts: n * hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);  // the low bits hold n (two's complement), -126 <= n <= 0
  bits = (bits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return d < -87.0f ? 0.0f : p * scale;
}

inline double exp_le0(double d) {
  const double x = d < -708.0 ? -708.0 : d;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634074 + shifter;
  const double n = t - shifter;
  double r = x - n * 6.93147180369123816490e-01;  // fdlibm's ln2_hi (n * hi exact) and ln2_lo
  r = r - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t bits;
  std::memcpy(&bits, &t, sizeof bits);  // -1021 <= n <= 0
  bits = (bits + 1023u) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return d < -708.0 ? 0.0 : p * scale;
}

}  // namespace ck
