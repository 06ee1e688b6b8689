// CPU kernels of L2SM region rescaling (see regions.h for the sampling maths).
//
// Determinism: every kernel gives the same bits whatever the thread count. Work is split so that no two
// tasks write the same element: the forward passes and unscale_regions_backward over (box, channel)
// (boxes of one image do not overlap in unscale_regions; scale_regions writes separate canvases), and
// scale_regions_backward over (image, channel), each task visiting the boxes of its image in index order,
// since boxes may overlap there. Per-(box, channel) partial gradients of `scale` go to their own slots and
// are summed over channels afterwards in a fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/common.h"
#include "common/simd.h"
#include "regions/regions.h"

namespace ck {
namespace regions {
namespace {

struct Box {
  int64_t b, y0, x0, h, w;
};

std::vector<Box> read_boxes(const at::Tensor& boxes, int64_t B, int64_t H, int64_t W) {
  const int64_t N = boxes.size(0);
  const int64_t* p = boxes.data_ptr<int64_t>();
  check_boxes_values(p, N, B, H, W);  // shared with the CUDA entry points (common/checks.h)
  std::vector<Box> out(N);
  for (int64_t n = 0; n < N; ++n) out[n] = Box{p[5 * n], p[5 * n + 1], p[5 * n + 2], p[5 * n + 3], p[5 * n + 4]};
  return out;
}

// Per-box sampling tables of both axes, flattened: box n owns [off[n], off[n+1]) of the row table and
// likewise of the column table.
template <typename T>
struct Tables {
  std::vector<AxisSample<T>> ys, xs;
  std::vector<int64_t> yoff, xoff;
  int64_t rows(int64_t n) const { return yoff[n + 1] - yoff[n]; }
  int64_t cols(int64_t n) const { return xoff[n + 1] - xoff[n]; }
};

// scale_regions: output rows i < min(floor(r*h), Sh) sample the h rows of the box.
template <typename T>
Tables<T> upsample_tables(const std::vector<Box>& boxes, const T* scale, int64_t Sh, int64_t Sw) {
  check_scale_values(scale, static_cast<int64_t>(boxes.size()));  // common/checks.h
  Tables<T> t;
  t.yoff.push_back(0);
  t.xoff.push_back(0);
  for (size_t n = 0; n < boxes.size(); ++n) {
    const double r = static_cast<double>(scale[n]);
    const T inv_r = static_cast<T>(1.0 / r);
    const int64_t vh = std::min(valid_extent(r, boxes[n].h), Sh);
    const int64_t vw = std::min(valid_extent(r, boxes[n].w), Sw);
    for (int64_t i = 0; i < vh; ++i) t.ys.push_back(upsample_axis<T>(i, inv_r, boxes[n].h));
    for (int64_t j = 0; j < vw; ++j) t.xs.push_back(upsample_axis<T>(j, inv_r, boxes[n].w));
    t.yoff.push_back(static_cast<int64_t>(t.ys.size()));
    t.xoff.push_back(static_cast<int64_t>(t.xs.size()));
  }
  return t;
}

// unscale_regions: box rows i < h sample the valid min(floor(r*h), Sh) rows of the prediction. An empty
// valid part gives an empty table: the box is then 0 (the Python layer rejects such a scale).
template <typename T>
Tables<T> downsample_tables(const std::vector<Box>& boxes, const T* scale, int64_t Sh, int64_t Sw) {
  check_scale_values(scale, static_cast<int64_t>(boxes.size()));  // common/checks.h
  Tables<T> t;
  t.yoff.push_back(0);
  t.xoff.push_back(0);
  for (size_t n = 0; n < boxes.size(); ++n) {
    const double r = static_cast<double>(scale[n]);
    const int64_t vh = std::min(valid_extent(r, boxes[n].h), Sh);
    const int64_t vw = std::min(valid_extent(r, boxes[n].w), Sw);
    if (vh > 0 && vw > 0) {
      for (int64_t i = 0; i < boxes[n].h; ++i) t.ys.push_back(downsample_axis<T>(i, scale[n], vh));
      for (int64_t j = 0; j < boxes[n].w; ++j) t.xs.push_back(downsample_axis<T>(j, scale[n], vw));
    }
    t.yoff.push_back(static_cast<int64_t>(t.ys.size()));
    t.xoff.push_back(static_cast<int64_t>(t.xs.size()));
  }
  return t;
}

// Enough elements per chunk (2^18) that waking the thread pool pays off, even on a busy machine where a
// sleeping worker takes milliseconds to be scheduled: small calls (the one-channel density
// maps of unscale_regions) then run on the calling thread.
int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, 262144 / std::max<int64_t>(1, elements_per_task));
}

int64_t mean_box_area(const std::vector<Box>& boxes) {
  int64_t area = 0;
  for (const Box& b : boxes) area += b.h * b.w;
  return boxes.empty() ? 1 : std::max<int64_t>(1, area / static_cast<int64_t>(boxes.size()));
}

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got ", t.dim(), "-D");
}

