// CPU kernels of the density op: kNN sigmas on per-image grids, and Gaussian splatting.
// Parallel with at::parallel_for (OpenMP underneath) and deterministic: every output element is owned by
// one task and summed in point order, so the bits do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "common/output_pool.h"
#include "common/parallel.h"
#include "common/simd.h"
#include "density/density.h"

namespace ck {
namespace density {
namespace {

// B images' points, as every CPU entry point reads them: float64 coordinates (points[T, 2]) and checked
// offsets[B + 1] (image b owns points offsets[b] .. offsets[b + 1]).
struct PointSets {
  at::Tensor points, offsets;  // contiguous; the tensors own what pts and off point into
  int64_t T, B;
  const double* pts;
  const int64_t* off;
};

PointSets read_point_sets(const at::Tensor& points_in, const at::Tensor& offsets_in) {
  PointSets ps;
  ps.points = points_in.to(at::kDouble).contiguous();
  ps.offsets = offsets_in.contiguous();
  ps.T = ps.points.size(0);
  ps.B = ps.offsets.numel() - 1;
  ps.pts = ps.points.data_ptr<double>();
  ps.off = ps.offsets.data_ptr<int64_t>();
  TORCH_CHECK(ps.off[0] == 0 && ps.off[ps.B] == ps.T, "offsets must run from 0 to the number of points (", ps.T, ")");
  for (int64_t b = 0; b < ps.B; ++b) TORCH_CHECK(ps.off[b] <= ps.off[b + 1], "offsets must be non-decreasing");
  return ps;
}

}  // namespace

at::Tensor knn_sigma_cpu(const at::Tensor& points_in, const at::Tensor& offsets_in, int64_t k, double beta,
                         double lone) {
  check_knn_args(points_in, offsets_in, k);
  const PointSets ps = read_point_sets(points_in, offsets_in);
  const int64_t T = ps.T, B = ps.B;
  const double* pts = ps.pts;
  const int64_t* off = ps.off;

  at::Tensor out = ck::new_output({T}, ps.points.options());
  double* sig = out.data_ptr<double>();

  // 1. one grid per image over its bounding box
  std::vector<Grid> grids(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double xmin = INFINITY, ymin = INFINITY, xmax = -INFINITY, ymax = -INFINITY;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        xmin = std::min(xmin, pts[2 * i]);
        xmax = std::max(xmax, pts[2 * i]);
        ymin = std::min(ymin, pts[2 * i + 1]);
        ymax = std::max(ymax, pts[2 * i + 1]);
      }
      if (off[b + 1] == off[b]) xmin = ymin = xmax = ymax = 0.0;
      grids[b] = make_grid(xmin, ymin, xmax, ymax, off[b + 1] - off[b], 2 * off[b] + 4 * b);
    }
  });

  // 2. counting sort of the points by cell (sequential fill: the order inside a cell is the point order)
  const int64_t total_cells = 2 * T + 4 * B;
  std::vector<int64_t> cell(T), cell_start(total_cells + 1, 0), order(T);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = off[b]; i < off[b + 1]; ++i) cell[i] = cell_of(grids[b], pts[2 * i], pts[2 * i + 1]);
  });
  for (int64_t i = 0; i < T; ++i) ++cell_start[cell[i] + 1];
  for (int64_t c = 0; c < total_cells; ++c) cell_start[c + 1] += cell_start[c];
  // the points' coordinates in cell order, so a query reads the cells of a grid row as one run
  std::vector<double> sx(T), sy(T);
  {
    std::vector<int64_t> cursor(cell_start.begin(), cell_start.end() - 1);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t s = cursor[cell[i]]++;
      order[s] = i;
      sx[s] = pts[2 * i];
      sy[s] = pts[2 * i + 1];
    }
  }

  // 3. one exact query per point, in cell order (neighbouring queries read the same cells)
  at::parallel_for(0, T, 256, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t i = order[s];
      const int64_t b = image_of(off, B, i);
      const int64_t K = std::min<int64_t>(k, off[b + 1] - off[b] - 1);
      sig[i] = K < 1 ? lone : knn_sigma_sorted(s, sx.data(), sy.data(), grids[b], cell_start.data(), (int)K, beta);
    }
  });
  return out;
}

