// Checks of argument *values* that the kernels' indexing relies on, shared by the CPU (.cpp) and CUDA (.cu)
// entry points, so that both reject the same calls with the same messages. The Python layer raises
// ValueError naming the argument first; these TORCH_CHECKs are the last line of defence for callers that
// reach the ops through torch.ops directly, where a bad offset or box would make a kernel read or write
// out of bounds (or launch zero blocks).
//
// Each check has a host-pointer form, called by the CPU kernels on the data they read anyway, and a tensor
// form for the CUDA entry points, which reads the values on the host: for a CUDA tensor that is one small
// device-to-host copy (B + 1, 5 N or N numbers) and a synchronization, the price of not indexing memory
// with unchecked values.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace ck {

// The host copy of a (small) tensor: itself when it is already a contiguous CPU tensor.
inline at::Tensor host_values(const at::Tensor& t) {
  return t.is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
}

// ------------------------------------------------------------------------------------------- density
// offsets[0..B]: image b owns points offsets[b] .. offsets[b + 1]; they must run from 0 to T, non-decreasing.
inline void check_offsets_values(const int64_t* off, int64_t B, int64_t T) {
  TORCH_CHECK(off[0] == 0 && off[B] == T, "offsets must run from 0 to the number of points (", T, ")");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(off[b] <= off[b + 1], "offsets must be non-decreasing");
}

// offsets: [B + 1] int64 (shape, dtype and device already checked).
inline void check_offsets_values(const at::Tensor& offsets, int64_t T) {
  const at::Tensor host = host_values(offsets);
  check_offsets_values(host.data_ptr<int64_t>(), host.numel() - 1, T);
}

// ------------------------------------------------------------------------------------------- regions
// boxes: N rows (b, y0, x0, h, w) of non-empty boxes inside B images of H x W pixels.
inline void check_boxes_values(const int64_t* p, int64_t N, int64_t B, int64_t H, int64_t W) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = p[5 * n], y0 = p[5 * n + 1], x0 = p[5 * n + 2], h = p[5 * n + 3], w = p[5 * n + 4];
    TORCH_CHECK(b >= 0 && b < B, "boxes[", n, "]: batch index ", b, " out of range [0, ", B, ")");
    TORCH_CHECK(h >= 1 && w >= 1, "boxes[", n, "]: empty box (h=", h, ", w=", w, ")");
    // written so that no sum can overflow: y0 >= 0 first, then h <= H - y0
    TORCH_CHECK(y0 >= 0 && x0 >= 0 && y0 <= H && x0 <= W && h <= H - y0 && w <= W - x0, "boxes[", n, "] = (y0=", y0,
                ", x0=", x0, ", h=", h, ", w=", w, ") lies outside the ", H, "x", W, " image");
  }
}

// boxes: [N, 5] int64 (shape, dtype and device already checked).
inline void check_boxes_values(const at::Tensor& boxes, int64_t B, int64_t H, int64_t W) {
  const at::Tensor host = host_values(boxes);
  check_boxes_values(host.data_ptr<int64_t>(), host.size(0), B, H, W);
}

// scale: N finite factors r > 0.
template <typename T>
inline void check_scale_values(const T* s, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    const double r = static_cast<double>(s[n]);
    TORCH_CHECK(r > 0 && std::isfinite(r), "scale[", n, "] must be finite and > 0, got ", r);
  }
}

// scale: [N] float32 or float64 (shape, dtype and device already checked).
inline void check_scale_values(const at::Tensor& scale) {
  const at::Tensor host = host_values(scale);
  AT_DISPATCH_FLOATING_TYPES(host.scalar_type(), "check_scale_values",
                             [&] { check_scale_values(host.data_ptr<scalar_t>(), host.numel()); });
}

}  // namespace ck
