// Stand-in for c10/cuda/CUDAStream.h in the CUDA emulation build only (csrc/common/cuda_emulation.h): there is
// one stream, and a launch runs to completion before it returns.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAStream {};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }

}  // namespace cuda
}  // namespace c10