// Sorts (key, row) pairs by key (keys >= 0), stably: LSD radix sort, 11 bits a pass (two passes for a
// 2-megapixel image). A comparison sort spent ~30 us an image on this, as much as the kNN.
static void radix_sort_by_key(std::vector<std::pair<int64_t, int64_t>>& v, std::vector<std::pair<int64_t, int64_t>>& tmp) {
  int64_t max_key = 0;
  for (const auto& p : v) max_key = std::max(max_key, p.first);
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  tmp.resize(v.size());
  std::vector<int64_t> count(kBuckets + 1);
  for (int shift = 0; shift < 63 && (max_key >> shift) > 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (const auto& p : v) ++count[((p.first >> shift) & (kBuckets - 1)) + 1];
    for (int64_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (const auto& p : v) tmp[count[(p.first >> shift) & (kBuckets - 1)]++] = p;
    v.swap(tmp);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> density_prepare_cpu(const at::Tensor& points_in,
                                                                    const at::Tensor& offsets_in, int64_t height,
                                                                    int64_t width, int64_t style) {
  check_prepare_args(points_in, offsets_in, height, width, style);
  const PointSets ps = read_point_sets(points_in, offsets_in);
  const int64_t B = ps.B;
  const double* pts = ps.pts;
  const int64_t* off = ps.off;

  // per image, the kept input rows in output order
  std::vector<std::vector<int64_t>> kept(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<int64_t, int64_t>> keyed, scratch;  // (pixel key, input row)
    for (int64_t b = b0; b < b1; ++b) {
      std::vector<int64_t>& rows = kept[b];
      rows.reserve(off[b + 1] - off[b]);
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        const double x = pts[2 * i], y = pts[2 * i + 1];
        if (style == kMatlab || (x >= 0 && x < (double)width && y >= 0 && y < (double)height)) rows.push_back(i);
      }
      if (style != kCsrnet) continue;
      keyed.clear();
      for (int64_t i : rows)
        keyed.emplace_back((int64_t)floor(pts[2 * i + 1]) * width + (int64_t)floor(pts[2 * i]), i);
      radix_sort_by_key(keyed, scratch);  // by pixel, stable: of the points on one pixel, the first comes first
      rows.clear();
      for (size_t j = 0; j < keyed.size(); ++j)
        if (j == 0 || keyed[j].first != keyed[j - 1].first) rows.push_back(keyed[j].second);
    }
  });

  at::Tensor out_off = ck::new_output({B + 1}, ps.offsets.options());
  int64_t* o = out_off.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t b = 0; b < B; ++b) o[b + 1] = o[b] + (int64_t)kept[b].size();
  const int64_t Tk = o[B];
  at::Tensor index = ck::new_output({Tk}, ps.offsets.options());
  at::Tensor out = ck::new_output({Tk, 2}, ps.points.options());
  int64_t* idx = index.data_ptr<int64_t>();
  double* q = out.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    for (size_t j = 0; j < kept[b].size(); ++j) {
      const int64_t i = kept[b][j], r = o[b] + (int64_t)j;
      idx[r] = i;
      q[2 * r] = style == kCsrnet ? floor(pts[2 * i]) : pts[2 * i];
      q[2 * r + 1] = style == kCsrnet ? floor(pts[2 * i + 1]) : pts[2 * i + 1];
    }
  }
  return std::make_tuple(out.to(points_in.scalar_type()), out_off, index);
}

namespace {

// Accumulates one band of output rows, [row0, row1) at full resolution, from the points listed for it,
// in list order. This is the hot loop. It is compiled twice by function multiversioning (baseline x86-64,
// and AVX2+FMA; see CK_TARGET_AVX2), so the wheel stays portable like torch's own, and the row loop
// inlines inside each version instead of paying an indirect call per row.
// 32 bytes of float32 or float64 lanes: one AVX2 register, two SSE2 ones in the baseline build.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 4;
};

