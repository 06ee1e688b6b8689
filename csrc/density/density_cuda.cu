// CUDA kernels of the density op. The per-point maths is density.h, shared with the CPU kernels.
//
// A ragged batch runs as a fixed sequence of launches whatever the number of images (no loop over
// images on the host): kNN = bounding boxes -> cell counts -> scan -> fill -> queries; splatting =
// windows -> one block per point accumulating its Gaussian with atomics. deterministic=true accumulates
// in 2^-40 fixed point with integer atomics, whose sums do not depend on the order of arrival, and so
// gives bit-reproducible maps.
//
// Every kernel loops with a grid stride, so the grids are clamped (blocks_for, clamp_blocks), and launches
// through CK_LAUNCH (common/cuda_emulation.h), so that the tests also run these kernels on the CPU
// (python_tests/test_cuda_emulated.py). The offsets are checked as the CPU kernels check them
// (common/checks.h: one copy of B + 1 numbers to the host) before any kernel indexes with them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>

#include "common/checks.h"
#include "common/cuda_emulation.h"
#include "density/density.h"

namespace ck {
namespace density {
namespace {

constexpr int kThreads = 256;
constexpr double kFixedScale = 1099511627776.0;  // 2^40: 1e-12 resolution, sums up to 2^23 heads per pixel

// Grid sizes for the grid-stride loops below: at least one block, at most 65535 * 32 (the loops wrap).
inline int blocks_for(int64_t n) {
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 32));
}
inline int clamp_blocks(int64_t n, int64_t most) { return (int)std::max<int64_t>(1, std::min<int64_t>(n, most)); }

// One block per image: bounding box by block reduction, then the grid parameters.
__global__ void grid_kernel(const double* __restrict__ pts, const int64_t* __restrict__ off, int64_t B,
                            double* __restrict__ grids) {
  __shared__ double smin_x[kThreads], smin_y[kThreads], smax_x[kThreads], smax_y[kThreads];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    double xmin = DBL_MAX, ymin = DBL_MAX, xmax = -DBL_MAX, ymax = -DBL_MAX;
    for (int64_t i = off[b] + threadIdx.x; i < off[b + 1]; i += blockDim.x) {
      xmin = fmin(xmin, pts[2 * i]);
      xmax = fmax(xmax, pts[2 * i]);
      ymin = fmin(ymin, pts[2 * i + 1]);
      ymax = fmax(ymax, pts[2 * i + 1]);
    }
    smin_x[threadIdx.x] = xmin;
    smin_y[threadIdx.x] = ymin;
    smax_x[threadIdx.x] = xmax;
    smax_y[threadIdx.x] = ymax;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        smin_x[threadIdx.x] = fmin(smin_x[threadIdx.x], smin_x[threadIdx.x + s]);
        smin_y[threadIdx.x] = fmin(smin_y[threadIdx.x], smin_y[threadIdx.x + s]);
        smax_x[threadIdx.x] = fmax(smax_x[threadIdx.x], smax_x[threadIdx.x + s]);
        smax_y[threadIdx.x] = fmax(smax_y[threadIdx.x], smax_y[threadIdx.x + s]);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const int64_t n = off[b + 1] - off[b];
      Grid g = n > 0 ? make_grid(smin_x[0], smin_y[0], smax_x[0], smax_y[0], n, 2 * off[b] + 4 * b)
                     : make_grid(0.0, 0.0, 0.0, 0.0, 0, 2 * off[b] + 4 * b);
      store_grid(g, grids + b * kGridFields);
    }
    __syncthreads();
  }
}

__global__ void cell_count_kernel(const double* __restrict__ pts, const int64_t* __restrict__ off, int64_t B, int64_t T,
                                  const double* __restrict__ grids, int64_t* __restrict__ cell,
                                  unsigned long long* __restrict__ counts) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T; i += (int64_t)gridDim.x * blockDim.x) {
    const Grid g = load_grid(grids + image_of(off, B, i) * kGridFields);
    const int64_t c = cell_of(g, pts[2 * i], pts[2 * i + 1]);
    cell[i] = c;
    atomicAdd(counts + c, 1ULL);
  }
}

