// CUDA kernels of L2SM region rescaling (see regions.h for the sampling maths, shared with the CPU loops).
//
// Determinism: the forward passes write each output element once. The backward passes scatter the
// bilinear adjoint with atomicAdd (into grad_features for scale_regions, whose boxes may overlap, and into
// grad_pred for unscale_regions), so those gradients are not bit-for-bit reproducible from run to run. The
// gradient of `scale` is reduced per (box, channel) in a fixed tree inside one block and then summed over
// channels by at::sum, so it does not depend on atomics. It is accumulated in float64 whatever the dtype
// (each thread's terms, the block's tree, the channels), as the CPU kernels accumulate it past each row:
// summed in float32, a count loss over a smooth 300 x 300 box zoomed by 2 drifted by 2e-6 of the result.
//
// Tolerance, float32: the CUDA grad_scale is within 1e-7 of the float64 result of the same inputs, relative
// to the sum of its terms' magnitudes (only the float32 products round); the CPU's within 1e-6 (it sums
// each row of a box in float32 first). python_tests/test_cuda_emulated.py checks both.
//
// Every kernel loops over its work with a grid stride (the per-(box, channel) kernels: one block a
// (box, channel) while the grid lasts), so the launchers clamp their grids to what CUDA allows, and
// launches through CK_LAUNCH (common/cuda_emulation.h), so that the tests also run them on the CPU. Boxes
// and scale are checked as the CPU kernels check them (common/checks.h: one copy of 6 N numbers to the
// host) before any kernel indexes with them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/common.h"
#include "common/cuda_emulation.h"
#include "regions/regions.h"

