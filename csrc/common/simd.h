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