template <typename acc_t>
__attribute__((always_inline)) inline void band_impl(const Window* __restrict__ win, const acc_t* __restrict__ wy,
                                                     const int64_t* __restrict__ wy_off, const acc_t* __restrict__ wx,
                                                     const int64_t* __restrict__ wx_off, const char* thresholded,
                                                     const int64_t* list, int64_t nlist, int64_t row0, int64_t row1,
                                                     int64_t orow0, int64_t stride, int64_t Ws, acc_t* __restrict__ acc) {
  for (int64_t s = 0; s < nlist; ++s) {
    const int64_t i = list[s];
    const Window& w = win[i];
    const int64_t ra = std::max(w.y0, row0), rb = std::min(w.y1, row1 - 1);
    if (thresholded[i]) {
      // rare (matlab windows wide against sigma): fspecial's threshold, exactly, in float64
      for (int64_t r = ra; r <= rb; ++r) {
        acc_t* __restrict__ dst = acc + (r / stride - orow0) * Ws;
        const double g_r = gauss((double)r - w.cy, w.a);
        for (int64_t c = w.x0; c <= w.x1; ++c)
          dst[c / stride] += static_cast<acc_t>(pixel_weight(w, g_r, gauss((double)c - w.cx, w.a)));
      }
      continue;
    }
    constexpr int64_t L = Vec<acc_t>::lanes;
    const int64_t x0a = w.x0 - w.x0 % L;  // the window's first column, rounded down to a whole vector
    const acc_t* gy = wy + wy_off[i] - w.y0;
    const acc_t* gx = wx + wx_off[i] - x0a;  // x-weights from x0a (zeros before x0), see splat_cpu_impl
    if (stride == 1) {
      // The common case, kept free of integer divisions (one per row cost as much as the row's FMAs), in
      // aligned whole 32-byte vectors: each window's x-weights start at x0a and are zero-padded to whole
      // vectors, and the band rows (acc, Ws apart) are vector-aligned and a whole number of vectors wide
      // (see splat_cpu_impl), so no access splits a cache line and no row needs a scalar tail. Adding 0 * f
      // changes no element: the band starts at +0 and the weights are finite.
      using V = typename Vec<acc_t>::type;
      const int64_t nv = (w.x1 - x0a + L) / L;
      const acc_t* __restrict__ src = gx + x0a;
      acc_t* __restrict__ dst = acc + (ra - orow0) * Ws + x0a;
      for (int64_t r = ra; r <= rb; ++r, dst += Ws) {
        const acc_t f = gy[r];
        for (int64_t v = 0; v < nv; ++v) {
          V d, x;
          std::memcpy(&d, dst + v * L, sizeof(V));
          std::memcpy(&x, src + v * L, sizeof(V));
          d += f * x;
          std::memcpy(dst + v * L, &d, sizeof(V));
        }
      }
    } else {
      for (int64_t r = ra; r <= rb; ++r) {
        acc_t* __restrict__ dst = acc + (r / stride - orow0) * Ws;
        const acc_t f = gy[r];
        for (int64_t c = w.x0; c <= w.x1; ++c) dst[c / stride] += f * gx[c];
      }
    }
  }
}

#define CK_BAND_ARGS(T)                                                                                          \
  const Window *win, const T *wy, const int64_t *wy_off, const T *wx, const int64_t *wx_off, const char *thr,  \
      const int64_t *list, int64_t nlist, int64_t row0, int64_t row1, int64_t orow0, int64_t stride, int64_t Ws, \
      T *acc
CK_MULTIVERSION(, accumulate_band, band_impl, CK_BAND_ARGS, win, wy, wy_off, wx, wx_off, thr, list, nlist, row0, row1,
                orow0, stride, Ws, acc)