namespace ck {
namespace regions {
namespace {

constexpr int kThreads = 256;

struct DevBox {
  int64_t b, y0, x0, h, w;
};

__device__ __forceinline__ DevBox load_box(const int64_t* boxes, int64_t n) {
  const int64_t* p = boxes + 5 * n;
  return DevBox{p[0], p[1], p[2], p[3], p[4]};
}

// Sums `v` over the block (blockDim.x: a power of two, at most kThreads) in a fixed tree, the same order
// every run; every thread gets the total. Called by every thread of the block.
__device__ double block_sum(double v) {
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  const double total = buf[0];
  __syncthreads();  // every thread has read buf[0] before a next call (the next (box, channel)) overwrites it
  return total;
}

// ------------------------------------------------------------------------------------ scale_regions

template <typename T>
__global__ void scale_regions_fwd_kernel(const T* __restrict__ feat, const int64_t* __restrict__ boxes,
                                         const T* __restrict__ scale, T* __restrict__ out, int64_t N, int64_t C,
                                         int64_t H, int64_t W, int64_t Sh, int64_t Sw) {
  const int64_t total = N * C * Sh * Sw;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = idx % Sw;
    const int64_t i = (idx / Sw) % Sh;
    const int64_t c = (idx / (Sw * Sh)) % C;
    const int64_t n = idx / (Sw * Sh * C);
    const DevBox bx = load_box(boxes, n);
    const double r = static_cast<double>(scale[n]);
    const int64_t vh = min(valid_extent(r, bx.h), Sh), vw = min(valid_extent(r, bx.w), Sw);
    if (i >= vh || j >= vw) {
      out[idx] = T(0);
      continue;
    }
    const T inv_r = static_cast<T>(1.0 / r);
    const AxisSample<T> y = upsample_axis<T>(i, inv_r, bx.h);
    const AxisSample<T> x = upsample_axis<T>(j, inv_r, bx.w);
    const T* f = feat + ((bx.b * C + c) * H + bx.y0) * W + bx.x0;
    out[idx] = bilinear(f[y.i0 * W + x.i0], f[y.i0 * W + x.i1], f[y.i1 * W + x.i0], f[y.i1 * W + x.i1], y.l, x.l);
  }
}

// One block per (box, channel) t < N * C, striding over them.
template <typename T>
__global__ void scale_regions_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ feat,
                                         const int64_t* __restrict__ boxes, const T* __restrict__ scale,
                                         T* __restrict__ grad_feat, double* __restrict__ partial, int64_t N,
                                         int64_t C, int64_t H, int64_t W, int64_t Sh, int64_t Sw) {
  for (int64_t t = blockIdx.x; t < N * C; t += gridDim.x) {
    const int64_t n = t / C, c = t % C;
    const DevBox bx = load_box(boxes, n);
    const double r = static_cast<double>(scale[n]);
    const int64_t vh = min(valid_extent(r, bx.h), Sh), vw = min(valid_extent(r, bx.w), Sw);
    const T inv_r = static_cast<T>(1.0 / r);
    const int64_t off = ((bx.b * C + c) * H + bx.y0) * W + bx.x0;
    const T* f = feat + off;
    T* gf = grad_feat + off;
    const T* g = grad + t * Sh * Sw;
    const int64_t valid = vh > 0 && vw > 0 ? vh * vw : 0;  // vh < 0: valid_extent of a huge r
    double dr = 0.0;
    for (int64_t k = threadIdx.x; k < valid; k += blockDim.x) {
      const int64_t i = k / vw, j = k % vw;
      const AxisSample<T> y = upsample_axis<T>(i, inv_r, bx.h);
      const AxisSample<T> x = upsample_axis<T>(j, inv_r, bx.w);
      const T gv = g[i * Sw + j];
      T w[4];
      bilinear_weights(y.l, x.l, w);
      atomicAdd(gf + y.i0 * W + x.i0, gv * w[0]);
      atomicAdd(gf + y.i0 * W + x.i1, gv * w[1]);
      atomicAdd(gf + y.i1 * W + x.i0, gv * w[2]);
      atomicAdd(gf + y.i1 * W + x.i1, gv * w[3]);
      dr += static_cast<double>(gv * bilinear_dr(f[y.i0 * W + x.i0], f[y.i0 * W + x.i1], f[y.i1 * W + x.i0],
                                                 f[y.i1 * W + x.i1], y.l, x.l, y.dsrc_dr, x.dsrc_dr));
    }
    const double total = block_sum(dr);
    if (threadIdx.x == 0) partial[t] = total;
  }
}

// ---------------------------------------------------------------------------------- unscale_regions

// One block per (box, channel) t < N * C, striding over them; boxes of one image do not overlap (checked
// in Python), so every output element is written by at most one block.
template <typename T>
__global__ void unscale_regions_fwd_kernel(const T* __restrict__ pred, const int64_t* __restrict__ boxes,
                                           const T* __restrict__ scale, T* __restrict__ out, int64_t N, int64_t C,
                                           int64_t H, int64_t W, int64_t Sh, int64_t Sw) {
  for (int64_t t = blockIdx.x; t < N * C; t += gridDim.x) {
    const int64_t n = t / C, c = t % C;
    const DevBox bx = load_box(boxes, n);
    const T r = scale[n];
    const int64_t vh = min(valid_extent(static_cast<double>(r), bx.h), Sh);
    const int64_t vw = min(valid_extent(static_cast<double>(r), bx.w), Sw);
    T* o = out + ((bx.b * C + c) * H + bx.y0) * W + bx.x0;
    const T* p = pred + t * Sh * Sw;
    for (int64_t k = threadIdx.x; k < bx.h * bx.w; k += blockDim.x) {
      const int64_t i = k / bx.w, j = k % bx.w;
      if (vh <= 0 || vw <= 0) {  // an empty valid part (< 0: valid_extent of a huge r)
        o[i * W + j] = T(0);
        continue;
      }
      const AxisSample<T> y = downsample_axis<T>(i, r, vh);
      const AxisSample<T> x = downsample_axis<T>(j, r, vw);
      o[i * W + j] =
          r * r * bilinear(p[y.i0 * Sw + x.i0], p[y.i0 * Sw + x.i1], p[y.i1 * Sw + x.i0], p[y.i1 * Sw + x.i1], y.l, x.l);
    }
  }
}

// One block per (box, channel) t < N * C, striding over them.
template <typename T>
__global__ void unscale_regions_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ pred,
                                           const int64_t* __restrict__ boxes, const T* __restrict__ scale,
                                           T* __restrict__ grad_pred, T* __restrict__ grad_base,
                                           double* __restrict__ partial, int64_t N, int64_t C, int64_t H, int64_t W,
                                           int64_t Sh, int64_t Sw) {
  for (int64_t t = blockIdx.x; t < N * C; t += gridDim.x) {
    const int64_t n = t / C, c = t % C;
    const DevBox bx = load_box(boxes, n);
    const T r = scale[n];
    const T r2 = r * r;
    const int64_t vh = min(valid_extent(static_cast<double>(r), bx.h), Sh);
    const int64_t vw = min(valid_extent(static_cast<double>(r), bx.w), Sw);
    const int64_t off = ((bx.b * C + c) * H + bx.y0) * W + bx.x0;
    const T* g = grad + off;
    T* gb = grad_base + off;
    const T* p = pred + t * Sh * Sw;
    T* gp = grad_pred + t * Sh * Sw;
    double dr = 0.0;
    for (int64_t k = threadIdx.x; k < bx.h * bx.w; k += blockDim.x) {
      const int64_t i = k / bx.w, j = k % bx.w;
      gb[i * W + j] = T(0);  // the box's output does not depend on base
      if (vh <= 0 || vw <= 0) continue;
      const AxisSample<T> y = downsample_axis<T>(i, r, vh);
      const AxisSample<T> x = downsample_axis<T>(j, r, vw);
      const T gv = g[i * W + j];
      T w[4];
      bilinear_weights(y.l, x.l, w);
      const T gr = gv * r2;
      atomicAdd(gp + y.i0 * Sw + x.i0, gr * w[0]);
      atomicAdd(gp + y.i0 * Sw + x.i1, gr * w[1]);
      atomicAdd(gp + y.i1 * Sw + x.i0, gr * w[2]);
      atomicAdd(gp + y.i1 * Sw + x.i1, gr * w[3]);
      const T v00 = p[y.i0 * Sw + x.i0], v01 = p[y.i0 * Sw + x.i1], v10 = p[y.i1 * Sw + x.i0],
              v11 = p[y.i1 * Sw + x.i1];
      // d(r^2 S)/dr = 2 r S + r^2 dS/dr
      dr += static_cast<double>(gv * (T(2) * r * bilinear(v00, v01, v10, v11, y.l, x.l) +
                                      r2 * bilinear_dr(v00, v01, v10, v11, y.l, x.l, y.dsrc_dr, x.dsrc_dr)));
    }
    const double total = block_sum(dr);
    if (threadIdx.x == 0) partial[t] = total;
  }
}

