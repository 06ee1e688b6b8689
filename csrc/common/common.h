// Shared by every op: the host/device qualifier for per-element maths, and argument checks.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CK_HOST_DEVICE inline
#endif

// The Python layer validates arguments and raises ValueError/TypeError naming them; these TORCH_CHECKs
// are the last line of defence for callers that reach the ops through torch.ops directly.
#define CK_CHECK_DEVICE(t, ref) \
  TORCH_CHECK((t).device() == (ref).device(), #t " must be on ", (ref).device(), ", got ", (t).device())
#define CK_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define CK_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must be ", (d), "-D, got ", (t).dim(), "-D")
#define CK_CHECK_FLOATING(t)                                                                          \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,                  \
              #t " must be float32 or float64, got ", (t).scalar_type())

namespace ck {

// When set (tests do, through crowdkernels._ext.poisoned_outputs()), every output a kernel allocates
// starts filled with NaN (or the lowest integer), so an element the kernel forgets to write shows up.
bool poison_outputs();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!poison_outputs()) return at::empty(sizes, options);
  if (at::isFloatingType(options.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::full(sizes, std::numeric_limits<int64_t>::lowest(), options);
}

}  // namespace ck