// Accumulates in the output's precision: float32 maps in float32 (twice the SIMD lanes, and what the
// classic script does), float64 maps in float64. Window normalization is always computed in float64.
template <typename scalar_t>
void splat_cpu_impl(const double* pts, const int64_t* off, const double* sigma, int64_t B, int64_t T, int64_t H,
                    int64_t W, int64_t style, double truncate, int64_t kernel_size, int64_t stride, scalar_t* out) {
  const int64_t Hs = (H + stride - 1) / stride, Ws = (W + stride - 1) / stride;

  // 1. each point's window and its two 1-D weight vectors (scale folded into the row weights)
  std::vector<Window> win(T);
  at::parallel_for(0, T, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      win[i] = make_window(style, pts[2 * i], pts[2 * i + 1], sigma[i], H, W, truncate, kernel_size,
                           /*defer_norm=*/true);
  });
  std::vector<int64_t> wy_off(T + 1, 0), wx_off(T + 1, 0);
  for (int64_t i = 0; i < T; ++i) {
    wy_off[i + 1] = wy_off[i] + std::max<int64_t>(win[i].y1 - win[i].y0 + 1, 0);
    // from x0 rounded down to a whole vector, zero-padded to whole vectors (see band_impl)
    const int64_t L = Vec<scalar_t>::lanes;
    const int64_t nx = win[i].x1 >= win[i].x0 ? win[i].x1 - (win[i].x0 - win[i].x0 % L) + 1 : 0;
    wx_off[i + 1] = wx_off[i] + (nx + L - 1) / L * L;
  }
  using acc_t = scalar_t;
  std::vector<acc_t> wy(wy_off[T]), wx(wx_off[T]);
  std::vector<char> thresholded(T, 0);
  // Chunks of 64 points handed out dynamically: a window's cost grows with its sigma, and points come
  // sorted by row, so the near (bottom, large-sigma) half of a perspective image would keep one thread
  // busy long after the other finished under a static split.
  constexpr int64_t kChunk = 64;
  ck::parallel_dynamic(T > 256 ? (T + kChunk - 1) / kChunk : (T > 0 ? 1 : 0), [&](int64_t chunk) {
    thread_local std::vector<double> gyd, gxd, table, prefix;
    const int64_t i0 = T > 256 ? chunk * kChunk : 0, i1 = T > 256 ? std::min(i0 + kChunk, T) : T;
    for (int64_t i = i0; i < i1; ++i) {
      Window& w = win[i];
      if (w.y0 > w.y1 || w.x0 > w.x1) continue;  // an out-of-image point: no weights
      acc_t* gy = wy.data() + wy_off[i];
      acc_t* gx = wx.data() + wx_off[i] + w.x0 % Vec<acc_t>::lanes;  // gx[0] is column x0
      if (style != kMatlab) {
        // Integral centres: both axes read one table g(d) = exp(-a d^2), d = 0..R, one recurrence per
        // point instead of one per axis (the chained multiplies of gauss_run bound this phase).
        const double rr = window_radius(sigma[i], truncate);
        const int64_t R = (int64_t)std::fmin(rr, (double)(H + W));  // as make_window clips the window
        table.resize(R + 1);
        const double tsum = gauss_run(0.0, 0, R, w.a, table.data());
        const int64_t cy = (int64_t)w.cy, cx = (int64_t)w.cx;
        if (style == kExact) {
          // renormalized over the in-image part of the window: the sum of table[|i - c|] over [lo, hi] is
          // prefix[c - lo] + prefix[hi - c] - table[0], from one prefix sum instead of one per axis
          prefix.resize(R + 1);
          prefix[0] = table[0];
          for (int64_t d = 1; d <= R; ++d) prefix[d] = prefix[d - 1] + table[d];
          const double sy = prefix[cy - w.y0] + prefix[w.y1 - cy] - table[0];
          const double sx = prefix[cx - w.x0] + prefix[w.x1 - cx] - table[0];
          w.scale = 1.0 / (sy * sx);
        } else {  // scipy normalizes over the full [-R, R], so mass past the border is lost
          const double n = (rr <= (double)(H + W) ? 2.0 * tsum : 2.0 * gauss_run(0.0, 0, (int64_t)rr, w.a, nullptr)) - 1.0;
          w.scale = 1.0 / (n * n);
        }
        // each axis: the centre and what lies right of it, then the mirror image on its left (two
        // contiguous loops that vectorize, where table[|i - c|] would gather)
        const double sc = w.scale;
        acc_t* gyc = gy + (cy - w.y0);
        acc_t* gxc = gx + (cx - w.x0);
        for (int64_t d = 0; d <= w.y1 - cy; ++d) gyc[d] = static_cast<acc_t>(sc * table[d]);
        for (int64_t d = 1; d <= cy - w.y0; ++d) gyc[-d] = static_cast<acc_t>(sc * table[d]);
        for (int64_t d = 0; d <= w.x1 - cx; ++d) gxc[d] = static_cast<acc_t>(table[d]);
        for (int64_t d = 1; d <= cx - w.x0; ++d) gxc[-d] = static_cast<acc_t>(table[d]);
        continue;
      }
      // matlab: centres on half pixels for even (border-clipped) windows, and fspecial's threshold
      gyd.resize(w.y1 - w.y0 + 1);
      gxd.resize(w.x1 - w.x0 + 1);
      gauss_run(w.cy, w.y0, w.y1, w.a, gyd.data());
      gauss_run(w.cx, w.x0, w.x1, w.a, gxd.data());
      double gy_min = INFINITY, gx_min = INFINITY;
      for (size_t r = 0; r < gyd.size(); ++r) {
        gy[r] = static_cast<acc_t>(w.scale * gyd[r]);
        gy_min = std::min(gy_min, gyd[r]);
      }
      for (size_t c = 0; c < gxd.size(); ++c) {
        gx[c] = static_cast<acc_t>(gxd[c]);
        gx_min = std::min(gx_min, gxd[c]);
      }
      thresholded[i] = (w.thresh > 0 && gy_min * gx_min < w.thresh) ? 1 : 0;
    }
  });

  // 2. bands of output rows, each listing (in point order) the points whose window reaches it
  constexpr int64_t kBandRows = 8;
  const int64_t bands = (Hs + kBandRows - 1) / kBandRows;
  std::vector<int64_t> band_start(B * bands + 1, 0);
  auto band_range = [&](int64_t i, int64_t& first, int64_t& last) {
    first = (win[i].y0 / stride) / kBandRows;
    last = (win[i].y1 / stride) / kBandRows;
  };
  std::vector<int64_t> img(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = off[b]; i < off[b + 1]; ++i) img[i] = b;
  for (int64_t i = 0; i < T; ++i) {
    if (win[i].y0 > win[i].y1 || win[i].x0 > win[i].x1) continue;
    int64_t f, l;
    band_range(i, f, l);
    for (int64_t band = f; band <= l; ++band) ++band_start[img[i] * bands + band + 1];
  }
  for (int64_t j = 0; j < B * bands; ++j) band_start[j + 1] += band_start[j];
  std::vector<int64_t> band_points(band_start[B * bands]);
  {
    std::vector<int64_t> cursor(band_start.begin(), band_start.end() - 1);
    for (int64_t i = 0; i < T; ++i) {
      if (win[i].y0 > win[i].y1 || win[i].x0 > win[i].x1) continue;
      int64_t f, l;
      band_range(i, f, l);
      for (int64_t band = f; band <= l; ++band) band_points[cursor[img[i] * bands + band]++] = i;
    }
  }

  // 3. every band accumulated by one task, in the output's precision, in rows that band_impl can cover with
  // aligned whole vectors: the output's own rows when they are (a width that is a whole number of vectors:
  // zeroed in place, where the fill's fast-string stores skip reading the lines they overwrite), else a
  // zeroed per-thread scratch band of 64-byte aligned rows WsP >= Ws + one vector apart, copied out. Every
  // output element is written; the scratch stays in L1/L2. Both give the same bits.
  constexpr int64_t L = Vec<scalar_t>::lanes, kAlign = 64 / sizeof(scalar_t);
  const bool in_place = Ws % L == 0 && reinterpret_cast<uintptr_t>(out) % (L * sizeof(scalar_t)) == 0;
  const int64_t WsP = in_place ? Ws : (Ws + L + kAlign - 1) / kAlign * kAlign;
  ck::parallel_dynamic(B * bands, [&](int64_t t) {
    const int64_t b = t / bands, band = t % bands;
    const int64_t orow0 = band * kBandRows, orow1 = std::min(orow0 + kBandRows, Hs);  // output rows
    const int64_t row0 = orow0 * stride, row1 = std::min(orow1 * stride, H);            // full-res rows
    scalar_t* o = out + (b * Hs + orow0) * Ws;
    scalar_t* acc = o;
    if (!in_place) {
      thread_local std::vector<scalar_t> scratch;
      if (scratch.size() < (size_t)(kBandRows * WsP + kAlign)) scratch.resize(kBandRows * WsP + kAlign);
      acc = scratch.data();
      acc += (kAlign - (reinterpret_cast<uintptr_t>(acc) / sizeof(scalar_t)) % kAlign) % kAlign;
    }
    std::fill(acc, acc + (orow1 - orow0) * WsP, scalar_t(0));
    accumulate_band(win.data(), wy.data(), wy_off.data(), wx.data(), wx_off.data(), thresholded.data(),
                    band_points.data() + band_start[t], band_start[t + 1] - band_start[t], row0, row1, orow0,
                    stride, WsP, acc);
    if (!in_place)
      for (int64_t r = 0; r < orow1 - orow0; ++r) std::memcpy(o + r * Ws, acc + r * WsP, Ws * sizeof(scalar_t));
  });
}

}  // namespace

