// The CUDA kernels of csrc/regions/regions_cuda.cu compiled as host C++ through csrc/common/cuda_emulation.h, for the
// tests only (python_tests/cuda_emulation.py builds this; the installed package never does).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/common.h"
#include "common/cuda_emulation.h"

// The .cu registers its kernels with TORCH_LIBRARY_IMPL(crowdkernels, CUDA, m). Here the same lines register
// them as the CPU kernels of the ops' emulated twins, crowdkernels_cuda_emulated::<op>, whose schemas
// python_tests/cuda_emulation.py copies from crowdkernels::<op> before it loads this library: the emulated
// kernels take CPU tensors, and never shadow the real ones.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(crowdkernels_cuda_emulated, CPU, m, C10_UID)

#include "regions/regions_cuda.cu"
