// CK_LAUNCH, the one way the .cu sources launch a kernel, and the CUDA execution model on the CPU, so that
// the same sources run as host C++ in the tests (docs/definitions.md, "Testing the GPU code").
//
// Under nvcc, CK_LAUNCH(grid, block, stream, kernel)(args...) is kernel<<<grid, block, 0, stream>>>(args...)
// and nothing else in this file is used.
//
// Compiled by a host compiler with CK_CUDA_EMULATION defined (the emulation build that
// python_tests/cuda_emulation.py makes from csrc/ at test time; never the installed package), this header
// supplies what the kernels use of CUDA, and csrc/emulated/runtime.cpp runs them:
// - threadIdx, blockIdx, blockDim, gridDim. A launch runs its blocks one after another, in a seeded random
//   order, and the threads of a block as cooperative fibers on one OS thread, each on its own stack.
// - __syncthreads() is a real barrier: every thread of the block runs up to it before any thread goes on.
//   Between two barriers the threads run one at a time, in a seeded random order, so that a missing
//   barrier or a sum whose result depends on the order of arrival changes with the seed. A barrier that
//   only part of the block reaches, or threads waiting at different barriers, fail the launch.
// - __shared__ is one static object per declaration: blocks never run at the same time, so the threads
//   of the running block share it. Every block starts with it filled with 0xFF bytes (NaN in floating
//   point, -1 in integers; the runtime finds these objects by their abi_tag in the library's symbol
//   table), so that a read of a slot that no thread of the block wrote yet gives garbage, as on a GPU.
// - atomicAdd and the other atomics: plain read-modify-writes, atomic because fibers switch only at
//   barriers; min and max as CUDA's math library overloads them (the rest comes from <cmath>).
// - A launch of zero blocks, of more blocks than CUDA allows, or of a block over 1024 threads fails as
//   cudaErrorInvalidConfiguration would, naming the kernel; so does a barrier error, or an exception.
// Errors are thrown by the launch itself as c10::Error (RuntimeError in Python), naming the kernel and the
// launch site. Tests may force smaller grids and blocks than the sources ask for (every kernel is written
// with grid- and block-stride loops, so its result must not change), and choose the shuffling seed:
// see ck_emu::Config.
#pragma once

#if defined(__CUDACC__)

// Variadic: a template kernel's name holds commas (splat_kernel<scalar_t, true>).
#define CK_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>

#else  // the emulation build

#ifndef CK_CUDA_EMULATION
#error "cuda_emulation.h outside nvcc: only the CUDA emulation build (CK_CUDA_EMULATION) compiles .cu sources on the host"
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static __attribute__((abi_tag("ck_emu_shared")))  // see the file comment
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace ck_emu {

// The running thread's coordinates. One launch runs at a time (a lock in launch()), on one OS thread, and
// the scheduler sets these before it resumes a fiber.
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// A grid or block extent as the launch site wrote it, before CUDA's narrowing to unsigned int, so that a
// count that does not fit is reported instead of wrapped.
struct Extent {
  long long x, y, z;
  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  Extent(I v)  // an unsigned count above LLONG_MAX becomes -1: invalid as well
      : x(std::is_unsigned<I>::value && static_cast<unsigned long long>(v) > LLONG_MAX ? -1 : static_cast<long long>(v)),
        y(1),
        z(1) {}
  Extent(const dim3& d) : x(d.x), y(d.y), z(d.z) {}
};

// Barrier of the running block; `where` names the call site, so that threads waiting at different
// __syncthreads() are told apart.
void sync_threads(const char* file, int line);

// Runs body(arg) as every thread of a grid x block launch (see the file comment); throws c10::Error on a
// launch error. `kernel` and `signature` name the kernel in errors and in the launch counts.
void launch(const Extent& grid, const Extent& block, const char* kernel, const char* signature, const char* file,
            int line, void (*body)(void*), void* arg);

// The demangled type of a kernel, to tell its instantiations apart in the launch counts.
const char* signature_of(const char* mangled);

template <typename... P>
class Launch {
 public:
  Launch(const Extent& grid, const Extent& block, void (*kernel)(P...), const char* name, const char* file, int line)
      : grid_(grid), block_(block), kernel_(kernel), name_(name), file_(file), line_(line) {}

  // The arguments convert to the kernel's parameter types once, on the host, as a CUDA launch converts them.
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "CK_LAUNCH: wrong number of kernel arguments");
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel_, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(args))...)};
    auto body = [](void* p) {
      Call* c = static_cast<Call*>(p);
      std::apply(c->kernel, c->params);  // every thread gets the same (copied) arguments
    };
    launch(grid_, block_, name_, signature_of(typeid(kernel_).name()), file_, line_, body, &call);
  }

 private:
  Extent grid_, block_;
  void (*kernel_)(P...);
  const char* name_;
  const char* file_;
  int line_;
};

