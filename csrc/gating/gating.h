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

// Eq. 1 at a run of n consecutive pixels (n = 1: one pixel). Every array holds channel c of pixel x at
// [c * s + x]: e[K], the experts sampled there; g1[M*N] and g2[M], G1 and G2 there (already softmaxed).
// gm[M] (channel stride gs) receives the group maps, final[n] the fused density. Channel-major loops over
// the run let the CPU loop vectorize across pixels; the sums run in the same order (j, then i) for every n.
template <typename T>
CK_HOST_DEVICE void fuse_forward(const T* __restrict__ e, const T* __restrict__ g1, const T* __restrict__ g2,
                                 T* __restrict__ gm, T* __restrict__ final_, const int64_t* groups, int64_t M,
                                 int64_t N, int64_t s, int64_t gs, int64_t n) {
  for (int64_t x = 0; x < n; ++x) final_[x] = 0;
  for (int64_t i = 0; i < M; ++i) {
    T* gmi = gm + i * gs;
    for (int64_t x = 0; x < n; ++x) gmi[x] = 0;
    for (int64_t j = 0; j < N; ++j) {
      const T* g = g1 + (i * N + j) * s;
      const T* ek = e + groups[i * N + j] * s;
      for (int64_t x = 0; x < n; ++x) gmi[x] += g[x] * ek[x];
    }
    const T* g2i = g2 + i * s;
    for (int64_t x = 0; x < n; ++x) final_[x] += g2i[x] * gmi[x];
  }
}

// The backward of eq. 1 at a run of n pixels, from G1, G2 and the group maps fuse_forward produced there
// (channel stride s, like the outputs de[K], dl1[M*N], dl2[M]).
// gf[n]: d loss / d final; ggm[M] (channel stride ggs; may be null): d loss / d group maps; gimp[M*N] (may
// be null): d loss / d importance (every pixel's G1_ij adds to importance[i, j], so each pixel receives it
// whole). de: d loss / d sampled experts; dl1, dl2: d loss / d sampled logits, or, with gate_grads, d loss /
// d G1 and d loss / d G2 (the softmax backward left to the caller: with nearest sampling it is linear in
// them at each native gate pixel, so it can run once there, see softmax_backward). tmp: 2 * n scratch.
template <typename T>
CK_HOST_DEVICE void fuse_backward(const T* __restrict__ e, const T* __restrict__ g1, const T* __restrict__ g2,
                                  const T* __restrict__ gm, const int64_t* groups, int64_t K, int64_t M,
                                  int64_t N, const T* __restrict__ gf, const T* __restrict__ ggm, int64_t ggs,
                                  const T* gimp, T* __restrict__ de, T* __restrict__ dl1, T* __restrict__ dl2,
                                  int64_t s, int64_t n, T* __restrict__ tmp, bool gate_grads = false) {
  T* __restrict__ dot = tmp;
  T* __restrict__ dgm = tmp + n;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t x = 0; x < n; ++x) de[k * s + x] = 0;
  // Softmax backward: dl = g * (dg - sum(g * dg)); at level 2, dG2_i = gf * gm_i.
  if (gate_grads) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t x = 0; x < n; ++x) dl2[i * s + x] = gf[x] * gm[i * s + x];
  } else {
    for (int64_t x = 0; x < n; ++x) dot[x] = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t x = 0; x < n; ++x) dot[x] += g2[i * s + x] * gm[i * s + x];
    for (int64_t i = 0; i < M; ++i)
      for (int64_t x = 0; x < n; ++x) dl2[i * s + x] = g2[i * s + x] * gf[x] * (gm[i * s + x] - dot[x]);
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t x = 0; x < n; ++x) dgm[x] = gf[x] * g2[i * s + x];
    if (ggm)
      for (int64_t x = 0; x < n; ++x) dgm[x] += ggm[i * ggs + x];
    if (gate_grads) {
      for (int64_t j = 0; j < N; ++j) {
        const int64_t c = i * N + j;
        const T gi = gimp ? gimp[c] : static_cast<T>(0);
        const T* ek = e + groups[c] * s;
        T* dek = de + groups[c] * s;
        for (int64_t x = 0; x < n; ++x) {
          dl1[c * s + x] = dgm[x] * ek[x] + gi;
          dek[x] += dgm[x] * g1[c * s + x];
        }
      }
      continue;
    }
    for (int64_t x = 0; x < n; ++x) dot[x] = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = i * N + j;
      const T gi = gimp ? gimp[c] : static_cast<T>(0);
      const T* ek = e + groups[c] * s;
      for (int64_t x = 0; x < n; ++x) {
        dl1[c * s + x] = dgm[x] * ek[x] + gi;  // dG1_ij for now
        dot[x] += g1[c * s + x] * dl1[c * s + x];
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = i * N + j;
      T* dek = de + groups[c] * s;
      for (int64_t x = 0; x < n; ++x) {
        dek[x] += dgm[x] * g1[c * s + x];
        dl1[c * s + x] = g1[c * s + x] * (dl1[c * s + x] - dot[x]);
      }
    }
  }
}

// The softmax backward of softmax_runs' layout, in place: dg (d loss / d softmax output) becomes
// d loss / d logits = g * (dg - sum over the run of g * dg), for each run of n of `channels` channels at np
// pixels (channel c of pixel x at [c * cs + x]; g: the softmax output).
template <typename T>
CK_HOST_DEVICE void softmax_backward(const T* __restrict__ g, T* __restrict__ dg, int64_t channels, int64_t n,
                                     int64_t cs, int64_t np) {
  constexpr int64_t L = 64;  // pixel tiles: channel-inner loops over a tile vectorize across pixels
  T dot[L];
  for (int64_t x0 = 0; x0 < np; x0 += L) {
    const int64_t len = np - x0 < L ? np - x0 : L;
    for (int64_t first = 0; first < channels; first += n) {
      const T* gr = g + first * cs + x0;
      T* d = dg + first * cs + x0;
      for (int64_t x = 0; x < len; ++x) dot[x] = 0;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t x = 0; x < len; ++x) dot[x] += gr[j * cs + x] * d[j * cs + x];
      for (int64_t j = 0; j < n; ++j)
        for (int64_t x = 0; x < len; ++x) d[j * cs + x] = gr[j * cs + x] * (d[j * cs + x] - dot[x]);
    }
  }
}

}  // namespace gating
}  // namespace ck
