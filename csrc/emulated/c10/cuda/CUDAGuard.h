// Stand-in for c10/cuda/CUDAGuard.h in the CUDA emulation build only (csrc/common/cuda_emulation.h): the
// emulated kernels take CPU tensors, and there is no device to switch to.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::Device) {}
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace cuda
}  // namespace c10