__global__ void cell_fill_kernel(const int64_t* __restrict__ cell, int64_t T, const int64_t* __restrict__ cell_start,
                                 unsigned long long* __restrict__ cursor, int64_t* __restrict__ order) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = cell[i];
    order[cell_start[c] + (int64_t)atomicAdd(cursor + c, 1ULL)] = i;
  }
}

__global__ void knn_kernel(const double* __restrict__ pts, const int64_t* __restrict__ off, int64_t B, int64_t T,
                           const double* __restrict__ grids, const int64_t* __restrict__ cell_start,
                           const int64_t* __restrict__ order, int64_t k, double beta, double lone,
                           double* __restrict__ sig) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = image_of(off, B, i);
    const int64_t n = off[b + 1] - off[b];
    const int64_t K = k < n - 1 ? k : n - 1;
    sig[i] = K < 1 ? lone : knn_sigma_one(i, pts, load_grid(grids + b * kGridFields), cell_start, order, (int)K, beta);
  }
}

__global__ void window_kernel(const double* __restrict__ pts, const double* __restrict__ sigma, int64_t T, int64_t H,
                              int64_t W, int64_t style, double truncate, int64_t kernel_size, double* __restrict__ win) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T; i += (int64_t)gridDim.x * blockDim.x)
    store_window(make_window(style, pts[2 * i], pts[2 * i + 1], sigma[i], H, W, truncate, kernel_size),
                 win + i * kWindowFields);
}

// One block per point: its threads stride over the window's pixels.
template <typename scalar_t, bool kFixed>
__global__ void splat_kernel(const double* __restrict__ win, const int64_t* __restrict__ off, int64_t B, int64_t T,
                             int64_t Hs, int64_t Ws, int64_t stride, scalar_t* __restrict__ out,
                             unsigned long long* __restrict__ fixed) {
  for (int64_t i = blockIdx.x; i < T; i += gridDim.x) {
    const Window w = load_window(win + i * kWindowFields);
    if (w.y0 > w.y1 || w.x0 > w.x1) continue;
    const int64_t b = image_of(off, B, i);
    const int64_t ww = w.x1 - w.x0 + 1, n = (w.y1 - w.y0 + 1) * ww;
    for (int64_t p = threadIdx.x; p < n; p += blockDim.x) {
      const int64_t r = w.y0 + p / ww, c = w.x0 + p % ww;
      const double v = pixel_weight(w, gauss((double)r - w.cy, w.a), gauss((double)c - w.cx, w.a));
      if (v == 0.0) continue;
      const int64_t o = (b * Hs + r / stride) * Ws + c / stride;
      if (kFixed) {
        atomicAdd(fixed + o, (unsigned long long)llrint(v * kFixedScale));
      } else {
        atomicAdd(out + o, static_cast<scalar_t>(v));
      }
    }
  }
}

template <typename scalar_t>
__global__ void fixed_to_float_kernel(const unsigned long long* __restrict__ fixed, int64_t n, scalar_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x)
    out[j] = static_cast<scalar_t>((double)fixed[j] / kFixedScale);
}

}  // namespace

