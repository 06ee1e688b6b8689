// CPU kernels of crowdkernels::local_counts and its backward. One task per (image, window row) in the
// forward and per (image, pixel row) in the backward: every output element is written by exactly one
// task in a fixed order, so the result has the same bits whatever the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <vector>
#ifdef __SSE2__
#include <xmmintrin.h>
#endif
#include <vector>

#include "common/common.h"
#include "local_count/local_count.h"

namespace ck {
namespace local_count {
namespace {

void check_inputs(const at::Tensor& pred, const at::Tensor& target, int64_t window_h, int64_t window_w) {
  CK_CHECK_DIM(pred, 3);
  TORCH_CHECK(pred.sizes() == target.sizes(), "target must have the shape of pred ", pred.sizes(), ", got ",
              target.sizes());
  CK_CHECK_DTYPE(target, pred.scalar_type());
  CK_CHECK_DEVICE(target, pred);
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "pred must be floating point, got ", pred.scalar_type());
  TORCH_CHECK(window_h >= 1 && window_h <= pred.size(1), "window_h must be in [1, ", pred.size(1), "], got ",
              window_h);
  TORCH_CHECK(window_w >= 1 && window_w <= pred.size(2), "window_w must be in [1, ", pred.size(2), "], got ",
              window_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_counts_cpu(const at::Tensor& pred_in,
                                                                const at::Tensor& target_in, int64_t window_h,
                                                                int64_t window_w, bool keep_partial) {
  check_inputs(pred_in, target_in, window_h, window_w);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = pred.size(0), H = pred.size(1), W = pred.size(2);
  const int64_t nh = num_windows(H, window_h, keep_partial);
  const int64_t nw = num_windows(W, window_w, keep_partial);
  const int64_t R = nh * nw;
  const int64_t full_w = std::min(nw, W / window_w);  // windows of window_w pixels (not cut by the edge)
  constexpr int kBlock = 8;
  at::Tensor pred_counts = new_output({B, R}, pred.options());
  at::Tensor target_counts = new_output({B, R}, pred.options());
  at::Tensor sq_error = new_output({B, R}, pred.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "local_counts_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* pc = pred_counts.data_ptr<scalar_t>();
    scalar_t* tc = target_counts.data_ptr<scalar_t>();
    scalar_t* se = sq_error.data_ptr<scalar_t>();
    at::parallel_for(0, B * nh, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(3 * nw);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nh, wr = task % nh;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t y0 = window_begin(wr, window_h), rows = window_length(wr, window_h, H);
        for (int64_t y = y0; y < y0 + rows; ++y) {
          const scalar_t* prow = p + (b * H + y) * W;
          const scalar_t* trow = t + (b * H + y) * W;
          // Full-width windows, kBlock at a time: each window still sums its pixels left to right from 0
          // (the same bits as one window at a time), but the kBlock independent sums hide the add latency.
          int64_t wc = 0;
#ifdef __SSE2__
          if constexpr (std::is_same_v<scalar_t, float>) {
            // Four windows per SSE vector, one lane each: a 4x4 transpose turns four loads of 4 pixels of
            // 4 windows into 4 vectors of pixel k, k+1, ... of each window, added in that order.
            if (window_w % 4 == 0) {
              for (; wc + 4 <= full_w; wc += 4) {
                __m128 sp = _mm_setzero_ps(), st = _mm_setzero_ps(), ss = _mm_setzero_ps();
                const float* pw = reinterpret_cast<const float*>(prow + window_begin(wc, window_w));
                const float* tw = reinterpret_cast<const float*>(trow + window_begin(wc, window_w));
                for (int64_t k = 0; k < window_w; k += 4) {
                  __m128 p0 = _mm_loadu_ps(pw + k), p1 = _mm_loadu_ps(pw + window_w + k),
                         p2 = _mm_loadu_ps(pw + 2 * window_w + k), p3 = _mm_loadu_ps(pw + 3 * window_w + k);
                  __m128 t0 = _mm_loadu_ps(tw + k), t1 = _mm_loadu_ps(tw + window_w + k),
                         t2 = _mm_loadu_ps(tw + 2 * window_w + k), t3 = _mm_loadu_ps(tw + 3 * window_w + k);
                  _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
                  _MM_TRANSPOSE4_PS(t0, t1, t2, t3);
                  const __m128 pv[4] = {p0, p1, p2, p3}, tv[4] = {t0, t1, t2, t3};
                  for (int j = 0; j < 4; ++j) {
                    sp = _mm_add_ps(sp, pv[j]);
                    st = _mm_add_ps(st, tv[j]);
                    const __m128 d = _mm_sub_ps(pv[j], tv[j]);
                    ss = _mm_add_ps(ss, _mm_mul_ps(d, d));
                  }
                }
                float a[4], b[4], c[4];
                _mm_storeu_ps(a, sp);
                _mm_storeu_ps(b, st);
                _mm_storeu_ps(c, ss);
                for (int u = 0; u < 4; ++u) {
                  acc[3 * (wc + u)] += a[u];
                  acc[3 * (wc + u) + 1] += b[u];
                  acc[3 * (wc + u) + 2] += c[u];
                }
              }
            }
          }
#endif
          for (; wc + kBlock <= full_w; wc += kBlock) {
            acc_t sp[kBlock] = {}, st[kBlock] = {}, ss[kBlock] = {};
            const scalar_t* pw = prow + window_begin(wc, window_w);
            const scalar_t* tw = trow + window_begin(wc, window_w);
            for (int64_t k = 0; k < window_w; ++k) {
              for (int u = 0; u < kBlock; ++u) {
                const acc_t pv = static_cast<acc_t>(pw[u * window_w + k]),
                            tv = static_cast<acc_t>(tw[u * window_w + k]);
                sp[u] += pv;
                st[u] += tv;
                ss[u] += squared_error(pv, tv);
              }
            }
            for (int u = 0; u < kBlock; ++u) {
              acc[3 * (wc + u)] += sp[u];
              acc[3 * (wc + u) + 1] += st[u];
              acc[3 * (wc + u) + 2] += ss[u];
            }
          }
          for (; wc < nw; ++wc) {
            const int64_t x0 = window_begin(wc, window_w), x1 = x0 + window_length(wc, window_w, W);
            acc_t sp = 0, st = 0, ss = 0;
            for (int64_t x = x0; x < x1; ++x) {
              const acc_t pv = static_cast<acc_t>(prow[x]), tv = static_cast<acc_t>(trow[x]);
              sp += pv;
              st += tv;
              ss += squared_error(pv, tv);
            }
            acc[3 * wc] += sp;
            acc[3 * wc + 1] += st;
            acc[3 * wc + 2] += ss;
          }
        }
        const int64_t out = b * R + wr * nw;
        for (int64_t wc = 0; wc < nw; ++wc) {
          pc[out + wc] = static_cast<scalar_t>(acc[3 * wc]);
          tc[out + wc] = static_cast<scalar_t>(acc[3 * wc + 1]);
          se[out + wc] = static_cast<scalar_t>(acc[3 * wc + 2]);
        }
      }
    });
  });
  return {pred_counts, target_counts, sq_error};
}

std::tuple<at::Tensor, at::Tensor> local_counts_backward_cpu(const std::optional<at::Tensor>& grad_pred_counts,
                                                             const std::optional<at::Tensor>& grad_target_counts,
                                                             const std::optional<at::Tensor>& grad_sq_error,
                                                             const at::Tensor& pred_in, const at::Tensor& target_in,
                                                             int64_t window_h, int64_t window_w, bool keep_partial,
                                                             std::array<bool, 2> output_mask) {
  check_inputs(pred_in, target_in, window_h, window_w);
  const int64_t B = pred_in.size(0), H = pred_in.size(1), W = pred_in.size(2);
  const int64_t nh = num_windows(H, window_h, keep_partial);
  const int64_t nw = num_windows(W, window_w, keep_partial);
  const int64_t R = nh * nw;
  auto grad_or_undefined = [&](const std::optional<at::Tensor>& g) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->dim() == 2 && g->size(0) == B && g->size(1) == R, "the gradients of the counts must be [", B,
                ", ", R, "], got ", g->sizes());
    CK_CHECK_DTYPE(*g, pred_in.scalar_type());
    CK_CHECK_DEVICE(*g, pred_in);
    return g->contiguous();
  };
  const at::Tensor gpc_t = grad_or_undefined(grad_pred_counts);
  const at::Tensor gtc_t = grad_or_undefined(grad_target_counts);
  const at::Tensor gse_t = grad_or_undefined(grad_sq_error);
  const bool want_pred = output_mask[0], want_target = output_mask[1];
  // pred and target are read only when the squared error has a gradient.
  const at::Tensor pred = gse_t.defined() ? pred_in.contiguous() : pred_in;
  const at::Tensor target = gse_t.defined() ? target_in.contiguous() : target_in;
  at::Tensor grad_pred = new_output({want_pred ? B : 0, H, W}, pred.options());
  at::Tensor grad_target = new_output({want_target ? B : 0, H, W}, pred.options());
  if (!want_pred && !want_target) return {grad_pred, grad_target};
  const int64_t covered_h = covered_extent(H, window_h, nh);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "local_counts_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool has_se = gse_t.defined();
    const scalar_t* p = has_se ? pred.data_ptr<scalar_t>() : nullptr;
    const scalar_t* t = has_se ? target.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gpc = gpc_t.defined() ? gpc_t.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gtc = gtc_t.defined() ? gtc_t.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gse = has_se ? gse_t.data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = want_pred ? grad_pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = want_target ? grad_target.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        scalar_t* gprow = gp ? gp + row * W : nullptr;
        scalar_t* gtrow = gt ? gt + row * W : nullptr;
        // Without a squared-error gradient the rows of one window row are all alike: copy the previous
        // one (this task wrote it) instead of ~W / window_w short fills per row. Same values, same bits.
        if (!gse && row > begin && y % window_h != 0 && y < covered_h) {
          if (gprow) std::copy(gprow - W, gprow, gprow);
          if (gtrow) std::copy(gtrow - W, gtrow, gtrow);
          continue;
        }
        int64_t x = 0;
        if (y < covered_h) {
          const int64_t r0 = b * R + (y / window_h) * nw;
          for (int64_t wc = 0; wc < nw; ++wc) {
            const acc_t g_pc = gpc ? static_cast<acc_t>(gpc[r0 + wc]) : acc_t(0);
            const acc_t g_tc = gtc ? static_cast<acc_t>(gtc[r0 + wc]) : acc_t(0);
            const int64_t x1 = window_begin(wc, window_w) + window_length(wc, window_w, W);
            if (gse) {
              const acc_t g_se = static_cast<acc_t>(gse[r0 + wc]);
              const scalar_t* prow = p + row * W;
              const scalar_t* trow = t + row * W;
              for (; x < x1; ++x) {
                acc_t g_p, g_t;
                pixel_gradients(static_cast<acc_t>(prow[x]), static_cast<acc_t>(trow[x]), g_pc, g_tc, g_se, &g_p,
                                &g_t);
                if (gprow) gprow[x] = static_cast<scalar_t>(g_p);
                if (gtrow) gtrow[x] = static_cast<scalar_t>(g_t);
              }
            } else {
              // No squared-error gradient: every pixel of the window gets its window's count gradient.
              if (gprow) std::fill(gprow + x, gprow + x1, static_cast<scalar_t>(g_pc));
              if (gtrow) std::fill(gtrow + x, gtrow + x1, static_cast<scalar_t>(g_tc));
              x = x1;
            }
          }
        }
        // Pixels outside every counted window (edge="drop") do not reach the loss.
        if (gprow) std::fill(gprow + x, gprow + W, scalar_t(0));
        if (gtrow) std::fill(gtrow + x, gtrow + W, scalar_t(0));
      }
    });
  });
  return {grad_pred, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(crowdkernels, CPU, m) {
  m.impl("local_counts", &local_counts_cpu);
  m.impl("local_counts_backward", &local_counts_backward_cpu);
}

}  // namespace local_count
}  // namespace ck