template <typename... P>
Launch<P...> make_launch(const Extent& grid, const Extent& block, void (*kernel)(P...), const char* name,
                         const char* file, int line) {
  return Launch<P...>(grid, block, kernel, name, file, line);
}

}  // namespace ck_emu

#define threadIdx (::ck_emu::g_thread_idx)
#define blockIdx (::ck_emu::g_block_idx)
#define blockDim (::ck_emu::g_block_dim)
#define gridDim (::ck_emu::g_grid_dim)
#define __syncthreads() ::ck_emu::sync_threads(__FILE__, __LINE__)

// The stream is evaluated (as nvcc evaluates it) and otherwise unused: launches run to completion in order.
#define CK_LAUNCH(grid, block, stream, ...) \
  ((void)(stream), ::ck_emu::make_launch((grid), (block), &__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__))

// ---------------------------------------------------------------------------- atomics (CUDA's overloads)
// Fibers switch only at barriers, so a plain read-modify-write is atomic here. Each returns the old value.
#define CK_EMU_ATOMIC(name, T, expr)           \
  inline T name(T* address, T val) {          \
    const T old = *address;                   \
    *address = (expr);                        \
    return old;                               \
  }
#define CK_EMU_ATOMICS(T)                                    \
  CK_EMU_ATOMIC(atomicAdd, T, old + val)                     \
  CK_EMU_ATOMIC(atomicExch, T, val)                          \
  inline T atomicCAS(T* address, T compare, T val) {         \
    const T old = *address;                                  \
    if (old == compare) *address = val;                      \
    return old;                                              \
  }
CK_EMU_ATOMICS(int)
CK_EMU_ATOMICS(unsigned int)
CK_EMU_ATOMICS(unsigned long long)
CK_EMU_ATOMIC(atomicAdd, float, old + val)
CK_EMU_ATOMIC(atomicAdd, double, old + val)
CK_EMU_ATOMIC(atomicExch, float, val)
CK_EMU_ATOMIC(atomicSub, int, old - val)
CK_EMU_ATOMIC(atomicSub, unsigned int, old - val)
CK_EMU_ATOMIC(atomicMin, int, val < old ? val : old)
CK_EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
CK_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
CK_EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
CK_EMU_ATOMIC(atomicMax, int, val > old ? val : old)
CK_EMU_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
CK_EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
CK_EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
#undef CK_EMU_ATOMICS
#undef CK_EMU_ATOMIC

// ----------------------------------------------------------------- min and max (CUDA's math library)
#define CK_EMU_MINMAX(T)                                       \
  inline T min(T a, T b) { return b < a ? b : a; }             \
  inline T max(T a, T b) { return a < b ? b : a; }
CK_EMU_MINMAX(int)
CK_EMU_MINMAX(unsigned int)
CK_EMU_MINMAX(long)
CK_EMU_MINMAX(unsigned long)
CK_EMU_MINMAX(long long)
CK_EMU_MINMAX(unsigned long long)
#undef CK_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

#endif  // __CUDACC__
