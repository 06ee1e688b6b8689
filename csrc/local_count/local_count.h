// Window maths of the fused local counts (HMoDE sec. III-C), written once for the CPU loop and any
// device kernel. The image is tiled by non-overlapping window_h x window_w windows, row-major; with
// keep_partial the windows cut by the right/bottom edge count, without it they are ignored (the
// AvgPool2d(kernel=stride=window) grid, as the authors' released code uses).
#pragma once

#include <cstdint>

#include "common/common.h"

namespace ck {
namespace local_count {

// Windows along one axis of `extent` pixels.
CK_HOST_DEVICE int64_t num_windows(int64_t extent, int64_t window, bool keep_partial) {
  return keep_partial ? (extent + window - 1) / window : extent / window;
}

// Pixels along one axis that fall in some counted window (the rest are outside every window).
CK_HOST_DEVICE int64_t covered_extent(int64_t extent, int64_t window, int64_t windows) {
  const int64_t full = windows * window;
  return full < extent ? full : extent;
}

// First pixel and the number of pixels of window `w` along one axis.
CK_HOST_DEVICE int64_t window_begin(int64_t w, int64_t window) { return w * window; }
CK_HOST_DEVICE int64_t window_length(int64_t w, int64_t window, int64_t extent) {
  const int64_t left = extent - w * window;
  return left < window ? left : window;
}

// Contribution of one pixel to the third output: the window sum of the pixel-wise squared errors
// (the paper's local error map R: "pixel-wise mean squared errors ... then the same integration").
template <typename acc_t>
CK_HOST_DEVICE acc_t squared_error(acc_t pred, acc_t target) {
  const acc_t d = pred - target;
  return d * d;
}

// Gradients of one pixel, given the gradients of its window's three sums:
// d/dpred = g_pred_count + 2 (pred - target) g_sq_error, d/dtarget = g_target_count - 2 (pred - target) g_sq_error.
template <typename acc_t>
CK_HOST_DEVICE void pixel_gradients(acc_t pred, acc_t target, acc_t g_pred_count, acc_t g_target_count,
                                    acc_t g_sq_error, acc_t* g_pred, acc_t* g_target) {
  const acc_t e = acc_t(2) * (pred - target) * g_sq_error;
  *g_pred = g_pred_count + e;
  *g_target = g_target_count - e;
}

}  // namespace local_count
}  // namespace ck