// ---------------------------------------------------------------------- scale_regions_backward, per task
// One (image, channel) task of scale_regions_backward: zero the gradient plane, then add every box of the
// image, in index order. Per box, with Y [vh x h] and X [vw x w] the two interpolation matrices (two
// weights a row), the forward is O = Y F X^T, so
//   dL/dF = Y^T G X            (G: the valid vh x vw part of the incoming gradient), and
//   dL/dr = sum_ij G_ij (dy_i/dr * dO/dy + dx_j/dr * dO/dx), with, for A = F X^T (rows of F interpolated
//   along x) and A' = F X'^T (their x differences f[i1] - f[i0]),
//     dO/dy (i, j) = A[y.i1, j] - A[y.i0, j]  and  dO/dx (i, j) = (1 - ly) A'[y.i0, j] + ly A'[y.i1, j],
// which is bilinear_dr's sum regrouped by rows. Computed in that separable order, every inner loop runs
// along a row of vw outputs (vectorizable) except the final scatter along x, done once per source row
// instead of once per output pixel. The same sums in another order than the CUDA kernel's: the two agree
// to rounding, and this order is fixed, so the CPU result does not depend on the thread count.
template <typename T>
__attribute__((always_inline)) inline void scale_backward_task_impl(
    const T* __restrict__ fimg, const T* __restrict__ g_all, T* __restrict__ gimg, const Box* bx, const int64_t* order,
    int64_t k0, int64_t k1, const Tables<T>& tab, int64_t c, int64_t C, int64_t H, int64_t W, int64_t Sh, int64_t Sw,
    double* __restrict__ partial) {
  std::fill(gimg, gimg + H * W, T(0));
  thread_local std::vector<T> buf[3];  // per-thread scratch: A, A' and U below, reused across tasks
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t n = order[k];
    const Box& box = bx[n];
    const AxisSample<T>* ys = tab.ys.data() + tab.yoff[n];
    const AxisSample<T>* xs = tab.xs.data() + tab.xoff[n];
    const int64_t vh = tab.rows(n), vw = tab.cols(n);
    if (vh == 0 || vw == 0) {
      partial[n * C + c] = 0.0;
      continue;
    }
    const T* f = fimg + box.y0 * W + box.x0;
    T* gf = gimg + box.y0 * W + box.x0;
    const T* g = g_all + (n * C + c) * Sh * Sw;
    const int64_t ylo = ys[0].i0, rows = ys[vh - 1].i1 - ylo + 1;  // the source rows read (ys non-decreasing)
    buf[0].resize(rows * vw);
    buf[1].resize(rows * vw);
    buf[2].assign(rows * vw, T(0));
    T* __restrict__ A = buf[0].data();
    T* __restrict__ Ad = buf[1].data();
    T* __restrict__ U = buf[2].data();  // Y^T G, row by source row
    for (int64_t y = 0; y < rows; ++y) {
      const T* frow = f + (ylo + y) * W;
      for (int64_t j = 0; j < vw; ++j) {
        const AxisSample<T>& x = xs[j];
        A[y * vw + j] = (T(1) - x.l) * frow[x.i0] + x.l * frow[x.i1];
        Ad[y * vw + j] = (frow[x.i1] - frow[x.i0]) * x.dsrc_dr;
      }
    }
    double dr = 0.0;
    for (int64_t i = 0; i < vh; ++i) {
      const AxisSample<T>& y = ys[i];
      const T ly = y.l, my = T(1) - ly;
      const T* __restrict__ grow = g + i * Sw;
      const T* a0 = A + (y.i0 - ylo) * vw;
      const T* a1 = A + (y.i1 - ylo) * vw;
      const T* d0 = Ad + (y.i0 - ylo) * vw;
      const T* d1 = Ad + (y.i1 - ylo) * vw;
      T* u0 = U + (y.i0 - ylo) * vw;
      T* u1 = U + (y.i1 - ylo) * vw;
      T sy = T(0), sx = T(0);
      for (int64_t j = 0; j < vw; ++j) {
        const T gv = grow[j];
        sy += gv * (a1[j] - a0[j]);
        sx += gv * (my * d0[j] + ly * d1[j]);
      }
      if (u0 == u1) {
        for (int64_t j = 0; j < vw; ++j) u0[j] += grow[j];  // clamped row: my + ly == 1 on one row
      } else {
        for (int64_t j = 0; j < vw; ++j) {
          u0[j] += my * grow[j];
          u1[j] += ly * grow[j];
        }
      }
      dr += static_cast<double>(y.dsrc_dr * sy + sx);
    }
    for (int64_t y = 0; y < rows; ++y) {  // (Y^T G) X: the scatter along x
      const T* u = U + y * vw;
      T* grow = gf + (ylo + y) * W;
      for (int64_t j = 0; j < vw; ++j) {
        const AxisSample<T>& x = xs[j];
        grow[x.i0] += (T(1) - x.l) * u[j];
        grow[x.i1] += x.l * u[j];
      }
    }
    partial[n * C + c] = dr;
  }
}

