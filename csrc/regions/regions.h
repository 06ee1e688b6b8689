// Per-element maths of L2SM region rescaling (scale_regions / unscale_regions), written once and called by
// both the CPU loops (regions_cpu.cpp) and the CUDA kernels (regions_cuda.cu).
//
// Both ops sample bilinearly along each axis independently. For output index d on an axis, the source
// coordinate is src = a * (d + 0.5) - 0.5 with a = 1/r (scale_regions, as F.interpolate(scale_factor=r,
// align_corners=False, recompute_scale_factor=False) computes it) or a = r (unscale_regions), clamped to
// [0, n - 1] where n is the number of source samples on that axis. The two neighbours are i0 = floor(src),
// i1 = min(i0 + 1, n - 1), with weight l = src - i0 on i1.
//
// The derivative of src with respect to r is zero where src is clamped. At the kinks (src exactly 0 or
// n - 1) the derivative is one-sided: src == 0 counts as inside (as torch.clamp's gradient does), src == n - 1
// gives i0 == i1, so the value no longer depends on src.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/common.h"

namespace ck {
namespace regions {

// Number of valid samples along an axis of `size` pixels scaled by r: floor(r * size), computed in double
// as F.interpolate computes its output size, whatever the tensor dtype. Callers clip it to the canvas; it
// is capped at 2^62 first, since floor(r * size) of a huge r does not fit an int64 (the cast would give
// INT64_MIN on x86, and an empty canvas instead of a full one).
CK_HOST_DEVICE int64_t valid_extent(double r, int64_t size) {
  const double v = floor(r * static_cast<double>(size));
  return v < 0x1p62 ? static_cast<int64_t>(v) : (static_cast<int64_t>(1) << 62);
}

// One axis of a bilinear sample: the two neighbours, the weight of the second, and d(src)/d(r).
template <typename T>
struct AxisSample {
  int64_t i0;
  int64_t i1;
  T l;
  T dsrc_dr;  // 0 where src is clamped
};

// The two neighbours and weight of a source coordinate, clamped as F.interpolate clamps: below 0 to 0 and
// at or past the last sample to it, where the derivative dsrc (d src / d r) is 0. Shared by both axis maps.
template <typename T>
CK_HOST_DEVICE AxisSample<T> clamped_axis_sample(T src, T dsrc, int64_t n) {
  if (src < T(0)) {
    src = T(0);
    dsrc = T(0);
  }
  AxisSample<T> s;
  // at or past the last sample: compared before the cast, since a huge src (unscale_regions with r = 1e20
  // reads (d + 0.5) r - 0.5) does not fit an int64
  if (!(src < static_cast<T>(n - 1))) {
    s.i0 = s.i1 = n - 1;
    s.l = T(0);
    s.dsrc_dr = T(0);
    return s;
  }
  s.i0 = static_cast<int64_t>(src);  // 0 <= src < n - 1: truncation is floor
  s.i1 = s.i0 + 1;
  s.l = src - static_cast<T>(s.i0);
  s.dsrc_dr = dsrc;
  return s;
}

// scale_regions: src = (d + 0.5) / r - 0.5 over a region of n pixels. `inv_r` is 1/r rounded to T, as
// PyTorch's upsample kernels round their scale, so that the valid part matches F.interpolate bit for bit
// on the CPU in float64.
template <typename T>
CK_HOST_DEVICE AxisSample<T> upsample_axis(int64_t d, T inv_r, int64_t n) {
  const T pos = static_cast<T>(d) + T(0.5);
  const T src = inv_r * pos - T(0.5);
  // d(src)/d(r) = -(d + 0.5) / r^2 = -(d + 0.5) * inv_r^2
  const T dsrc = -pos * inv_r * inv_r;
  return clamped_axis_sample(src, dsrc, n);
}

// unscale_regions: src = (d + 0.5) * r - 0.5 over the valid part of n samples of the prediction canvas.
template <typename T>
CK_HOST_DEVICE AxisSample<T> downsample_axis(int64_t d, T r, int64_t n) {
  const T pos = static_cast<T>(d) + T(0.5);
  const T src = r * pos - T(0.5);
  const T dsrc = pos;
  return clamped_axis_sample(src, dsrc, n);
}

// The bilinear sample of the 2x2 neighbourhood (v00 at (y.i0, x.i0), v01 at (y.i0, x.i1), ...).
template <typename T>
CK_HOST_DEVICE T bilinear(T v00, T v01, T v10, T v11, T ly, T lx) {
  return (T(1) - ly) * ((T(1) - lx) * v00 + lx * v01) + ly * ((T(1) - lx) * v10 + lx * v11);
}

// d(sample)/d(r) through both coordinates: dv/dy * dy/dr + dv/dx * dx/dr.
template <typename T>
CK_HOST_DEVICE T bilinear_dr(T v00, T v01, T v10, T v11, T ly, T lx, T dy_dr, T dx_dr) {
  const T dv_dy = (T(1) - lx) * (v10 - v00) + lx * (v11 - v01);
  const T dv_dx = (T(1) - ly) * (v01 - v00) + ly * (v11 - v10);
  return dv_dy * dy_dr + dv_dx * dx_dr;
}

// The four weights a gradient g is scattered with (adjoint of `bilinear`), in the order 00, 01, 10, 11.
template <typename T>
CK_HOST_DEVICE void bilinear_weights(T ly, T lx, T* w) {
  w[0] = (T(1) - ly) * (T(1) - lx);
  w[1] = (T(1) - ly) * lx;
  w[2] = ly * (T(1) - lx);
  w[3] = ly * lx;
}


// Host-side argument checks shared by the CPU and CUDA entry points: the last line of defence behind the
// Python layer, which raises ValueError/TypeError naming the argument (and also checks box bounds, values
// of scale and, for unscale_regions, that boxes of one image do not overlap, which need the data).
inline void check_boxes_and_scale(const at::Tensor& boxes, const at::Tensor& scale, const at::Tensor& like) {
  CK_CHECK_DTYPE(boxes, at::kLong);
  CK_CHECK_DIM(boxes, 2);
  TORCH_CHECK(boxes.size(1) == 5, "boxes must be [N, 5] (b, y0, x0, h, w), got ", boxes.sizes());
  CK_CHECK_DIM(scale, 1);
  TORCH_CHECK(scale.size(0) == boxes.size(0), "scale must have one entry per box (", boxes.size(0),
              "), got ", scale.size(0));
  CK_CHECK_DTYPE(scale, like.scalar_type());
  CK_CHECK_DEVICE(boxes, like);
  CK_CHECK_DEVICE(scale, like);
}

}  // namespace regions
}  // namespace ck