at::Tensor density_splat_cpu(const at::Tensor& points_in, const at::Tensor& offsets_in, const at::Tensor& sigma_in,
                             int64_t height, int64_t width, int64_t style, double truncate, int64_t kernel_size,
                             int64_t stride, bool deterministic) {
  check_splat_args(points_in, offsets_in, sigma_in, height, width, style, truncate, kernel_size, stride);
  (void)deterministic;  // the CPU kernel is always deterministic

  const PointSets ps = read_point_sets(points_in, offsets_in);
  const at::Tensor sigma = sigma_in.to(at::kDouble).contiguous();
  const int64_t T = ps.T, B = ps.B;
  const int64_t Hs = (height + stride - 1) / stride, Ws = (width + stride - 1) / stride;
  // pooled: a dataset loop then reuses the previous maps' memory instead of faulting in fresh pages
  at::Tensor out = ck::new_pooled_output({B, Hs, Ws}, points_in.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "density_splat_cpu", [&] {
    splat_cpu_impl<scalar_t>(ps.pts, ps.off, sigma.data_ptr<double>(), B, T,
                             height, width, style, truncate, kernel_size, stride, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor density_adaptive_cpu(const at::Tensor& points, const at::Tensor& offsets, int64_t height, int64_t width,
                                int64_t style, int64_t k, double beta, double lone, double truncate,
                                int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(style == kExact || style == kCsrnet,
              "density_adaptive: style must be 0 (exact) or 1 (csrnet), got ", style,
              " (matlab's sigma is fixed, not adaptive)");
  const auto prepared = density_prepare_cpu(points, offsets, height, width, style);
  const at::Tensor& pts = std::get<0>(prepared);
  const at::Tensor& off = std::get<1>(prepared);
  const at::Tensor sigma = knn_sigma_cpu(pts, off, k, beta, lone);
  return density_splat_cpu(pts, off, sigma, height, width, style, truncate, kernel_size, stride, false).unsqueeze(1);
}

}  // namespace density
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CPU, m) {
  m.impl("density_adaptive", &ck::density::density_adaptive_cpu);
  m.impl("knn_sigma", &ck::density::knn_sigma_cpu);
  m.impl("density_splat", &ck::density::density_splat_cpu);
  m.impl("density_prepare", &ck::density::density_prepare_cpu);
}