at::Tensor knn_sigma_cuda(const at::Tensor& points_in, const at::Tensor& offsets_in, int64_t k, double beta,
                          double lone) {
  check_knn_args(points_in, offsets_in, k);
  check_offsets_values(offsets_in, points_in.size(0));
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.to(at::kDouble).contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t T = points.size(0), B = offsets.numel() - 1;
  at::Tensor out = ck::new_output({T}, points.options());
  if (T == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = points.options();
  at::Tensor grids = at::empty({B, kGridFields}, opts);
  const int64_t total_cells = 2 * T + 4 * B;
  at::Tensor cell = at::empty({T}, opts.dtype(at::kLong));
  at::Tensor counts = at::zeros({total_cells}, opts.dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());

  CK_LAUNCH(clamp_blocks(B, 65535), kThreads, stream, grid_kernel)(points.data_ptr<double>(), offsets.data_ptr<int64_t>(),
                                                                   B, grids.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CK_LAUNCH(blocks_for(T), kThreads, stream, cell_count_kernel)(points.data_ptr<double>(), offsets.data_ptr<int64_t>(),
                                                                B, T, grids.data_ptr<double>(),
                                                                cell.data_ptr<int64_t>(), counts_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor cell_start = at::zeros({total_cells + 1}, opts.dtype(at::kLong));
  cell_start.narrow(0, 1, total_cells).copy_(at::cumsum(counts, 0));
  counts.zero_();  // reused as the fill cursor
  at::Tensor order = at::empty({T}, opts.dtype(at::kLong));
  CK_LAUNCH(blocks_for(T), kThreads, stream, cell_fill_kernel)(cell.data_ptr<int64_t>(), T,
                                                               cell_start.data_ptr<int64_t>(), counts_ptr,
                                                               order.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CK_LAUNCH(blocks_for(T), kThreads, stream, knn_kernel)(points.data_ptr<double>(), offsets.data_ptr<int64_t>(), B, T,
                                                         grids.data_ptr<double>(), cell_start.data_ptr<int64_t>(),
                                                         order.data_ptr<int64_t>(), k, beta, lone,
                                                         out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor density_splat_cuda(const at::Tensor& points_in, const at::Tensor& offsets_in, const at::Tensor& sigma_in,
                              int64_t height, int64_t width, int64_t style, double truncate, int64_t kernel_size,
                              int64_t stride, bool deterministic) {
  check_splat_args(points_in, offsets_in, sigma_in, height, width, style, truncate, kernel_size, stride);
  check_offsets_values(offsets_in, points_in.size(0));
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.to(at::kDouble).contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor sigma = sigma_in.to(at::kDouble).contiguous();
  const int64_t T = points.size(0), B = offsets.numel() - 1;
  const int64_t Hs = (height + stride - 1) / stride, Ws = (width + stride - 1) / stride;
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor win = at::empty({std::max<int64_t>(T, 1), kWindowFields}, points.options());
  if (T > 0) {
    CK_LAUNCH(blocks_for(T), kThreads, stream, window_kernel)(points.data_ptr<double>(), sigma.data_ptr<double>(), T,
                                                              height, width, style, truncate, kernel_size,
                                                              win.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int splat_blocks = clamp_blocks(T, 65535 * 16);  // one block per point, the loop wraps past that
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(points_in.scalar_type(), "density_splat_cuda", [&] {
    if (deterministic) {
      // every element is written by the conversion kernel, so `out` may start poisoned
      out = ck::new_output({B, Hs, Ws}, points_in.options());
      at::Tensor fixed = at::zeros({B, Hs, Ws}, points_in.options().dtype(at::kLong));
      auto* fixed_ptr = reinterpret_cast<unsigned long long*>(fixed.data_ptr<int64_t>());
      if (T > 0) {
        CK_LAUNCH(splat_blocks, kThreads, stream, splat_kernel<scalar_t, true>)(
            win.data_ptr<double>(), offsets.data_ptr<int64_t>(), B, T, Hs, Ws, stride, nullptr, fixed_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (out.numel() > 0) {
        CK_LAUNCH(blocks_for(out.numel()), kThreads, stream, fixed_to_float_kernel<scalar_t>)(
            fixed_ptr, out.numel(), out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      out = at::zeros({B, Hs, Ws}, points_in.options());
      if (T > 0) {
        CK_LAUNCH(splat_blocks, kThreads, stream, splat_kernel<scalar_t, false>)(
            win.data_ptr<double>(), offsets.data_ptr<int64_t>(), B, T, Hs, Ws, stride, out.data_ptr<scalar_t>(), nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return out;
}

}  // namespace density
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CUDA, m) {
  m.impl("knn_sigma", &ck::density::knn_sigma_cuda);
  m.impl("density_splat", &ck::density::density_splat_cuda);
}
