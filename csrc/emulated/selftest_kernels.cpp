// Small kernels, some with planted bugs, written as plain CUDA and launched with CK_LAUNCH: the tests
// (python_tests/test_cuda_emulated.py) show with them that the emulation finds what a GPU would (a write
// past the end of a tensor, a missing barrier, a barrier in divergent code, an order-dependent sum) and
// rejects the launches CUDA rejects. Test-only, like the rest of csrc/emulated/.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common/cuda_emulation.h"

namespace {

constexpr int kMaxThreads = 1024;

// out[i] = i for every i < n; with past_end, also out[n]: one element past the end (the planted bug).
__global__ void fill_kernel(float* out, int64_t n, bool past_end) {
  const int64_t end = past_end ? n + 1 : n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < end; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<float>(i);
}

// out[i] = in[i + shift]: shift 1 reads one element past the end of `in` (the planted bug).
__global__ void shift_kernel(const float* in, float* out, int64_t n, int64_t shift) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = in[i + shift];
}

// out[b] = the sum of block b's blockDim.x inputs, by a tree in shared memory; without `barriers`, the
// tree reads slots that other threads may not have written yet (the planted bug).
__global__ void block_sum_kernel(const float* in, float* out, bool barriers) {
  __shared__ float buf[kMaxThreads];
  buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (barriers) __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    if (barriers) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// Threads below `k` wait at a barrier that the others skip (the planted bug when 0 < k < blockDim.x).
__global__ void partial_barrier_kernel(float* out, unsigned k) {
  if (threadIdx.x < k) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// Even threads wait at one barrier, odd threads at another (the planted bug).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// out[0] = the sum of in by float atomics: its rounding depends on the order in which the threads add.
__global__ void atomic_sum_kernel(const float* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    atomicAdd(out, in[i]);
}

// Runs one of the kernels above on a 1-D float32 CPU tensor with the given launch geometry.
at::Tensor selftest(const std::string& kernel, const at::Tensor& input, int64_t blocks, int64_t threads) {
  TORCH_CHECK(input.is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 1 && input.is_contiguous(),
              "input must be a contiguous 1-D float32 CPU tensor");
  const int64_t n = input.numel();
  const float* in = input.data_ptr<float>();
  if (kernel == "fill" || kernel == "fill_past_end") {
    at::Tensor out = at::full({n}, NAN, input.options());
    CK_LAUNCH(blocks, threads, 0, fill_kernel)(out.data_ptr<float>(), n, kernel == "fill_past_end");
    return out;
  }
  if (kernel == "shift" || kernel == "shift_past_end") {
    at::Tensor out = at::full({n}, NAN, input.options());
    CK_LAUNCH(blocks, threads, 0, shift_kernel)(in, out.data_ptr<float>(), n, kernel == "shift" ? 0 : 1);
    return out;
  }
  if (kernel == "block_sum" || kernel == "block_sum_no_barrier") {
    TORCH_CHECK(blocks >= 1 && threads >= 1 && threads <= kMaxThreads && n == blocks * threads,
                "block_sum: input must hold blocks * threads values");
    at::Tensor out = at::full({blocks}, NAN, input.options());
    CK_LAUNCH(blocks, threads, 0, block_sum_kernel)(in, out.data_ptr<float>(), kernel == "block_sum");
    return out;
  }
  if (kernel == "partial_barrier" || kernel == "divergent_barrier") {
    TORCH_CHECK(blocks >= 1 && threads >= 1 && n == blocks * threads, kernel, ": input must hold blocks * threads values");
    at::Tensor out = at::full({n}, NAN, input.options());
    if (kernel == "partial_barrier") {
      CK_LAUNCH(blocks, threads, 0, partial_barrier_kernel)(out.data_ptr<float>(), static_cast<unsigned>(in[0]));
    } else {
      CK_LAUNCH(blocks, threads, 0, divergent_barrier_kernel)(out.data_ptr<float>());
    }
    return out;
  }
  if (kernel == "atomic_sum") {
    at::Tensor out = at::zeros({1}, input.options());
    CK_LAUNCH(blocks, threads, 0, atomic_sum_kernel)(in, out.data_ptr<float>(), n);
    return out;
  }
  TORCH_CHECK(false, "unknown selftest kernel '", kernel, "'");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crowdkernels_cuda_emulated, m) {
  m.def("_selftest(str kernel, Tensor input, int blocks, int threads) -> Tensor", &selftest);
}