// ------------------------------------------------------------------------------------------ launchers

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got ", t.dim(), "-D");
}

// Grids of the grid-stride kernels: one block per kThreads elements (grid_for) or per (box, channel)
// (blocks_for), at least one and at most 65535 * 32 blocks; the kernels' loops wrap past that.
int blocks_for(int64_t tasks) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, 65535LL * 32))); }
int grid_for(int64_t total) { return blocks_for((total + kThreads - 1) / kThreads); }

at::Tensor scale_regions_cuda(const at::Tensor& features_in, const at::Tensor& boxes_in, const at::Tensor& scale_in,
                              int64_t Sh, int64_t Sw) {
  check_features(features_in, "features");
  check_boxes_and_scale(boxes_in, scale_in, features_in);
  TORCH_CHECK(Sh >= 1 && Sw >= 1, "out_size must be >= 1, got (", Sh, ", ", Sw, ")");
  check_boxes_values(boxes_in, features_in.size(0), features_in.size(2), features_in.size(3));
  check_scale_values(scale_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous(), boxes = boxes_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = boxes.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  at::Tensor out = ck::new_output({N, C, Sh, Sw}, features.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "scale_regions_cuda", [&] {
    CK_LAUNCH(grid_for(out.numel()), kThreads, c10::cuda::getCurrentCUDAStream(), scale_regions_fwd_kernel<scalar_t>)(
        features.data_ptr<scalar_t>(), boxes.data_ptr<int64_t>(), scale.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), N, C, H, W, Sh, Sw);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> scale_regions_backward_cuda(const at::Tensor& grad_in,
                                                               const at::Tensor& features_in,
                                                               const at::Tensor& boxes_in,
                                                               const at::Tensor& scale_in) {
  check_features(features_in, "features");
  check_features(grad_in, "grad");
  CK_CHECK_DTYPE(grad_in, features_in.scalar_type());
  CK_CHECK_DEVICE(grad_in, features_in);
  check_boxes_and_scale(boxes_in, scale_in, features_in);
  check_boxes_values(boxes_in, features_in.size(0), features_in.size(2), features_in.size(3));
  check_scale_values(scale_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor grad = grad_in.contiguous(), features = features_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = boxes.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  TORCH_CHECK(grad.size(0) == N && grad.size(1) == C, "grad must be [", N, ", ", C, ", Sh, Sw], got ",
              grad.sizes());
  const int64_t Sh = grad.size(2), Sw = grad.size(3);
  at::Tensor grad_features = at::zeros_like(features);
  at::Tensor partial = at::zeros({N, C}, features.options().dtype(at::kDouble));  // d loss / d r per (box, channel)
  if (N * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "scale_regions_backward_cuda", [&] {
      CK_LAUNCH(blocks_for(N * C), kThreads, c10::cuda::getCurrentCUDAStream(), scale_regions_bwd_kernel<scalar_t>)(
          grad.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), boxes.data_ptr<int64_t>(),
          scale.data_ptr<scalar_t>(), grad_features.data_ptr<scalar_t>(), partial.data_ptr<double>(), N, C, H, W, Sh,
          Sw);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_features, partial.sum(1).to(scale.scalar_type())};
}

at::Tensor unscale_regions_cuda(const at::Tensor& pred_in, const at::Tensor& boxes_in, const at::Tensor& scale_in,
                                const at::Tensor& base_in) {
  check_features(pred_in, "pred");
  check_features(base_in, "base");
  CK_CHECK_DTYPE(base_in, pred_in.scalar_type());
  CK_CHECK_DEVICE(base_in, pred_in);
  check_boxes_and_scale(boxes_in, scale_in, pred_in);
  check_boxes_values(boxes_in, base_in.size(0), base_in.size(2), base_in.size(3));
  check_scale_values(scale_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous(), boxes = boxes_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = boxes.size(0), B = base_in.size(0), C = base_in.size(1), H = base_in.size(2),
                W = base_in.size(3);
  TORCH_CHECK(pred.size(0) == N && pred.size(1) == C, "pred must be [", N, ", ", C, ", Sh, Sw], got ",
              pred.sizes());
  at::Tensor out = ck::new_output({B, C, H, W}, base_in.options());
  out.copy_(base_in);
  if (N * C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "unscale_regions_cuda", [&] {
    CK_LAUNCH(blocks_for(N * C), kThreads, c10::cuda::getCurrentCUDAStream(), unscale_regions_fwd_kernel<scalar_t>)(
        pred.data_ptr<scalar_t>(), boxes.data_ptr<int64_t>(), scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        N, C, H, W, pred.size(2), pred.size(3));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unscale_regions_backward_cuda(const at::Tensor& grad_in,
                                                                             const at::Tensor& pred_in,
                                                                             const at::Tensor& boxes_in,
                                                                             const at::Tensor& scale_in) {
  check_features(pred_in, "pred");
  check_features(grad_in, "grad");
  CK_CHECK_DTYPE(grad_in, pred_in.scalar_type());
  CK_CHECK_DEVICE(grad_in, pred_in);
  check_boxes_and_scale(boxes_in, scale_in, pred_in);
  check_boxes_values(boxes_in, grad_in.size(0), grad_in.size(2), grad_in.size(3));
  check_scale_values(scale_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor grad = grad_in.contiguous(), pred = pred_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = boxes.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  TORCH_CHECK(pred.size(0) == N && pred.size(1) == C, "pred must be [", N, ", ", C, ", Sh, Sw], got ",
              pred.sizes());
  at::Tensor grad_pred = at::zeros_like(pred);
  at::Tensor grad_base = ck::new_output(grad.sizes(), grad.options());
  grad_base.copy_(grad);
  at::Tensor partial = at::zeros({N, C}, pred.options().dtype(at::kDouble));  // d loss / d r per (box, channel)
  if (N * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "unscale_regions_backward_cuda", [&] {
      CK_LAUNCH(blocks_for(N * C), kThreads, c10::cuda::getCurrentCUDAStream(), unscale_regions_bwd_kernel<scalar_t>)(
          grad.data_ptr<scalar_t>(), pred.data_ptr<scalar_t>(), boxes.data_ptr<int64_t>(), scale.data_ptr<scalar_t>(),
          grad_pred.data_ptr<scalar_t>(), grad_base.data_ptr<scalar_t>(), partial.data_ptr<double>(), N, C, H, W,
          pred.size(2), pred.size(3));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_pred, partial.sum(1).to(scale.scalar_type()), grad_base};
}

}  // namespace
}  // namespace regions
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CUDA, m) {
  m.impl("scale_regions", &ck::regions::scale_regions_cuda);
  m.impl("scale_regions_backward", &ck::regions::scale_regions_backward_cuda);
  m.impl("unscale_regions", &ck::regions::unscale_regions_cuda);
  m.impl("unscale_regions_backward", &ck::regions::unscale_regions_backward_cuda);
}
