// Every op schema of the library, in one place (pytorch/extension-cpp style).
// Kernels register themselves per backend with TORCH_LIBRARY_IMPL(crowdkernels, CPU|CUDA, m) in
// csrc/<op>/; autograd formulas and fake (meta) kernels are registered from Python, crowdkernels/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

#include "common/output_pool.h"

#include <atomic>
#include <string>

#include "common/common.h"

extern "C" {
// `import crowdkernels._C` loads this shared object, whose static initializers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(crowdkernels, m) {
  // ---------------------------------------------------------------- density (csrc/density)
  // points: [T, 2] float64 (x, y) of every image, concatenated; offsets: [B + 1] int64 (image b owns
  // points[offsets[b]:offsets[b+1]]). Returns [T] float64: beta * mean distance to the k nearest
  // others of the same image (fewer when the image has <= k points), `lone` where it has no other point.
  m.def("knn_sigma(Tensor points, Tensor offsets, int k, float beta, float lone) -> Tensor");
  // The point set a style splats: style 0 (exact) keeps the in-image points (0 <= x < width,
  // 0 <= y < height) in order; style 1 (csrnet) also moves each to its pixel (floor) and keeps the first
  // of the points sharing a pixel, listed row-major per image (np.nonzero's order, as the classic recipe
  // rasterizes); style 2 (matlab) keeps every point. Returns (points [T', 2] in points' dtype,
  // offsets [B + 1], index [T'] int64: the input row of each kept point, to gather per-point sigmas).
  m.def(
      "density_prepare(Tensor points, Tensor offsets, int height, int width, int style) -> "
      "(Tensor, Tensor, Tensor)");
  // Splats one Gaussian per point. style: 0 exact (renormalized in-image window), 1 csrnet (scipy
  // gaussian_filter, mode='constant'), 2 matlab (fspecial kernel_size window). Returns [B, ceil(H/s),
  // ceil(W/s)] in points' dtype.
  m.def(
      "density_splat(Tensor points, Tensor offsets, Tensor sigma, int height, int width, int style, "
      "float truncate, int kernel_size, int stride, bool deterministic) -> Tensor");
  // The adaptive pipeline in one call: density_prepare (style 0 exact or 1 csrnet), knn_sigma of the kept
  // points (k, beta, lone), density_splat; the same bits as the three ops in a row. Image b owns
  // counts[b] consecutive points (a list, not an offsets tensor: building a tensor in Python cost more
  // than a small map's kNN); non-finite points raise ValueError naming points_list[b]. Returns [B, 1,
  // ceil(H/s), ceil(W/s)] in points' dtype. CPU only: per image, three dispatches and their Python glue
  // cost as much as the kernels on a small map; other devices run the three ops.
  m.def(
      "density_adaptive(Tensor points, int[] counts, int height, int width, int style, int k, float beta, "
      "float lone, float truncate, int kernel_size, int stride) -> Tensor");

  // ---------------------------------------------------------------- regions (csrc/regions)
  // boxes: [N, 5] int64 rows (b, y0, x0, h, w); scale: [N] (r > 0) in features' dtype. Box n's features
  // bilinearly upsampled by r (F.interpolate, align_corners=False) on an out_h x out_w canvas, zero past
  // floor(r*h) x floor(r*w). Returns [N, C, out_h, out_w].
  m.def("scale_regions(Tensor features, Tensor boxes, Tensor scale, int out_h, int out_w) -> Tensor");
  // Returns (grad_features [B, C, H, W], grad_scale [N]).
  m.def(
      "scale_regions_backward(Tensor grad, Tensor features, Tensor boxes, Tensor scale) -> (Tensor, Tensor)");
  // base with each (non-overlapping) box replaced by r^2 x the bilinear sample of pred[n] at
  // ((i+0.5)r-0.5, (j+0.5)r-0.5), clamped to its valid min(floor(r*h), Sh) x min(floor(r*w), Sw) part.
  m.def("unscale_regions(Tensor pred, Tensor boxes, Tensor scale, Tensor base) -> Tensor");
  // Returns (grad_pred [N, C, Sh, Sw], grad_scale [N], grad_base [B, C, H, W]).
  m.def(
      "unscale_regions_backward(Tensor grad, Tensor pred, Tensor boxes, Tensor scale) -> (Tensor, Tensor, "
      "Tensor)");


  // ---------------------------------------------------------------- gating (csrc/gating)
  // HMoDE eq. 1. experts: the K expert planes (expert k is [h_k, w_k], expert_sizes = [h_0, w_0, h_1, w_1,
  // ...], S = sum_k h_k * w_k) packed as [B, S] (image-major: each image's planes, concatenated) or as
  // [B * S] (expert-major: each expert's [B, h_k, w_k] block, concatenated); gate1: [B, M*N, hg1, wg1] logits (softmax over each group's
  // N channels); gate2: [B, M, hg2, wg2] logits (softmax over M); groups: [M, N] int64 expert indices. Every
  // input is sampled at the [height, width] output as F.interpolate(mode="bilinear" if bilinear else
  // "nearest", align_corners=False) would. Returns final [B, 1, H, W], group_maps [B, M, H, W] and
  // importance [B, M, N] (the sum over output pixels of G1).
  m.def(
      "gating_forward(Tensor experts, int[] expert_sizes, Tensor gate1, Tensor gate2, Tensor groups, "
      "int height, int width, bool bilinear) -> (Tensor, Tensor, Tensor)");
  // Gradients of gating_forward for experts (in their layout), gate1 and gate2, at their native resolution,
  // from the gradients of its three outputs (an absent one counts as zero).
  m.def(
      "gating_backward(Tensor? grad_final, Tensor? grad_group_maps, Tensor? grad_importance, Tensor experts, "
      "int[] expert_sizes, Tensor gate1, Tensor gate2, Tensor groups, int height, int width, bool bilinear) "
      "-> (Tensor, Tensor, Tensor)");


  // ---------------------------------------------------------------- local_count (csrc/local_count)
  // pred, target: [B, H, W] (same dtype: float16/bfloat16/float32/float64, accumulated in at least
  // float32). Non-overlapping window_h x window_w windows, row-major; keep_partial counts the windows
  // cut by the right/bottom edge. Returns three [B, R]: the window sums of pred, of target, and of the
  // pixel-wise squared error (pred - target)^2 (HMoDE sec. III-C: X, Xg and the local error map R).
  m.def("local_counts(Tensor pred, Tensor target, int window_h, int window_w, bool keep_partial) -> (Tensor, Tensor, Tensor)");
  // Gradients of the three [B, R] outputs (None: no gradient, as zeros, without reading what it would
  // need) -> (grad_pred [B, H, W], grad_target [B, H, W]); output_mask[i] false returns a [0] tensor.
  m.def(
      "local_counts_backward(Tensor? grad_pred_counts, Tensor? grad_target_counts, Tensor? grad_sq_error, "
      "Tensor pred, Tensor target, int window_h, int window_w, bool keep_partial, bool[2] output_mask) "
      "-> (Tensor, Tensor)");


  // ---------------------------------------------------------------- end of schemas
}