#define CK_SBT_ARGS(T)                                                                                         \
  const T *fimg, const T *g_all, T *gimg, const Box *bx, const int64_t *order, int64_t k0, int64_t k1,           \
      const Tables<T> &tab, int64_t c, int64_t C, int64_t H, int64_t W, int64_t Sh, int64_t Sw, double *partial
CK_MULTIVERSION(, scale_backward_task, scale_backward_task_impl, CK_SBT_ARGS, fimg, g_all, gimg, bx, order, k0, k1,
                tab, c, C, H, W, Sh, Sw, partial)

// --------------------------------------------------------------------------------------- scale_regions

at::Tensor scale_regions_cpu(const at::Tensor& features_in, const at::Tensor& boxes_in, const at::Tensor& scale_in,
                             int64_t Sh, int64_t Sw) {
  check_features(features_in, "features");
  check_boxes_and_scale(boxes_in, scale_in, features_in);
  TORCH_CHECK(Sh >= 1 && Sw >= 1, "out_size must be >= 1, got (", Sh, ", ", Sw, ")");
  const at::Tensor features = features_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const std::vector<Box> bx = read_boxes(boxes, B, H, W);
  const int64_t N = static_cast<int64_t>(bx.size());
  at::Tensor out = ck::new_output({N, C, Sh, Sw}, features.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "scale_regions_cpu", [&] {
    using T = scalar_t;
    const Tables<T> tab = upsample_tables<T>(bx, scale.data_ptr<T>(), Sh, Sw);
    const T* feat = features.data_ptr<T>();
    T* o_all = out.data_ptr<T>();
    at::parallel_for(0, N * C, grain_for(Sh * Sw), [&](int64_t begin, int64_t end) {
      // Separable: each source row the box's output rows read is first interpolated along x, then each
      // output row blends two of those. `bilinear` is (1 - ly) * row(i0) + ly * row(i1) with the very same
      // row expressions, so the result has the same bits, with ~vh/rows fewer x interpolations and a
      // vectorizable y blend.
      std::vector<T> hx;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        const Box& b = bx[n];
        if (t + 1 < end) {  // the next task's crop, while this one is computed
          const Box& q = bx[(t + 1) / C];
          ck::prefetch_block(feat + ((q.b * C + (t + 1) % C) * H + q.y0) * W + q.x0, q.h, W * sizeof(T),
                             q.w * sizeof(T));
        }
        const T* f = feat + ((b.b * C + c) * H + b.y0) * W + b.x0;
        T* o = o_all + t * Sh * Sw;
        const AxisSample<T>* ys = tab.ys.data() + tab.yoff[n];
        const AxisSample<T>* xs = tab.xs.data() + tab.xoff[n];
        const int64_t vh = tab.rows(n), vw = tab.cols(n);
        if (vh > 0 && vw > 0) {
          const int64_t ylo = ys[0].i0, yhi = ys[vh - 1].i1;  // source rows ys reads (non-decreasing)
          hx.resize(static_cast<size_t>((yhi - ylo + 1) * vw));
          for (int64_t y = ylo; y <= yhi; ++y) {
            const T* frow = f + y * W;
            T* h = hx.data() + (y - ylo) * vw;
            for (int64_t j = 0; j < vw; ++j) {
              const AxisSample<T>& x = xs[j];
              h[j] = (T(1) - x.l) * frow[x.i0] + x.l * frow[x.i1];
            }
          }
        }
        for (int64_t i = 0; i < vh; ++i) {
          const T* h0 = hx.data() + (ys[i].i0 - ys[0].i0) * vw;
          const T* h1 = hx.data() + (ys[i].i1 - ys[0].i0) * vw;
          const T ly = ys[i].l, my = T(1) - ly;
          T* orow = o + i * Sw;
          for (int64_t j = 0; j < vw; ++j) orow[j] = my * h0[j] + ly * h1[j];
          std::fill(orow + vw, orow + Sw, T(0));
        }
        std::fill(o + vh * Sw, o + Sh * Sw, T(0));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scale_regions_backward_cpu(const at::Tensor& grad_in, const at::Tensor& features_in,
                                                              const at::Tensor& boxes_in, const at::Tensor& scale_in) {
  check_features(features_in, "features");
  check_features(grad_in, "grad");
  check_boxes_and_scale(boxes_in, scale_in, features_in);
  CK_CHECK_DTYPE(grad_in, features_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor features = features_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const std::vector<Box> bx = read_boxes(boxes, B, H, W);
  const int64_t N = static_cast<int64_t>(bx.size());
  TORCH_CHECK(grad.size(0) == N && grad.size(1) == C, "grad must be [", N, ", ", C, ", Sh, Sw], got ",
              grad.sizes());
  const int64_t Sh = grad.size(2), Sw = grad.size(3);
  at::Tensor grad_features = ck::new_output({B, C, H, W}, features.options());
  at::Tensor grad_scale = ck::new_output({N}, scale.options());

  // The boxes of each image in index order (a stable counting sort): the fixed order in which the task of
  // (image, channel) accumulates them.
  std::vector<int64_t> start(B + 1, 0), order(N);
  for (const Box& b : bx) ++start[b.b + 1];
  for (int64_t b = 0; b < B; ++b) start[b + 1] += start[b];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[fill[bx[n].b]++] = n;
  }

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "scale_regions_backward_cpu", [&] {
    using T = scalar_t;
    const Tables<T> tab = upsample_tables<T>(bx, scale.data_ptr<T>(), Sh, Sw);
    const T* feat = features.data_ptr<T>();
    const T* g_all = grad.data_ptr<T>();
    T* gf_all = grad_features.data_ptr<T>();
    std::vector<double> partial(N * C, 0.0);  // d loss / d r of (box, channel)
    at::parallel_for(0, B * C, grain_for(H * W), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / C, c = t % C;
        if (t + 1 < end) {  // the next plane's crops, while this one is computed
          const int64_t nb = (t + 1) / C;
          for (int64_t k = start[nb]; k < start[nb + 1]; ++k) {
            const Box& q = bx[order[k]];
            ck::prefetch_block(feat + ((t + 1) * H + q.y0) * W + q.x0, q.h, W * sizeof(T), q.w * sizeof(T));
          }
        }
        scale_backward_task(feat + t * H * W, g_all, gf_all + t * H * W, bx.data(), order.data(), start[b],
                            start[b + 1], tab, c, C, H, W, Sh, Sw, partial.data());
      }
    });
    T* gs = grad_scale.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += partial[n * C + c];
      gs[n] = static_cast<T>(s);
    }
  });
  return {grad_features, grad_scale};
}

// ------------------------------------------------------------------------------------- unscale_regions

at::Tensor unscale_regions_cpu(const at::Tensor& pred_in, const at::Tensor& boxes_in, const at::Tensor& scale_in,
                               const at::Tensor& base_in) {
  check_features(pred_in, "pred");
  check_features(base_in, "base");
  CK_CHECK_DTYPE(base_in, pred_in.scalar_type());
  CK_CHECK_DEVICE(base_in, pred_in);
  check_boxes_and_scale(boxes_in, scale_in, pred_in);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t B = base_in.size(0), C = base_in.size(1), H = base_in.size(2), W = base_in.size(3);
  const std::vector<Box> bx = read_boxes(boxes, B, H, W);
  const int64_t N = static_cast<int64_t>(bx.size());
  TORCH_CHECK(pred.size(0) == N && pred.size(1) == C, "pred must be [", N, ", ", C, ", Sh, Sw], got ",
              pred.sizes());
  const int64_t Sh = pred.size(2), Sw = pred.size(3);
  at::Tensor out = ck::new_output({B, C, H, W}, base_in.options());
  out.copy_(base_in);
  if (N * C == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "unscale_regions_cpu", [&] {
    using T = scalar_t;
    const T* sc = scale.data_ptr<T>();
    const Tables<T> tab = downsample_tables<T>(bx, sc, Sh, Sw);
    const T* p_all = pred.data_ptr<T>();
    T* o_all = out.data_ptr<T>();
    at::parallel_for(0, N * C, grain_for(mean_box_area(bx)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        const Box& box = bx[n];
        T* o = o_all + ((box.b * C + c) * H + box.y0) * W + box.x0;
        if (tab.rows(n) == 0) {
          for (int64_t i = 0; i < box.h; ++i) std::fill(o + i * W, o + i * W + box.w, T(0));
          continue;
        }
        const T r2 = sc[n] * sc[n];
        const T* p = p_all + t * Sh * Sw;
        const AxisSample<T>* ys = tab.ys.data() + tab.yoff[n];
        const AxisSample<T>* xs = tab.xs.data() + tab.xoff[n];
        for (int64_t i = 0; i < box.h; ++i) {
          const T* p0 = p + ys[i].i0 * Sw;
          const T* p1 = p + ys[i].i1 * Sw;
          const T ly = ys[i].l;
          T* orow = o + i * W;
          for (int64_t j = 0; j < box.w; ++j) {
            const AxisSample<T>& x = xs[j];
            orow[j] = r2 * bilinear(p0[x.i0], p0[x.i1], p1[x.i0], p1[x.i1], ly, x.l);
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unscale_regions_backward_cpu(const at::Tensor& grad_in,
                                                                            const at::Tensor& pred_in,
                                                                            const at::Tensor& boxes_in,
                                                                            const at::Tensor& scale_in) {
  check_features(pred_in, "pred");
  check_features(grad_in, "grad");
  CK_CHECK_DTYPE(grad_in, pred_in.scalar_type());
  check_boxes_and_scale(boxes_in, scale_in, pred_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t B = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  const std::vector<Box> bx = read_boxes(boxes, B, H, W);
  const int64_t N = static_cast<int64_t>(bx.size());
  TORCH_CHECK(pred.size(0) == N && pred.size(1) == C, "pred must be [", N, ", ", C, ", Sh, Sw], got ",
              pred.sizes());
  const int64_t Sh = pred.size(2), Sw = pred.size(3);
  at::Tensor grad_pred = ck::new_output({N, C, Sh, Sw}, pred.options());
  at::Tensor grad_scale = ck::new_output({N}, scale.options());
  at::Tensor grad_base = ck::new_output({B, C, H, W}, grad.options());
  grad_base.copy_(grad);

  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "unscale_regions_backward_cpu", [&] {
    using T = scalar_t;
    const T* sc = scale.data_ptr<T>();
    const Tables<T> tab = downsample_tables<T>(bx, sc, Sh, Sw);
    const T* p_all = pred.data_ptr<T>();
    const T* g_all = grad.data_ptr<T>();
    T* gp_all = grad_pred.data_ptr<T>();
    T* gb_all = grad_base.data_ptr<T>();
    std::vector<double> partial(N * C, 0.0);
    at::parallel_for(0, N * C, grain_for(mean_box_area(bx) + Sh * Sw), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        const Box& box = bx[n];
        const int64_t off = ((box.b * C + c) * H + box.y0) * W + box.x0;
        const T* g = g_all + off;
        T* gb = gb_all + off;
        T* gp = gp_all + t * Sh * Sw;
        std::fill(gp, gp + Sh * Sw, T(0));
        if (tab.rows(n) > 0) {
          const T r = sc[n];
          const T r2 = r * r;
          const T* p = p_all + t * Sh * Sw;
          const AxisSample<T>* ys = tab.ys.data() + tab.yoff[n];
          const AxisSample<T>* xs = tab.xs.data() + tab.xoff[n];
          double dr = 0.0;
          for (int64_t i = 0; i < box.h; ++i) {
            const AxisSample<T>& y = ys[i];
            const T* p0 = p + y.i0 * Sw;
            const T* p1 = p + y.i1 * Sw;
            T* q0 = gp + y.i0 * Sw;
            T* q1 = gp + y.i1 * Sw;
            const T* grow = g + i * W;
            T row_dr = T(0);
            for (int64_t j = 0; j < box.w; ++j) {
              const AxisSample<T>& x = xs[j];
              const T gv = grow[j];
              T w[4];
              bilinear_weights(y.l, x.l, w);
              const T gr = gv * r2;
              q0[x.i0] += gr * w[0];
              q0[x.i1] += gr * w[1];
              q1[x.i0] += gr * w[2];
              q1[x.i1] += gr * w[3];
              const T v00 = p0[x.i0], v01 = p0[x.i1], v10 = p1[x.i0], v11 = p1[x.i1];
              // d(r^2 S)/dr = 2 r S + r^2 dS/dr
              row_dr += gv * (T(2) * r * bilinear(v00, v01, v10, v11, y.l, x.l) +
                              r2 * bilinear_dr(v00, v01, v10, v11, y.l, x.l, y.dsrc_dr, x.dsrc_dr));
            }
            dr += static_cast<double>(row_dr);
          }
          partial[t] = dr;
        }
        // The box's output does not depend on base.
        for (int64_t i = 0; i < box.h; ++i) std::fill(gb + i * W, gb + i * W + box.w, T(0));
      }
    });
    T* gs = grad_scale.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += partial[n * C + c];
      gs[n] = static_cast<T>(s);
    }
  });
  return {grad_pred, grad_scale, grad_base};
}

}  // namespace
}  // namespace regions
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CPU, m) {
  m.impl("scale_regions", &ck::regions::scale_regions_cpu);
  m.impl("scale_regions_backward", &ck::regions::scale_regions_backward_cpu);
  m.impl("unscale_regions", &ck::regions::unscale_regions_cpu);
  m.impl("unscale_regions_backward", &ck::regions::unscale_regions_backward_cpu);
}
