// CPU kernels of the density op: kNN sigmas on per-image grids, and Gaussian splatting.
// Parallel with at::parallel_for (OpenMP underneath) and deterministic: every output element is owned by
// one task and summed in point order, so the bits do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
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
  check_offsets_values(ps.off, ps.B, ps.T);  // shared with the CUDA entry points (common/checks.h)
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
  at::parallel_for(0, T, 64, [&](int64_t s0, int64_t s1) {
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

// Output rows per band: the unit of work of the accumulation, and of the row padding of the y-weights.
constexpr int64_t kBandRows = 8;

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

// Where a window's weights start: y-weights from y0 rounded down to a whole band (zeros before y0, and
// after y1 up to the band's end), x-weights from x0 rounded down to a whole vector (zeros before x0, and
// after x1 up to the vector's end). The zeros let both accumulation paths read whole bands and vectors.
inline int64_t band_floor(int64_t y) { return y - y % kBandRows; }
template <typename acc_t>
inline int64_t vec_floor(int64_t x) { return x - x % Vec<acc_t>::lanes; }

// The tiled path (stride 1): one band of kBandRows full-resolution rows, column vector by column vector.
// A tile of kBandRows x one vector lives in registers while every point covering it (col_list, in point
// order) adds its weights; the tile is then stored once. Each output element is written exactly once, so
// no separate zeroing pass, and a point costs kBandRows FMAs per vector instead of as many loads and
// stores of the output. fy[j]: the band's kBandRows y-weights of band point j; gx[j]: its x-weights,
// indexed by absolute column (valid on its window's whole vectors). The bits are those of the row-wise
// path: each element is the same sum in the same point order, and the padded zeros add 0 * w = +0 to
// an accumulator that starts at +0 and only grows.
template <typename acc_t>
__attribute__((always_inline)) inline void tiles_impl(const acc_t* const* __restrict__ fy,
                                                      const acc_t* const* __restrict__ gx,
                                                      const int32_t* __restrict__ col_start,
                                                      const int32_t* __restrict__ col_list, int64_t nvec,
                                                      int64_t rows, int64_t ostride, acc_t* __restrict__ out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  static_assert(kBandRows == 8, "tiles_impl holds a band's 8 rows in 8 named registers");
  for (int64_t v = 0; v < nvec; ++v) {
    const int64_t c = v * L;
    // eight named accumulators, and nothing that takes their address: GCC kept an array, or a vector
    // copied out lane by lane, on the stack, and the inner loop then ran through memory
    V a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
    for (int32_t e = col_start[v]; e < col_start[v + 1]; ++e) {
      const int32_t j = col_list[e];
      const acc_t* __restrict__ f = fy[j];
      V x;
      std::memcpy(&x, gx[j] + c, sizeof(V));
      a0 += f[0] * x;
      a1 += f[1] * x;
      a2 += f[2] * x;
      a3 += f[3] * x;
      a4 += f[4] * x;
      a5 += f[5] * x;
      a6 += f[6] * x;
      a7 += f[7] * x;
    }
    acc_t* o = out + c;
    std::memcpy(o, &a0, sizeof(V));
    if (rows > 1) std::memcpy(o + ostride, &a1, sizeof(V));
    if (rows > 2) std::memcpy(o + 2 * ostride, &a2, sizeof(V));
    if (rows > 3) std::memcpy(o + 3 * ostride, &a3, sizeof(V));
    if (rows > 4) std::memcpy(o + 4 * ostride, &a4, sizeof(V));
    if (rows > 5) std::memcpy(o + 5 * ostride, &a5, sizeof(V));
    if (rows > 6) std::memcpy(o + 6 * ostride, &a6, sizeof(V));
    if (rows > 7) std::memcpy(o + 7 * ostride, &a7, sizeof(V));
  }
}

#define CK_TILES_ARGS(T)                                                                                      \
  const T *const *fy, const T *const *gx, const int32_t *col_start, const int32_t *col_list, int64_t nvec, \
      int64_t rows, int64_t ostride, T *out
CK_MULTIVERSION(, accumulate_tiles, tiles_impl, CK_TILES_ARGS, fy, gx, col_start, col_list, nvec, rows, ostride, out)

// The row-wise path: accumulates one band of output rows, [row0, row1) at full resolution, from the points
// listed for it, in list order, into zeroed rows. For strides > 1, and for bands holding a matlab window
// that fspecial's threshold cuts (the tiled path cannot zero single pixels).
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
    const int64_t x0a = vec_floor<acc_t>(w.x0);
    const acc_t* gy = wy + wy_off[i] - band_floor(w.y0);  // gy[r]: row r's weight
    const acc_t* gx = wx + wx_off[i] - x0a;               // gx[c]: column c's weight
    if (stride == 1) {
      // Kept free of integer divisions (one per row cost as much as the row's FMAs), in aligned whole
      // 32-byte vectors from x0a (the band rows are vector-aligned and a whole number of vectors wide, see
      // splat_cpu_impl), so no access splits a cache line and no row needs a scalar tail.
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

// The splat's working memory, kept per calling thread from one call to the next. Freed and reallocated
// every call, these buffers were handed back to the OS by glibc's heap trimming and faulted in again a
// page at a time (~2 us a fault on our VMs): 7-10 us an image, as much as computing the weights. Released
// when a call needed more than kKeepBytes (a huge batch), so the cache stays small.
struct SplatBuffers {
  std::vector<Window> win;
  std::vector<int64_t> wy_off, wx_off, band_start, band_points, img;
  std::vector<char> thresholded;
  std::vector<float> wf[2];   // y- and x-weights of float32 maps
  std::vector<double> wd[2];  // of float64 maps
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  size_t bytes() const {
    return win.capacity() * sizeof(Window) +
           (wy_off.capacity() + wx_off.capacity() + band_start.capacity() + band_points.capacity() + img.capacity()) *
               sizeof(int64_t) +
           thresholded.capacity() + (wf[0].capacity() + wf[1].capacity()) * sizeof(float) +
           (wd[0].capacity() + wd[1].capacity()) * sizeof(double);
  }
  void trim() {
    if (bytes() > kKeepBytes) *this = SplatBuffers();
  }
};
// Called outside parallel regions only: inside one, a worker would get its own (empty) buffers.
SplatBuffers& splat_buffers() {
  thread_local SplatBuffers b;
  return b;
}
std::vector<float>* weight_buffers(SplatBuffers& b, float) { return b.wf; }
std::vector<double>* weight_buffers(SplatBuffers& b, double) { return b.wd; }

// Accumulates in the output's precision: float32 maps in float32 (twice the SIMD lanes, and what the
// classic script does), float64 maps in float64. Window normalization is always computed in float64.
template <typename scalar_t>
void splat_cpu_impl(const double* pts, const int64_t* off, const double* sigma, int64_t B, int64_t T, int64_t H,
                    int64_t W, int64_t style, double truncate, int64_t kernel_size, int64_t stride, scalar_t* out) {
  using acc_t = scalar_t;
  constexpr int64_t L = Vec<acc_t>::lanes;
  const int64_t Hs = (H + stride - 1) / stride, Ws = (W + stride - 1) / stride;
  SplatBuffers& buf = splat_buffers();
  std::vector<Window>& win = buf.win;
  std::vector<int64_t>&wy_off = buf.wy_off, &wx_off = buf.wx_off;
  std::vector<char>& thresholded = buf.thresholded;
  std::vector<acc_t>&wy = weight_buffers(buf, acc_t())[0], &wx = weight_buffers(buf, acc_t())[1];

  // 1. each point's window, and the lengths of its two padded 1-D weight vectors
  win.resize(T);
  at::parallel_for(0, T, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      win[i] = make_window(style, pts[2 * i], pts[2 * i + 1], sigma[i], H, W, truncate, kernel_size,
                           /*defer_norm=*/true);
  });
  wy_off.resize(T + 1);
  wx_off.resize(T + 1);
  wy_off[0] = wx_off[0] = 0;
  for (int64_t i = 0; i < T; ++i) {
    const Window& w = win[i];
    const bool empty = w.y0 > w.y1 || w.x0 > w.x1;
    wy_off[i + 1] = wy_off[i] + (empty ? 0 : band_floor(w.y1) + kBandRows - band_floor(w.y0));
    wx_off[i + 1] = wx_off[i] + (empty ? 0 : vec_floor<acc_t>(w.x1) + L - vec_floor<acc_t>(w.x0));
  }
  wy.resize(wy_off[T]);
  wx.resize(wx_off[T]);
  thresholded.resize(T);

  // 2. the weights (the scale folded into the y-weights), with their padding zeros
  // Chunks of 32 points handed out dynamically: a window's cost grows with its sigma, and points come
  // sorted by row, so the near (bottom, large-sigma) half of a perspective image would keep one thread
  // busy long after the other finished under a static split. Small chunks also split the ~100-200 heads
  // of a sparse image between the threads.
  constexpr int64_t kChunk = 32;
  ck::parallel_dynamic((T + kChunk - 1) / kChunk, [&](int64_t chunk) {
    thread_local std::vector<double> gyd, gxd, table, prefix;
    const int64_t i0 = chunk * kChunk, i1 = std::min(i0 + kChunk, T);
    for (int64_t i = i0; i < i1; ++i) {
      Window& w = win[i];
      thresholded[i] = 0;
      if (w.y0 > w.y1 || w.x0 > w.x1) continue;  // an out-of-image point: no weights
      acc_t* gy = wy.data() + wy_off[i] + (w.y0 - band_floor(w.y0));  // gy[0] is row y0
      acc_t* gx = wx.data() + wx_off[i] + (w.x0 - vec_floor<acc_t>(w.x0));  // gx[0] is column x0
      std::fill(wy.data() + wy_off[i], gy, acc_t(0));
      std::fill(gy + (w.y1 - w.y0 + 1), wy.data() + wy_off[i + 1], acc_t(0));
      std::fill(wx.data() + wx_off[i], gx, acc_t(0));
      std::fill(gx + (w.x1 - w.x0 + 1), wx.data() + wx_off[i + 1], acc_t(0));
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
          const double n = rr <= (double)(H + W) && rr <= (double)kDirectSumMax ? 2.0 * tsum - 1.0
                                                                                 : gauss_window_sum(sigma[i], w.a, rr);
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
      // The x-weights normalized by their own sum and the rest of the scale folded into the y-weights: both
      // factors stay <= 1 (for the separable windows these tables serve, scale = 1 / (sum_y sum_x)), where
      // scale * gy alone overflowed float32 for a tiny sigma (and times a gx flushed to 0 gave NaN).
      double sum_x = 0.0;
      for (size_t c = 0; c < gxd.size(); ++c) sum_x += gxd[c];
      const double fold = w.scale * sum_x, inv_x = 1.0 / sum_x;
      double gy_min = INFINITY, gx_min = INFINITY;
      for (size_t r = 0; r < gyd.size(); ++r) {
        gy[r] = static_cast<acc_t>(fold * gyd[r]);
        gy_min = std::min(gy_min, gyd[r]);
      }
      for (size_t c = 0; c < gxd.size(); ++c) {
        gx[c] = static_cast<acc_t>(gxd[c] * inv_x);
        gx_min = std::min(gx_min, gxd[c]);
      }
      thresholded[i] = (w.thresh > 0 && gy_min * gx_min < w.thresh) ? 1 : 0;
    }
  });

  // 3. bands of output rows, each listing (in point order) the points whose window reaches it
  const int64_t bands = (Hs + kBandRows - 1) / kBandRows;
  std::vector<int64_t>&band_start = buf.band_start, &band_points = buf.band_points, &img = buf.img;
  band_start.assign(B * bands + 1, 0);
  auto band_range = [&](int64_t i, int64_t& first, int64_t& last) {
    first = (win[i].y0 / stride) / kBandRows;
    last = (win[i].y1 / stride) / kBandRows;
  };
  img.resize(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = off[b]; i < off[b + 1]; ++i) img[i] = b;
  for (int64_t i = 0; i < T; ++i) {
    if (win[i].y0 > win[i].y1 || win[i].x0 > win[i].x1) continue;
    int64_t f, l;
    band_range(i, f, l);
    for (int64_t band = f; band <= l; ++band) ++band_start[img[i] * bands + band + 1];
  }
  for (int64_t j = 0; j < B * bands; ++j) band_start[j + 1] += band_start[j];
  band_points.resize(band_start[B * bands]);
  for (int64_t i = 0; i < T; ++i) {
    if (win[i].y0 > win[i].y1 || win[i].x0 > win[i].x1) continue;
    int64_t f, l;
    band_range(i, f, l);
    // band_start[j] doubles as band j's cursor here, and is shifted back below
    for (int64_t band = f; band <= l; ++band) band_points[band_start[img[i] * bands + band]++] = i;
  }
  for (int64_t j = B * bands; j > 0; --j) band_start[j] = band_start[j - 1];
  band_start[0] = 0;

  // 4. every band accumulated by one task, in the output's precision: at stride 1 by the tiled path (unless
  // the band holds a thresholded matlab window), else by the row-wise path into zeroed rows. Both write
  // rows that they can cover with aligned whole vectors: the output's own rows when they are (a width
  // that is a whole number of vectors), else a per-thread scratch band of 64-byte aligned rows WsP >= Ws +
  // one vector apart (not a multiple of 4 KiB, so its rows do not share cache sets), copied out. Every
  // output element is written; the scratch stays in L1/L2. All paths give the same bits.
  constexpr int64_t kAlign = 64 / sizeof(scalar_t);
  const bool in_place = Ws % L == 0 && reinterpret_cast<uintptr_t>(out) % (L * sizeof(scalar_t)) == 0;
  const int64_t WsP = in_place ? Ws : (Ws + L + kAlign - 1) / kAlign * kAlign;
  const int64_t nvec = (Ws + L - 1) / L;
  ck::parallel_dynamic(B * bands, [&](int64_t t) {
    const int64_t b = t / bands, band = t % bands;
    const int64_t orow0 = band * kBandRows, orow1 = std::min(orow0 + kBandRows, Hs);  // output rows
    const int64_t row0 = orow0 * stride, row1 = std::min(orow1 * stride, H);            // full-res rows
    scalar_t* o = out + (b * Hs + orow0) * Ws;
    const int64_t* list = band_points.data() + band_start[t];
    const int64_t nlist = band_start[t + 1] - band_start[t];
    bool tiled = stride == 1;
    for (int64_t s = 0; s < nlist && tiled; ++s) tiled = !thresholded[list[s]];
    scalar_t* acc = o;
    if (!in_place) {  // this thread's scratch band, 64-byte aligned
      thread_local std::vector<scalar_t> scratch;
      if (scratch.size() < (size_t)(kBandRows * WsP + kAlign)) scratch.resize(kBandRows * WsP + kAlign);
      acc = scratch.data();
      acc += (kAlign - (reinterpret_cast<uintptr_t>(acc) / sizeof(scalar_t)) % kAlign) % kAlign;
    }
    if (tiled) {
      // per vector column, the band points covering it, in point order (a counting sort by column)
      thread_local std::vector<const acc_t*> fy, gx;
      thread_local std::vector<int32_t> col_start, col_list;
      fy.resize(nlist);
      gx.resize(nlist);
      col_start.assign(nvec + 1, 0);
      for (int64_t s = 0; s < nlist; ++s) {
        const int64_t i = list[s];
        const Window& w = win[i];
        fy[s] = wy.data() + wy_off[i] + (row0 - band_floor(w.y0));
        gx[s] = wx.data() + wx_off[i] - vec_floor<acc_t>(w.x0);
        for (int64_t v = w.x0 / L; v <= w.x1 / L; ++v) ++col_start[v + 1];
      }
      for (int64_t v = 0; v < nvec; ++v) col_start[v + 1] += col_start[v];
      col_list.resize(col_start[nvec]);
      for (int64_t s = 0; s < nlist; ++s) {
        const Window& w = win[list[s]];
        for (int64_t v = w.x0 / L; v <= w.x1 / L; ++v) col_list[col_start[v]++] = (int32_t)s;
      }
      for (int64_t v = nvec; v > 0; --v) col_start[v] = col_start[v - 1];
      col_start[0] = 0;
      accumulate_tiles(fy.data(), gx.data(), col_start.data(), col_list.data(), nvec, orow1 - orow0, WsP, acc);
    } else {
      std::fill(acc, acc + (orow1 - orow0) * WsP, scalar_t(0));
      accumulate_band(win.data(), wy.data(), wy_off.data(), wx.data(), wx_off.data(), thresholded.data(), list,
                      nlist, row0, row1, orow0, stride, WsP, acc);
    }
    if (!in_place)
      for (int64_t r = 0; r < orow1 - orow0; ++r) std::memcpy(o + r * Ws, acc + r * WsP, Ws * sizeof(scalar_t));
  });
  buf.trim();
}

}  // namespace

namespace {

// The splat of checked arguments into a new [B, Hs, Ws] map (or [B, 1, Hs, Ws] with channel_dim) of dtype
// out_type.
at::Tensor splat_checked(const at::Tensor& points_in, const at::Tensor& offsets_in, const at::Tensor& sigma_in,
                         int64_t height, int64_t width, int64_t style, double truncate, int64_t kernel_size,
                         int64_t stride, at::ScalarType out_type, bool channel_dim) {
  const PointSets ps = read_point_sets(points_in, offsets_in);
  const at::Tensor sigma = sigma_in.to(at::kDouble).contiguous();
  const int64_t T = ps.T, B = ps.B;
  const double* sig = sigma.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i)  // 0 is an impulse, inf a flat window; a negative one has no window
    TORCH_CHECK(sig[i] >= 0, "sigma must be >= 0 (and not NaN) for every point, got ", sig[i], " at point ", i);
  const int64_t Hs = (height + stride - 1) / stride, Ws = (width + stride - 1) / stride;
  // pooled: a dataset loop then reuses the previous maps' memory instead of faulting in fresh pages
  const auto options = points_in.options().dtype(out_type);
  at::Tensor out = channel_dim ? ck::new_pooled_output({B, 1, Hs, Ws}, options)
                               : ck::new_pooled_output({B, Hs, Ws}, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "density_splat_cpu", [&] {
    splat_cpu_impl<scalar_t>(ps.pts, ps.off, sigma.data_ptr<double>(), B, T,
                             height, width, style, truncate, kernel_size, stride, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

at::Tensor density_splat_cpu(const at::Tensor& points_in, const at::Tensor& offsets_in, const at::Tensor& sigma_in,
                             int64_t height, int64_t width, int64_t style, double truncate, int64_t kernel_size,
                             int64_t stride, bool deterministic) {
  check_splat_args(points_in, offsets_in, sigma_in, height, width, style, truncate, kernel_size, stride);
  (void)deterministic;  // the CPU kernel is always deterministic
  return splat_checked(points_in, offsets_in, sigma_in, height, width, style, truncate, kernel_size, stride,
                       points_in.scalar_type(), false);
}

at::Tensor density_adaptive_cpu(const at::Tensor& points, at::IntArrayRef counts, int64_t height, int64_t width,
                                int64_t style, int64_t k, double beta, double lone, double truncate,
                                int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(style == kExact || style == kCsrnet,
              "density_adaptive: style must be 0 (exact) or 1 (csrnet), got ", style,
              " (matlab's sigma is fixed, not adaptive)");
  const int64_t B = (int64_t)counts.size();
  at::Tensor offsets = at::empty({B + 1}, points.options().dtype(at::kLong));
  int64_t* o = offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(counts[b] >= 0, "counts must be >= 0, got ", counts[b], " for image ", b);
    o[b + 1] = o[b] + counts[b];
  }
  check_prepare_args(points, offsets, height, width, style);
  check_splat_params(truncate, kernel_size, stride);  // kNN checks k
  // float64 from the start: the three steps then read and write the same coordinates without a copy
  const at::Tensor pts64 = points.to(at::kDouble).contiguous();
  TORCH_CHECK(o[B] == pts64.size(0), "counts must add up to the number of points (", pts64.size(0), "), got ", o[B]);
  {  // the Python layer leaves this check to this loop, which reads the points from a warm cache
    const double* p = pts64.data_ptr<double>();
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < 2 * o[B]; i += 2) {
      if (std::isfinite(p[i]) && std::isfinite(p[i + 1])) continue;
      if (bad++ == 0) first = i / 2;
    }
    if (bad) {
      const int64_t b = image_of(o, B, first);
      TORCH_CHECK_VALUE(false, "points_list[", b, "] must be finite, got [", p[2 * first], ", ", p[2 * first + 1],
                        "] at row ", first - o[b], " (", bad, " non-finite rows)");
    }
  }
  const auto prepared = density_prepare_cpu(pts64, offsets, height, width, style);
  const at::Tensor& pts = std::get<0>(prepared);
  const at::Tensor& off = std::get<1>(prepared);
  const at::Tensor sigma = knn_sigma_cpu(pts, off, k, beta, lone);
  return splat_checked(pts, off, sigma, height, width, style, truncate, kernel_size, stride, points.scalar_type(),
                       true);
}

}  // namespace density
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CPU, m) {
  m.impl("density_adaptive", &ck::density::density_adaptive_cpu);
  m.impl("knn_sigma", &ck::density::knn_sigma_cpu);
  m.impl("density_splat", &ck::density::density_splat_cpu);
  m.impl("density_prepare", &ck::density::density_prepare_cpu);
}