#ifndef CK_CUDA_ARCHS
#define CK_CUDA_ARCHS ""
#endif

// What this binary was compiled with, for crowdkernels.backends() and `crowdkernels info`.
static std::string build_info() {
  std::string info = "cpu=1;openmp=";
#ifdef _OPENMP
  info += std::to_string(_OPENMP);
#else
  info += "0";
#endif
#ifdef CK_WITH_CUDA
  info += ";cuda=1;cuda_archs=" CK_CUDA_ARCHS;
#else
  info += ";cuda=0;cuda_archs=";
#endif
  return info;
}

TORCH_LIBRARY_FRAGMENT(crowdkernels, m) { m.def("_build_info() -> str", &build_info); }

namespace ck {
static std::atomic<bool> g_poison{false};
bool poison_outputs() { return g_poison.load(); }
}  // namespace ck

static void set_poison(bool enabled) { ck::g_poison.store(enabled); }

static std::vector<int64_t> cpu_cache_info() { return ck::pool_info(); }
static void cpu_cache_limit(int64_t bytes) { ck::pool_set_limit(bytes); }
static void cpu_cache_empty() { ck::pool_empty(); }

TORCH_LIBRARY_FRAGMENT(crowdkernels, m) {
  m.def("_set_poison(bool enabled) -> ()", &set_poison);
  // The CPU output pool (csrc/common/output_pool.h): [cached bytes, limit, hits, misses]; set the limit;
  // free every cached buffer.
  m.def("_cpu_cache_info() -> int[]", &cpu_cache_info);
  m.def("_cpu_cache_limit(int bytes) -> ()", &cpu_cache_limit);
  m.def("_cpu_cache_empty() -> ()", &cpu_cache_empty);
}
