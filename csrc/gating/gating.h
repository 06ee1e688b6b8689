// Hierarchical gating fusion (HMoDE eq. 1), per-pixel maths shared by every backend.
//
//   G1_ij = softmax_j(gate1[i*N + j]),  G2_i = softmax_i(gate2[i]),
//   group_i = sum_j G1_ij * E[groups[i, j]],  final = sum_i G2_i * group_i,
//
// with every input sampled at the output pixel as F.interpolate(mode=...) would sample it, so the kernels
// read the low-resolution tensors directly and never hold upsampled copies.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/common.h"

namespace ck {
namespace gating {

// One axis of a resampling: the (at most two) source indices an output index reads, and their weights.
template <typename T>
struct Taps {
  int64_t i0, i1;
  T w0, w1;
};

// ATen's nearest_idx (UpSample.h): the scale is in/out in single precision whatever the dtype, and
// src = min(floor(dst * scale), in - 1). The two early returns are ATen's too; they agree with the general
// formula but are kept so that the indices are ATen's by construction.
CK_HOST_DEVICE int64_t nearest_source(int64_t dst, int64_t in, int64_t out) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in - 1 ? src : in - 1;
}

// ATen's bilinear source index for align_corners=False (area_pixel_compute_source_index followed by
// guard_index_and_lambda), in the op-maths type T.
template <typename T>
CK_HOST_DEVICE Taps<T> linear_taps(int64_t dst, int64_t in, int64_t out) {
  const T scale = static_cast<T>(in) / static_cast<T>(out);
  T real = scale * (static_cast<T>(dst) + static_cast<T>(0.5)) - static_cast<T>(0.5);
  if (real < static_cast<T>(0)) real = static_cast<T>(0);
  int64_t i0 = static_cast<int64_t>(floor(real));
  if (i0 > in - 1) i0 = in - 1;
  T lambda = real - static_cast<T>(i0);
  if (lambda < static_cast<T>(0)) lambda = static_cast<T>(0);
  if (lambda > static_cast<T>(1)) lambda = static_cast<T>(1);
  const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
  return Taps<T>{i0, i1, static_cast<T>(1) - lambda, lambda};
}

// Nearest is expressed as a single tap of weight 1 (i1 == i0, w1 == 0); `sample` and `scatter` never
// touch the second tap in that mode, so an inf in the input cannot become 0 * inf = NaN.
template <typename T>
CK_HOST_DEVICE Taps<T> taps(bool bilinear, int64_t dst, int64_t in, int64_t out) {
  if (bilinear) return linear_taps<T>(dst, in, out);
  const int64_t i = nearest_source(dst, in, out);
  return Taps<T>{i, i, static_cast<T>(1), static_cast<T>(0)};
}

// The value of a row-major [h, w] plane at the output pixel whose row/column taps are ty/tx.
template <typename T>
CK_HOST_DEVICE T sample(const T* plane, int64_t w, bool bilinear, const Taps<T>& ty, const Taps<T>& tx) {
  if (!bilinear) return plane[ty.i0 * w + tx.i0];
  const T* r0 = plane + ty.i0 * w;
  const T* r1 = plane + ty.i1 * w;
  return ty.w0 * (tx.w0 * r0[tx.i0] + tx.w1 * r0[tx.i1]) + ty.w1 * (tx.w0 * r1[tx.i0] + tx.w1 * r1[tx.i1]);
}

// Adjoint of `sample` along one axis: adds g to the taps of a row buffer.
template <typename T>
CK_HOST_DEVICE void scatter_row(T* row, bool bilinear, const Taps<T>& tx, T g) {
  row[tx.i0] += tx.w0 * g;
  if (bilinear) row[tx.i1] += tx.w1 * g;
}

// In-place softmax of v[0..n) (max subtracted, so large logits do not overflow).
template <typename T>
CK_HOST_DEVICE void softmax(T* v, int64_t n) {
  T mx = v[0];
  for (int64_t i = 1; i < n; ++i) mx = v[i] > mx ? v[i] : mx;
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = exp(v[i] - mx);
    sum += v[i];
  }
  const T inv = static_cast<T>(1) / sum;
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

// The gates at one pixel: g1[M*N] and g2[M] hold the logits sampled there and become G1 (softmax over each
// group's N channels) and G2 (softmax over the M groups) in place. Kept apart from fuse_forward because with
// nearest upsampling many output pixels share one gate pixel, and the CPU loop reuses the softmaxes.
template <typename T>
CK_HOST_DEVICE void softmax_gates(T* g1, T* g2, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i) softmax(g1 + i * N, N);
  softmax(g2, M);
}

// Eq. 1 at one pixel. e[K]: the experts sampled there; g1[M*N], g2[M]: G1 and G2 (softmax_gates); gm[M]
// receives the group maps. Returns the final density.
template <typename T>
CK_HOST_DEVICE T fuse_forward(const T* e, const T* g1, const T* g2, T* gm, const int64_t* groups, int64_t M,
                              int64_t N) {
  T out = 0;
  for (int64_t i = 0; i < M; ++i) {
    T acc = 0;
    for (int64_t j = 0; j < N; ++j) acc += g1[i * N + j] * e[groups[i * N + j]];
    gm[i] = acc;
    out += g2[i] * acc;
  }
  return out;
}

// The backward of eq. 1 at one pixel, from G1, G2 and the group maps that fuse_forward produced there.
// gf: d loss / d final; ggm[M] (may be null): d loss / d group maps; gimp[M*N] (may be null): d loss /
// d importance (every pixel's G1_ij adds to importance[i, j], so each pixel receives it whole).
// Writes de[K] (d loss / d sampled expert), dl1[M*N] and dl2[M] (d loss / d sampled logits).
template <typename T>
CK_HOST_DEVICE void fuse_backward(const T* e, const T* g1, const T* g2, const T* gm, const int64_t* groups,
                                  int64_t K, int64_t M, int64_t N, T gf, const T* ggm, const T* gimp, T* de,
                                  T* dl1, T* dl2) {
  for (int64_t k = 0; k < K; ++k) de[k] = 0;
  // softmax backward: dl = g * (dg - sum(g * dg)), here with dg2_i = gf * gm_i.
  T dot2 = 0;
  for (int64_t i = 0; i < M; ++i) dot2 += g2[i] * gm[i];
  for (int64_t i = 0; i < M; ++i) dl2[i] = g2[i] * gf * (gm[i] - dot2);
  for (int64_t i = 0; i < M; ++i) {
    const T dgm = gf * g2[i] + (ggm ? ggm[i] : static_cast<T>(0));
    T dot1 = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = i * N + j;
      dl1[c] = dgm * e[groups[c]] + (gimp ? gimp[c] : static_cast<T>(0));  // dG1_ij for now
      dot1 += g1[c] * dl1[c];
    }
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = i * N + j;
      de[groups[c]] += dgm * g1[c];
      dl1[c] = g1[c] * (dl1[c] - dot1);
    }
  }
}

}  // namespace gating
}  // namespace ck
