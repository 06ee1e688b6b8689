// Per-point maths of the density op, written once and called by both the CPU loops (density_cpu.cpp)
// and the CUDA kernels (density_cuda.cu), so the CPU tests exercise the arithmetic the GPU runs.
//
// L2SM sec. 3.2 / HMoDE sec. III-D: D(p) = sum_i delta(p - p_i) * G_sigma_i, with the geometry-adaptive
// sigma_i = beta * mean distance to the k nearest neighbours. See docs/definitions.md, "Density maps", for
// the styles.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/common.h"

namespace ck {
namespace density {

enum Style : int64_t { kExact = 0, kCsrnet = 1, kMatlab = 2 };

constexpr int kMaxK = 64;  // the Python layer rejects k > 64 with a ValueError naming k

// ------------------------------------------------------------------------------------------ kNN grid
// Each image gets its own uniform grid over the bounding box of its points, about one point per cell,
// so a kNN query inspects O(k) cells on annotation-like layouts; memory is O(N). The grids of all images
// share one cell array: image b owns cells [2*offsets[b] + 4*b, 2*offsets[b+1] + 4*(b+1)), a capacity
// known from the shapes alone, so the GPU needs no host synchronization to allocate it.

// Packed per-image grid parameters, one row of kGridFields doubles (ints stored exactly below 2^53).
constexpr int kGridFields = 6;
struct Grid {
  double ox, oy;  // origin: the bounding box's lower corner
  double cell;    // cell side in pixels
  int64_t gx, gy; // cells per axis
  int64_t base;   // first cell of this image in the shared cell array
};

CK_HOST_DEVICE int64_t grid_capacity(int64_t n) { return 2 * n + 4; }

// The grid of one image's bounding box [xmin, xmax] x [ymin, ymax] (finite) holding n points. Any finite
// box gives a valid grid: the cell arithmetic is done in doubles and bounded before any cast to int64
// (a thin box's w / cell can exceed int64's range), and the cells are never smaller than 2^-16 of the
// largest coordinate's magnitude nor than 2^-1000, so that the cell boundaries ring_done computes are
// exact to far better than its margin, whatever the box's offset, and never subnormal. A box whose
// extent overflows a double (coordinates beyond +-8.9e307) is one cell: every pair is compared. The
// bound gx * gy <= grid_capacity(n) is what keeps cell_x / cell_y's casts in range.
CK_HOST_DEVICE Grid make_grid(double xmin, double ymin, double xmax, double ymax, int64_t n, int64_t base) {
  Grid g;
  g.ox = xmin;
  g.oy = ymin;
  g.base = base;
  const double w = xmax - xmin, h = ymax - ymin;
  if (!(w < INFINITY && h < INFINITY)) {  // one cell, origin 0: cell_x's (x - 0) / inf = 0 for any finite x
    g.ox = g.oy = 0.0;
    g.cell = INFINITY;
    g.gx = g.gy = 1;
    return g;
  }
  const double cells_wanted = n > 2 ? (double)n : 1.0;  // two a cell: ~15% slower on SHA-A
  const double area = w * h;
  double cell;
  if (area > 0 && area < INFINITY) {
    cell = sqrt(area / cells_wanted);
  } else if (w > 0 && h > 0) {
    cell = sqrt(w) * sqrt(h / cells_wanted);  // w * h over- or underflows
  } else {
    cell = fmax(w, h) / cells_wanted;  // all points on one line (or all coincident: 0)
  }
  const double mag = fmax(fmax(fabs(xmin), fabs(xmax)), fmax(fabs(ymin), fabs(ymax)));
  const double cap = (double)grid_capacity(n);
  // An elongated box can ask for more cells than the capacity: start from max(w, h) / cap at least, and
  // grow the cells until the grid fits (a few steps at most; the product is exact below 2^53).
  cell = fmax(fmax(cell, fmax(w, h) / cap), fmax(mag * 0x1p-16, 0x1p-1000));
  while (floor(w / cell + 1.0) * floor(h / cell + 1.0) > cap) cell *= 1.25;
  g.cell = cell;
  g.gx = (int64_t)floor(w / cell + 1.0);
  g.gy = (int64_t)floor(h / cell + 1.0);
  return g;
}

CK_HOST_DEVICE void store_grid(const Grid& g, double* row) {
  row[0] = g.ox;
  row[1] = g.oy;
  row[2] = g.cell;
  row[3] = (double)g.gx;
  row[4] = (double)g.gy;
  row[5] = (double)g.base;
}

CK_HOST_DEVICE Grid load_grid(const double* row) {
  Grid g;
  g.ox = row[0];
  g.oy = row[1];
  g.cell = row[2];
  g.gx = (int64_t)row[3];
  g.gy = (int64_t)row[4];
  g.base = (int64_t)row[5];
  return g;
}

CK_HOST_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
CK_HOST_DEVICE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
CK_HOST_DEVICE int64_t clamp_i64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The cell of a point of the grid's own box. (x - ox) / cell lies in [0, w / cell] and w / cell < gx <=
// grid_capacity, so the cast cannot overflow; the one-cell grid of an overflowing box has its origin at 0
// and infinite cells, so there (x - 0) / inf = 0. (Testing in doubles before the cast instead cost the
// CPU kNN 5% on SHA-A.)
CK_HOST_DEVICE int64_t cell_x(const Grid& g, double x) { return clamp_i64((int64_t)floor((x - g.ox) / g.cell), 0, g.gx - 1); }
CK_HOST_DEVICE int64_t cell_y(const Grid& g, double y) { return clamp_i64((int64_t)floor((y - g.oy) / g.cell), 0, g.gy - 1); }

// Global index of the cell holding (x, y).
CK_HOST_DEVICE int64_t cell_of(const Grid& g, double x, double y) { return g.base + cell_y(g, y) * g.gx + cell_x(g, x); }

// The image owning point i: offsets is [B + 1], ascending.
CK_HOST_DEVICE int64_t image_of(const int64_t* offsets, int64_t B, int64_t i) {
  int64_t lo = 0, hi = B;  // invariant: offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

// Keeps best[0..cnt) as the ascending K smallest squared distances seen so far.
CK_HOST_DEVICE void push_candidate(double* best, int& cnt, int K, double d2) {
  if (cnt == K && d2 >= best[K - 1]) return;
  int pos = cnt < K ? cnt++ : K - 1;
  while (pos > 0 && best[pos - 1] > d2) {
    best[pos] = best[pos - 1];
    --pos;
  }
  best[pos] = d2;
}

// Squared distances under- and overflow far from unit scale: a square loses precision below ~1.5e-154 px
// and becomes 0, and it is inf above ~1.3e154 px. A query is first run in plain arithmetic (kPlain: every
// annotation-like layout, the same bits as ever); a K-th best squared distance in [kFineBelow,
// kCoarseAbove] shows that all K best are exact to rounding (a smaller one that underflowed adds at most
// ~2^-537 to a sum of at least 2^-450). Otherwise the query runs again in a metric whose coordinate
// differences are scaled by a power of two (exactly):
//  - kFine, when the K-th best is below 2^-900 (K neighbours within ~2^-450 px; exact duplicates too):
//    differences times 2^960, so that distances from the smallest subnormal 2^-1074 (2^-114 scaled) up to
//    2^-450 (2^510) square without under- or overflow; farther points square to inf and are never among
//    the K best, since K nearer ones exist;
//  - kCoarse, when it is above 2^1000 (or inf): coordinates times 2^-600 before they are subtracted, so
//    that differences of coordinates up to +-DBL_MAX stay finite (2^425 scaled) and distances from 2^500
//    up square normally; a neighbour nearer than ~2^-78 px squares to ~0 there, which changes a sum of at
//    least 2^-100 (scaled) by less than 2^-400 of it.
enum Metric : int { kPlain = 0, kFine = 1, kCoarse = 2 };

// The rescaled passes are rare: on the CPU a cold function of their own, out of the query's code.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_KNN_COLD CK_HOST_DEVICE
#else
#define CK_KNN_COLD inline __attribute__((noinline, cold))
#endif
constexpr double kFineBelow = 0x1p-900, kFineScale = 0x1p960;
constexpr double kCoarseAbove = 0x1p1000, kCoarseScale = 0x1p-600;

template <int M>
CK_HOST_DEVICE double metric_d2(double xj, double yj, double px, double py) {
  double dx, dy;
  if (M == kPlain) {
    dx = xj - px;
    dy = yj - py;
  } else if (M == kFine) {
    dx = (xj - px) * kFineScale;
    dy = (yj - py) * kFineScale;
  } else {
    dx = xj * kCoarseScale - px * kCoarseScale;
    dy = yj * kCoarseScale - py * kCoarseScale;
  }
  return dx * dx + dy * dy;
}

template <int M>
CK_HOST_DEVICE void scan_cell(int64_t c, int64_t self, double px, double py, const double* pts,
                              const int64_t* cell_start, const int64_t* order, double* best, int& cnt, int K) {
  for (int64_t s = cell_start[c]; s < cell_start[c + 1]; ++s) {
    const int64_t j = order[s];
    if (j == self) continue;  // not its own neighbour; a duplicate of it is, at distance 0
    push_candidate(best, cnt, K, metric_d2<M>(pts[2 * j], pts[2 * j + 1], px, py));
  }
}

// True when no point outside the ring [xlo, xhi] x [ylo, yhi] of cells can be nearer than kth2 (the K-th
// best squared distance so far, in metric M): the distance from the point to the nearest cell not yet
// scanned (a side at the grid's edge has none) is at least sqrt(kth2).
template <int M>
CK_HOST_DEVICE bool ring_done(const Grid& g, double px, double py, int64_t xlo, int64_t xhi, int64_t ylo, int64_t yhi,
                              double kth2) {
  const double inf = INFINITY;
  const double b0 = xlo > 0 ? px - (g.ox + (double)xlo * g.cell) : inf;
  const double b1 = xhi < g.gx - 1 ? (g.ox + (double)(xhi + 1) * g.cell) - px : inf;
  const double b2 = ylo > 0 ? py - (g.oy + (double)ylo * g.cell) : inf;
  const double b3 = yhi < g.gy - 1 ? (g.oy + (double)(yhi + 1) * g.cell) - py : inf;
  // shrink by a hair: cell assignment rounds, and a neighbour exactly at the bound must not be missed
  double bound = fmin(fmin(b0, b1), fmin(b2, b3)) * (1.0 - 1e-12) - 1e-9 * g.cell;
  if (M == kFine) bound *= kFineScale;  // may become inf: then kth2 (finite, tiny) is surely within it
  if (M == kCoarse) bound *= kCoarseScale;
  return bound > 0 && kth2 <= bound * bound;
}

// beta * mean of the square roots of best[0..K), summed in ascending order (order-independent result).
CK_HOST_DEVICE double mean_sqrt(const double* best, int K, double beta) {
  double sum = 0.0;
  for (int i = 0; i < K; ++i) sum += sqrt(best[i]);
  return beta * sum / (double)K;
}

// The same for squared distances in metric M (distances times `scale`): beta * mean / scale, the power of
// two applied last, by exponent, so that neither a huge beta nor a tiny mean over- or underflows on the
// way (a subnormal result is rounded once more, at the end).
CK_HOST_DEVICE double scaled_mean_sqrt(const double* best, int K, double beta, double scale) {
  double sum = 0.0;
  for (int i = 0; i < K; ++i) sum += sqrt(best[i]);
  int e_mean, e_beta, e_scale;
  const double f_mean = frexp(sum / (double)K, &e_mean);
  const double f_beta = frexp(beta, &e_beta);
  frexp(scale, &e_scale);  // scale = 2^(e_scale - 1)
  return ldexp(f_mean * f_beta, e_mean + e_beta - (e_scale - 1));
}

// mean_sqrt (the bits as ever), unless beta * sum overflows where beta * sum / K would not (a huge beta).
CK_HOST_DEVICE double plain_mean_sqrt(const double* best, int K, double beta) {
  const double s = mean_sqrt(best, K, beta);
  return s < INFINITY ? s : scaled_mean_sqrt(best, K, beta, 1.0);
}

// Rings of cells scanned outwards from the point's cell until the K-th best distance (metric M) is no
// larger than the distance to anything not yet scanned; best[0..K) then holds the K smallest.
template <int M>
CK_HOST_DEVICE void knn_scan_one(int64_t self, const double* pts, const Grid& g, const int64_t* cell_start,
                                 const int64_t* order, int K, double* out) {
  double best[kMaxK];  // a local array, copied out at the end: no aliasing with the points for the compiler
  int cnt = 0;
  const double px = pts[2 * self], py = pts[2 * self + 1];
  const int64_t cx = cell_x(g, px), cy = cell_y(g, py);
  for (int64_t r = 0;; ++r) {
    const int64_t xlo = cx - r, xhi = cx + r, ylo = cy - r, yhi = cy + r;
    const int64_t xa = max_i64(xlo, 0), xb = min_i64(xhi, g.gx - 1);
    for (int64_t y = max_i64(ylo, 0); y <= min_i64(yhi, g.gy - 1); ++y) {
      const int64_t row = g.base + y * g.gx;
      if (y == ylo || y == yhi) {  // the ring's top and bottom rows: every cell
        for (int64_t x = xa; x <= xb; ++x) scan_cell<M>(row + x, self, px, py, pts, cell_start, order, best, cnt, K);
      } else {  // rows in between: the ring's two side cells
        if (xlo >= 0) scan_cell<M>(row + xlo, self, px, py, pts, cell_start, order, best, cnt, K);
        if (xhi < g.gx) scan_cell<M>(row + xhi, self, px, py, pts, cell_start, order, best, cnt, K);
      }
    }
    if (xlo <= 0 && ylo <= 0 && xhi >= g.gx - 1 && yhi >= g.gy - 1) break;  // the whole grid is scanned
    if (cnt == K && ring_done<M>(g, px, py, xlo, xhi, ylo, yhi, best[K - 1])) break;
  }
  for (int i = 0; i < K; ++i) out[i] = best[i];
}

// Exact geometry-adaptive sigma of point `self` (L2SM sec. 3.2): beta * mean distance to its K nearest
// others, where K = min(k, n - 1). The K distances are summed in ascending order, so the result does not
// depend on the order of points inside a cell. Any finite coordinates: see the metrics above.
CK_HOST_DEVICE double knn_sigma_one(int64_t self, const double* pts, const Grid& g, const int64_t* cell_start,
                                    const int64_t* order, int K, double beta) {
  double best[kMaxK];
  knn_scan_one<kPlain>(self, pts, g, cell_start, order, K, best);
  if (best[K - 1] >= kFineBelow && best[K - 1] <= kCoarseAbove) return plain_mean_sqrt(best, K, beta);
  if (best[K - 1] < kFineBelow) {
    knn_scan_one<kFine>(self, pts, g, cell_start, order, K, best);
    return scaled_mean_sqrt(best, K, beta, kFineScale);
  }
  knn_scan_one<kCoarse>(self, pts, g, cell_start, order, K, best);
  return scaled_mean_sqrt(best, K, beta, kCoarseScale);
}

// The same query over points stored in cell order (sx, sy: their coordinates; `self` is the point's
// position in that order): the cells of one grid row inside a ring are then one contiguous run of points,
// read sequentially. Same candidates, same distances, same result; the CPU kernel's layout.
template <int M>
CK_HOST_DEVICE void knn_scan_sorted(int64_t self, const double* sx, const double* sy, const Grid& g,
                                    const int64_t* cell_start, int K, double* best) {
  int cnt = 0;
  const double px = sx[self], py = sy[self];
  const int64_t cx = cell_x(g, px), cy = cell_y(g, py);
  auto scan = [&](int64_t c0, int64_t c1) {  // cells [c0, c1] of one grid row
    const int64_t end = cell_start[c1 + 1];
    for (int64_t s = cell_start[c0]; s < end; ++s) {
      const double d2 = metric_d2<M>(sx[s], sy[s], px, py);
      if (s != self && (cnt < K || d2 < best[K - 1])) push_candidate(best, cnt, K, d2);
    }
  };
  for (int64_t r = 0;; ++r) {
    const int64_t xlo = cx - r, xhi = cx + r, ylo = cy - r, yhi = cy + r;
    const int64_t xa = max_i64(xlo, 0), xb = min_i64(xhi, g.gx - 1);
    for (int64_t y = max_i64(ylo, 0); y <= min_i64(yhi, g.gy - 1); ++y) {
      const int64_t row = g.base + y * g.gx;
      if (y == ylo || y == yhi) {
        scan(row + xa, row + xb);
      } else {
        if (xlo >= 0) scan(row + xlo, row + xlo);
        if (xhi < g.gx) scan(row + xhi, row + xhi);
      }
    }
    if (xlo <= 0 && ylo <= 0 && xhi >= g.gx - 1 && yhi >= g.gy - 1) break;
    if (cnt == K && ring_done<M>(g, px, py, xlo, xhi, ylo, yhi, best[K - 1])) break;
  }
}

// The query again in the fine (kth2 below kFineBelow) or the coarse metric: rare, out of the hot path.
CK_KNN_COLD double knn_sigma_sorted_rescaled(int64_t self, const double* sx, const double* sy, const Grid& g,
                                             const int64_t* cell_start, int K, double beta, bool fine) {
  double best[kMaxK];
  if (fine) {
    knn_scan_sorted<kFine>(self, sx, sy, g, cell_start, K, best);
    return scaled_mean_sqrt(best, K, beta, kFineScale);
  }
  knn_scan_sorted<kCoarse>(self, sx, sy, g, cell_start, K, best);
  return scaled_mean_sqrt(best, K, beta, kCoarseScale);
}

// The plain pass is written out here as it always was (the templated scan above, which the rescaled
// passes use, costs the CPU kNN ~5% on SHA-A in GCC's hands).
CK_HOST_DEVICE double knn_sigma_sorted(int64_t self, const double* sx, const double* sy, const Grid& g,
                                       const int64_t* cell_start, int K, double beta) {
  double best[kMaxK];
  int cnt = 0;
  const double px = sx[self], py = sy[self];
  const int64_t cx = cell_x(g, px), cy = cell_y(g, py);
  auto scan = [&](int64_t c0, int64_t c1) {  // cells [c0, c1] of one grid row
    const int64_t end = cell_start[c1 + 1];
    for (int64_t s = cell_start[c0]; s < end; ++s) {
      const double dx = sx[s] - px, dy = sy[s] - py;
      const double d2 = dx * dx + dy * dy;
      if (s != self && (cnt < K || d2 < best[K - 1])) push_candidate(best, cnt, K, d2);
    }
  };
  for (int64_t r = 0;; ++r) {
    const int64_t xlo = cx - r, xhi = cx + r, ylo = cy - r, yhi = cy + r;
    const int64_t xa = max_i64(xlo, 0), xb = min_i64(xhi, g.gx - 1);
    for (int64_t y = max_i64(ylo, 0); y <= min_i64(yhi, g.gy - 1); ++y) {
      const int64_t row = g.base + y * g.gx;
      if (y == ylo || y == yhi) {
        scan(row + xa, row + xb);
      } else {
        if (xlo >= 0) scan(row + xlo, row + xlo);
        if (xhi < g.gx) scan(row + xhi, row + xhi);
      }
    }
    if (xlo <= 0 && ylo <= 0 && xhi >= g.gx - 1 && yhi >= g.gy - 1) break;
    if (cnt == K && ring_done<kPlain>(g, px, py, xlo, xhi, ylo, yhi, best[K - 1])) break;
  }
  if (best[K - 1] >= kFineBelow && best[K - 1] <= kCoarseAbove) return plain_mean_sqrt(best, K, beta);
  return knn_sigma_sorted_rescaled(self, sx, sy, g, cell_start, K, beta, best[K - 1] < kFineBelow);
}

// ------------------------------------------------------------------------------------------ splatting
// One point's Gaussian: weight(i, j) = scale * g(i - cy) * g(j - cx) on rows [y0, y1] x cols [x0, x1]
// (inclusive, inside the image), g(d) = exp(-a d^2), a = 1 / (2 sigma^2). In the matlab style weights
// below `thresh` (before scaling) are zeroed, as fspecial does (h(h < eps * max(h)) = 0).
constexpr int kWindowFields = 9;
struct Window {
  int64_t y0, y1, x0, x1;  // empty when y0 > y1 or x0 > x1
  double cy, cx;           // kernel centre in pixel units (half-integers for an even matlab window)
  double a;                // 1 / (2 sigma^2); +inf for sigma == 0: a unit impulse
  double scale;            // normalization
  double thresh;           // matlab: zero a weight below this (before scaling); < 0: never
};

CK_HOST_DEVICE double gauss(double d, double a) { return d == 0.0 ? 1.0 : exp(-a * d * d); }

// g(i - c) for i = lo..hi, into out[i - lo] (when out is not null); returns their sum. Consecutive values
// follow g(d + 1) = g(d) * exp(-a (2d + 1)), whose factor itself steps by exp(-2a): three exp() calls per
// run instead of one per pixel (exp dominated the CPU time). The runs start at the index nearest the
// centre and move outwards, so values only shrink: no overflow, and an underflow is a true ~0. The
// relative rounding error grows by about 2 ulp a step (~1e-13 over the widest windows).
CK_HOST_DEVICE double gauss_run(double c, int64_t lo, int64_t hi, double a, double* out) {
  if (hi < lo) return 0.0;
  double sum = 0.0;
  if (!(a < INFINITY)) {  // sigma == 0: a unit impulse at the centre
    for (int64_t i = lo; i <= hi; ++i) {
      const double v = ((double)i == c) ? 1.0 : 0.0;
      if (out) out[i - lo] = v;
      sum += v;
    }
    return sum;
  }
  const double fs = floor(c + 0.5);
  const int64_t s = fs < (double)lo ? lo : (fs > (double)hi ? hi : (int64_t)fs);
  const double d0 = (double)s - c, g0 = gauss(d0, a), q = exp(-2.0 * a);
  double v = g0, m = exp(-a * (2.0 * d0 + 1.0));
  for (int64_t i = s; i <= hi; ++i) {  // rightwards: d = i - c grows
    if (out) out[i - lo] = v;
    sum += v;
    v *= m;
    m *= q;
  }
  v = g0;
  m = exp(-a * (1.0 - 2.0 * d0));
  for (int64_t i = s - 1; i >= lo; --i) {  // leftwards: d shrinks, |d| grows
    v *= m;
    m *= q;
    if (out) out[i - lo] = v;
    sum += v;
  }
  return sum;
}

// scipy.ndimage.gaussian_filter's radius, int(truncate * sigma + 0.5), as a double (it can be huge).
CK_HOST_DEVICE double window_radius(double sigma, double truncate) { return floor(truncate * sigma + 0.5); }

// Windows up to this many pixels a side are summed term by term (the bits the kernels always gave); wider
// ones (sigma >= 106 px) in closed form, see gauss_window_sum. gauss_run's recurrence loses ~d^2 / 2 ulp
// by step d, so this bound also caps the term-by-term sum's relative error near 1e-9.
constexpr int64_t kDirectSumMax = 4096;

// N = sum_{d=-R}^{R} exp(-a d^2), a = 1 / (2 sigma^2), R = rr (a whole number, up to inf): the
// normalizer of scipy's 1-D Gaussian weights (csrnet style), in bounded time whatever sigma and R.
// Terms past d = sqrt(746 / a) are below the smallest subnormal, so the sum stops there (same bits).
// Beyond kDirectSumMax terms (then sigma > 106 and R > 4096) the second (midpoint) Euler-Maclaurin
// formula, with x = R + 1/2, u = x sqrt(a), f = exp(-u^2):
//   N = sqrt(pi / a) erf(u) - [f'(x) - f'(-x)] / 24 + 7 [f'''(x) - f'''(-x)] / 5760 + E
//     = sqrt(pi / a) erf(u) + f x a (1/6 + 7 a / 240 - 7 a u^2 / 360) + E.
// The next term, -31/967680 [f^(5)(x) - f^(5)(-x)], is below ~1e-3 a^3 N (< 1e-16 N here: a < 4.5e-5),
// and the remainder past it is of order exp(-pi^2 / a) N (0 in doubles): E is rounding, a few ulp.
// python_tests/test_density.py checks it against sums taken term by term.
CK_HOST_DEVICE double gauss_window_sum(double sigma, double a, double rr) {
  if (!(a < INFINITY)) return 1.0;  // sigma ~ 0: a unit impulse
  const double reach = a > 0 ? ceil(sqrt(746.0 / a)) : INFINITY;
  const double L = fmin(rr, reach);
  if (L <= (double)kDirectSumMax) return 2.0 * gauss_run(0.0, 0, (int64_t)L, a, nullptr) - 1.0;
  if (!(sigma < INFINITY) || !(a > 0)) return INFINITY;  // sigma^2 overflows: every term is 1
  const double x = rr + 0.5, u = x * sqrt(a);
  const double f = exp(-u * u);  // 0 once u > 27.3 (and for R = inf)
  const double head = sqrt(3.141592653589793 / a) * erf(u);
  return f > 0 ? head + f * x * a * (1.0 / 6.0 + 7.0 / 240.0 * a - 7.0 / 360.0 * a * u * u) : head;
}

// With defer_norm, styles exact and csrnet leave scale unset (NaN) for a caller that tabulates the
// Gaussian anyway and normalizes from its table (the CPU kernel); matlab always sets it.
CK_HOST_DEVICE Window make_window(int64_t style, double x, double y, double sigma, int64_t H, int64_t W,
                                  double truncate, int64_t kernel_size, bool defer_norm = false) {
  Window w;
  w.a = sigma > 0 ? 0.5 / (sigma * sigma) : INFINITY;
  w.thresh = -1.0;
  if (style == kMatlab) {
    // MCNN get_density_map_gaussian.m / SASNet prepare_dataset.py: 1-based pixel
    // clip(|floor(v)|, 1, size), a kernel_size window clipped to the image, and at a border a new
    // fspecial kernel of the clipped size, centred on the clipped window and renormalized over it.
    // Only the Gaussian's shape matters here (the kernel is renormalized), and for a > 1000 (sigma <
    // 0.0224 px) every weight but the centre's (or the 2 or 4 equal ones around a half-pixel centre) is
    // below 2^-1075 of it: a capped a gives those same weights, where the true one underflows even the
    // centre's exp(-a / 4) of a border-clipped, even window (and a point would then sum to 0, not 1).
    w.a = fmin(w.a, 1000.0);
    const double fy = fmin(fmax(fabs(floor(y)), 1.0), (double)H), fx = fmin(fmax(fabs(floor(x)), 1.0), (double)W);
    const int64_t py = (int64_t)fy - 1, px = (int64_t)fx - 1, h = kernel_size / 2;
    w.y0 = max_i64(py - h, 0);
    w.y1 = min_i64(py + h, H - 1);
    w.x0 = max_i64(px - h, 0);
    w.x1 = min_i64(px + h, W - 1);
    w.cy = 0.5 * (double)(w.y0 + w.y1);
    w.cx = 0.5 * (double)(w.x0 + w.x1);
    // fspecial's largest value sits at the window's centre (offset 0 or 1/2 on each axis)
    const double gmax = gauss(w.cy - floor(w.cy), w.a) * gauss(w.cx - floor(w.cx), w.a);
    w.thresh = 2.220446049250313e-16 * gmax;  // eps(double) * max(h)
    double norm;
    if (gauss((double)w.y0 - w.cy, w.a) * gauss((double)w.x0 - w.cx, w.a) >= w.thresh) {
      // the smallest value (a corner) passes the threshold: the kernel is separable, and so is its sum
      norm = gauss_run(w.cy, w.y0, w.y1, w.a, nullptr) * gauss_run(w.cx, w.x0, w.x1, w.a, nullptr);
    } else {  // rare: windows wide against sigma lose their far corners to the threshold
      norm = 0.0;
      for (int64_t i = w.y0; i <= w.y1; ++i) {
        const double gy = gauss((double)i - w.cy, w.a);
        for (int64_t j = w.x0; j <= w.x1; ++j) {
          const double v = gy * gauss((double)j - w.cx, w.a);
          if (v >= w.thresh) norm += v;
        }
      }
    }
    w.scale = norm > 0 ? 1.0 / norm : 0.0;
    return w;
  }
  // exact and csrnet: centred on the pixel holding the point, radius int(truncate * sigma + 0.5) as
  // scipy.ndimage.gaussian_filter uses.
  if (!(y >= 0 && y < (double)H && x >= 0 && x < (double)W)) {  // not in the image: contributes nothing
    w.cy = w.cx = 0.0;  // (tested in doubles: the floor of a far coordinate does not fit an int64)
    w.y0 = 0;
    w.y1 = -1;
    w.x0 = 0;
    w.x1 = -1;
    w.scale = 0.0;
    return w;
  }
  const int64_t py = (int64_t)floor(y), px = (int64_t)floor(x);
  w.cy = (double)py;
  w.cx = (double)px;
  const double rr = window_radius(sigma, truncate);
  const int64_t r = (int64_t)fmin(rr, (double)(H + W));  // beyond the image the window is clipped anyway
  w.y0 = max_i64(py - r, 0);
  w.y1 = min_i64(py + r, H - 1);
  w.x0 = max_i64(px - r, 0);
  w.x1 = min_i64(px + r, W - 1);
  if (style == kExact) {
    // renormalized over the in-image part: every in-image point contributes exactly 1
    w.scale = defer_norm
                  ? NAN
                  : 1.0 / (gauss_run(w.cy, w.y0, w.y1, w.a, nullptr) * gauss_run(w.cx, w.x0, w.x1, w.a, nullptr));
  } else {
    // scipy: 1-D weights normalized over the full window [-R, R] (R unclipped), so with mode='constant'
    // the mass past the border is lost
    if (defer_norm) {
      w.scale = NAN;
    } else {
      const double n = gauss_window_sum(sigma, w.a, rr);  // sum over [-R, R]
      w.scale = 1.0 / (n * n);
    }
  }
  return w;
}

CK_HOST_DEVICE void store_window(const Window& w, double* row) {
  row[0] = (double)w.y0;
  row[1] = (double)w.y1;
  row[2] = (double)w.x0;
  row[3] = (double)w.x1;
  row[4] = w.cy;
  row[5] = w.cx;
  row[6] = w.a;
  row[7] = w.scale;
  row[8] = w.thresh;
}

CK_HOST_DEVICE Window load_window(const double* row) {
  Window w;
  w.y0 = (int64_t)row[0];
  w.y1 = (int64_t)row[1];
  w.x0 = (int64_t)row[2];
  w.x1 = (int64_t)row[3];
  w.cy = row[4];
  w.cx = row[5];
  w.a = row[6];
  w.scale = row[7];
  w.thresh = row[8];
  return w;
}

// The weight of pixel (i, j) of a window, given the two 1-D factors.
CK_HOST_DEVICE double pixel_weight(const Window& w, double gy, double gx) {
  const double v = gy * gx;
  return (v < w.thresh) ? 0.0 : w.scale * v;
}

// ------------------------------------------------------------------------------------------ op checks
// The last line of defence for callers reaching the ops through torch.ops directly (the Python layer
// raises ValueError/TypeError naming the argument first); shared by the CPU and CUDA entry points.
inline void check_points_offsets(const at::Tensor& points, const at::Tensor& offsets) {
  CK_CHECK_DIM(points, 2);
  TORCH_CHECK(points.size(1) == 2, "points must be [T, 2], got [", points.size(0), ", ", points.size(1), "]");
  CK_CHECK_DIM(offsets, 1);
  CK_CHECK_DTYPE(offsets, at::kLong);
  TORCH_CHECK(offsets.numel() >= 1, "offsets must have B + 1 >= 1 entries");
  CK_CHECK_DEVICE(offsets, points);
}

inline void check_knn_args(const at::Tensor& points, const at::Tensor& offsets, int64_t k) {
  check_points_offsets(points, offsets);
  TORCH_CHECK(k >= 1 && k <= kMaxK, "k must be in [1, ", kMaxK, "], got ", k);
}

inline void check_prepare_args(const at::Tensor& points, const at::Tensor& offsets, int64_t height, int64_t width,
                               int64_t style) {
  check_points_offsets(points, offsets);
  CK_CHECK_FLOATING(points);
  TORCH_CHECK(height >= 1 && width >= 1, "height and width must be >= 1, got ", height, " x ", width);
  TORCH_CHECK(style >= kExact && style <= kMatlab, "style must be 0, 1 or 2, got ", style);
}

inline void check_splat_params(double truncate, int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(kernel_size >= 1, "kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK(truncate > 0, "truncate must be > 0, got ", truncate);
}

inline void check_splat_args(const at::Tensor& points, const at::Tensor& offsets, const at::Tensor& sigma,
                             int64_t height, int64_t width, int64_t style, double truncate, int64_t kernel_size,
                             int64_t stride) {
  check_prepare_args(points, offsets, height, width, style);
  CK_CHECK_DIM(sigma, 1);
  TORCH_CHECK(sigma.size(0) == points.size(0), "sigma must have one value per point (", points.size(0), "), got ",
              sigma.size(0));
  CK_CHECK_DEVICE(sigma, points);
  check_splat_params(truncate, kernel_size, stride);
}

}  // namespace density
}  // namespace ck
