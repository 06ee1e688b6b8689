// Hierarchical gating fusion (HMoDE eq. 1): C++ (OpenMP through at::parallel_for) forward and backward.
//
// Experts arrive packed (expert_sizes = [h_0, w_0, h_1, w_1, ...], S = sum_k h_k * w_k), in one of two
// layouts: [B, S], image-major (image b's expert k at b * S + sum_{k' < k} h_k' * w_k'; a [B, K, h, w]
// stack is this, unmoved), or [B * S], expert-major (expert k's [B, h_k, w_k] block at
// B * sum_{k' < k} h_k' * w_k': the concatenation of a list of experts, whose gradients autograd then
// hands back as contiguous slices, with no copy). Gates are [B, M*N, hg1, wg1] and [B, M, hg2, wg2]. Everything is sampled at the [H, W] output pixel as F.interpolate would sample it.
//
// Determinism: the forward writes each output pixel from one thread, and the per-row importance partials are
// summed over rows in a fixed order. In the backward, each output row is first folded onto the native columns
// of every input (a sum over x in order), then native row r receives the folded rows that read it, in
// increasing output-row order. With at least as many images as threads, each image belongs to one thread,
// which does both steps as it streams its rows; otherwise pass 1 folds all rows in parallel into a buffer and
// pass 2 hands each native row to one work item. Both schedules add the same terms in the same order, so no two
// threads ever add to one element and the bits are the same whatever torch.set_num_threads says. With nearest
// upsampling, the gates' softmax (forward) and softmax backward run per image at native resolution: pure
// functions of the image's inputs, so whichever thread runs them gets the same bits.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/common.h"
#include "common/simd.h"
#include "gating/gating.h"

namespace ck {
namespace gating {
namespace {

// The per-pixel maths of gating.h, compiled twice for the CPU: baseline x86-64 and AVX2+FMA, picked at
// load time from the CPU's feature bits (see common/simd.h). Their channel-major loops over a row of
// pixels are what vectorizes.
#define CK_FF_ARGS(T)                                                                                         \
  const T *e, const T *g1, const T *g2, T *gm, T *final_, const int64_t *groups, int64_t M, int64_t N, int64_t s, \
      int64_t gs, int64_t n
#define CK_FB_ARGS(T)                                                                                             \
  const T *e, const T *g1, const T *g2, const T *gm, const int64_t *groups, int64_t K, int64_t M, int64_t N,        \
      const T *gf, const T *ggm, int64_t ggs, const T *gimp, T *de, T *dl1, T *dl2, int64_t s, int64_t n, T *tmp, \
      bool gate_grads
CK_MULTIVERSION(CK_FLATTEN, fuse_forward_cpu, fuse_forward, CK_FF_ARGS, e, g1, g2, gm, final_, groups, M, N, s, gs, n)
CK_MULTIVERSION(CK_FLATTEN, fuse_backward_cpu, fuse_backward, CK_FB_ARGS, e, g1, g2, gm, groups, K, M, N, gf, ggm,
                ggs, gimp, de, dl1, dl2, s, n, tmp, gate_grads)

// Softmax (eq. 1's G1 and G2) over each run of n consecutive channels, at np pixels: src and dst (which
// may be the same array) hold channel c of pixel x at [c * cs + x]. The loops run across pixels in tiles,
// so they vectorize, exp included (ck::exp_le0). Same maths as gating.h's softmax: max subtracted, then
// scaled by 1 / sum.
template <typename T>
void softmax_runs(const T* src, T* dst, int64_t channels, int64_t n, int64_t cs, int64_t np) {
  constexpr int64_t L = 64;
  T mx[L], sum[L];
  for (int64_t x0 = 0; x0 < np; x0 += L) {
    const int64_t len = std::min(L, np - x0);
    for (int64_t first = 0; first < channels; first += n) {
      const T* in = src + first * cs + x0;
      T* out = dst + first * cs + x0;
      for (int64_t x = 0; x < len; ++x) mx[x] = in[x];
      for (int64_t j = 1; j < n; ++j)
        for (int64_t x = 0; x < len; ++x) mx[x] = in[j * cs + x] > mx[x] ? in[j * cs + x] : mx[x];
      for (int64_t x = 0; x < len; ++x) sum[x] = 0;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t x = 0; x < len; ++x) {
          const T e = ck::exp_le0(in[j * cs + x] - mx[x]);
          out[j * cs + x] = e;
          sum[x] += e;
        }
      for (int64_t x = 0; x < len; ++x) sum[x] = static_cast<T>(1) / sum[x];
      for (int64_t j = 0; j < n; ++j)
        for (int64_t x = 0; x < len; ++x) out[j * cs + x] *= sum[x];
    }
  }
}
#define CK_SM_ARGS(T) const T *src, T *dst, int64_t channels, int64_t n, int64_t cs, int64_t np
CK_MULTIVERSION(CK_FLATTEN, softmax_runs_cpu, softmax_runs, CK_SM_ARGS, src, dst, channels, n, cs, np)

// The horizontal adjoint of sampling one output row: f[c] (zeroed by the caller) receives the sum over the
// row's pixels x, in increasing x, of what d[x] sends to native column c (w columns; tx: the taps; fx: the
// integer factor when column c is read by exactly x = c*fx .. c*fx+fx-1, else 0).
template <typename T>
void fold_columns(const T* __restrict__ d, T* __restrict__ f, const Taps<T>* tx, int64_t fx, int64_t w, int64_t W,
                  bool bilinear) {
  if (bilinear) {
    for (int64_t x = 0; x < W; ++x) scatter_row(f, true, tx[x], d[x]);
  } else if (fx == 1) {
    for (int64_t c = 0; c < w; ++c) f[c] += d[c];
  } else if (fx == 2) {
    for (int64_t c = 0; c < w; ++c) f[c] += d[2 * c] + d[2 * c + 1];
  } else if (fx == 4) {
    for (int64_t c = 0; c < w; ++c) f[c] += ((d[4 * c] + d[4 * c + 1]) + d[4 * c + 2]) + d[4 * c + 3];
  } else if (fx > 0) {
    for (int64_t c = 0; c < w; ++c) {
      T acc = d[c * fx];
      for (int64_t t = 1; t < fx; ++t) acc += d[c * fx + t];
      f[c] += acc;
    }
  } else {
    // Nearest maps runs of consecutive x to one column: add each run in a register, in x order.
    int64_t cur = tx[0].i0;
    T acc = 0;
    for (int64_t x = 0; x < W; ++x) {
      if (tx[x].i0 != cur) {
        f[cur] += acc;
        acc = 0;
        cur = tx[x].i0;
      }
      acc += d[x];
    }
    f[cur] += acc;
  }
}

template <typename T>
void add_scaled(T* __restrict__ dst, T w, const T* __restrict__ src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += w * src[c];
}

#define CK_FC_ARGS(T) const T *d, T *f, const Taps<T> *tx, int64_t fx, int64_t w, int64_t W, bool bilinear
#define CK_AS_ARGS(T) T *dst, T w, const T *src, int64_t n
#define CK_SB_ARGS(T) const T *g, T *dg, int64_t channels, int64_t n, int64_t cs, int64_t np
CK_MULTIVERSION(CK_FLATTEN, fold_columns_cpu, fold_columns, CK_FC_ARGS, d, f, tx, fx, w, W, bilinear)
CK_MULTIVERSION(CK_FLATTEN, add_scaled_cpu, add_scaled, CK_AS_ARGS, dst, w, src, n)
CK_MULTIVERSION(CK_FLATTEN, softmax_backward_cpu, softmax_backward, CK_SB_ARGS, g, dg, channels, n, cs, np)

// Where every input lives and how it maps onto the output grid. Index g < K is expert g, K is gate1, K+1 gate2.
template <typename T>
struct Geometry {
  int64_t B, K, M, N, H, W, S;
  // Channel stride of the CPU row buffers: W padded so that it is an odd multiple of 16 elements; a
  // power-of-two stride would put a pixel's ~30 channels in the same cache sets.
  int64_t RS;
  bool bilinear;
  std::vector<int64_t> h, w;      // [K + 2]
  std::vector<int64_t> offset;    // [K]: where expert k's plane of image 0 starts in the packed experts
  std::vector<int64_t> bstride;   // [K]: from image b's plane to image b + 1's
  std::vector<std::vector<Taps<T>>> ty, tx;  // [K + 2][H], [K + 2][W]
  // Nearest only: the source column of every output column, as a plain index array ([K + 2][W]), and the
  // integer factor f when output column x reads source column x / f exactly (W = f * w), else 0.
  std::vector<std::vector<int64_t>> ix;
  std::vector<int64_t> fx;
  std::vector<T> cx1;  // Nearest only: how many output columns read each native column of gate1
};

template <typename T>
Geometry<T> make_geometry(const at::Tensor& experts, at::IntArrayRef sizes, const at::Tensor& gate1,
                          const at::Tensor& gate2, const at::Tensor& groups, int64_t H, int64_t W,
                          bool bilinear) {
  Geometry<T> g;
  g.B = gate1.size(0);  // a [B * S] (expert-major) experts tensor does not show B
  g.K = static_cast<int64_t>(sizes.size()) / 2;
  g.M = groups.size(0);
  g.N = groups.size(1);
  g.H = H;
  g.W = W;
  g.RS = (W + 15) / 16 * 16;
  if ((g.RS / 16) % 2 == 0) g.RS += 16;
  g.bilinear = bilinear;
  int64_t off = 0;
  for (int64_t k = 0; k < g.K; ++k) off += sizes[2 * k] * sizes[2 * k + 1];
  g.S = off;
  const bool expert_major = experts.dim() == 1;
  off = 0;
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t hw = sizes[2 * k] * sizes[2 * k + 1];
    g.h.push_back(sizes[2 * k]);
    g.w.push_back(sizes[2 * k + 1]);
    g.offset.push_back(expert_major ? g.B * off : off);
    g.bstride.push_back(expert_major ? hw : g.S);
    off += hw;
  }
  g.h.push_back(gate1.size(2));
  g.w.push_back(gate1.size(3));
  g.h.push_back(gate2.size(2));
  g.w.push_back(gate2.size(3));
  g.ty.resize(g.K + 2);
  g.tx.resize(g.K + 2);
  for (int64_t p = 0; p < g.K + 2; ++p) {
    for (int64_t y = 0; y < H; ++y) g.ty[p].push_back(taps<T>(bilinear, y, g.h[p], H));
    for (int64_t x = 0; x < W; ++x) g.tx[p].push_back(taps<T>(bilinear, x, g.w[p], W));
  }
  g.ix.resize(g.K + 2);
  g.fx.assign(g.K + 2, 0);
  for (int64_t p = 0; p < g.K + 2; ++p) {
    for (int64_t x = 0; x < W; ++x) g.ix[p].push_back(g.tx[p][x].i0);
    if (!bilinear && W % g.w[p] == 0) {
      const int64_t f = W / g.w[p];
      bool exact = true;
      for (int64_t x = 0; x < W; ++x) exact = exact && g.ix[p][x] == x / f;
      if (exact) g.fx[p] = f;
    }
  }
  g.cx1.assign(g.w[g.K], T(0));
  if (!bilinear)
    for (int64_t x = 0; x < W; ++x) g.cx1[g.ix[g.K][x]] += 1;
  return g;
}

void check_inputs(const at::Tensor& experts, at::IntArrayRef sizes, const at::Tensor& gate1,
                  const at::Tensor& gate2, const at::Tensor& groups, int64_t H, int64_t W) {
  CK_CHECK_FLOATING(experts);
  TORCH_CHECK(experts.dim() == 1 || experts.dim() == 2,
              "experts must be [B, S] (image-major) or [B * S] (expert-major), got ", experts.dim(), " dims");
  CK_CHECK_DIM(gate1, 4);
  CK_CHECK_DIM(gate2, 4);
  CK_CHECK_DIM(groups, 2);
  CK_CHECK_DTYPE(gate1, experts.scalar_type());
  CK_CHECK_DTYPE(gate2, experts.scalar_type());
  CK_CHECK_DTYPE(groups, at::kLong);
  TORCH_CHECK(sizes.size() >= 4 && sizes.size() % 2 == 0, "expert_sizes must hold (h, w) of K >= 2 experts");
  for (auto s : sizes) TORCH_CHECK(s > 0, "expert_sizes must be positive");
  TORCH_CHECK(H > 0 && W > 0, "height and width must be positive, got ", H, "x", W);
  const int64_t K = static_cast<int64_t>(sizes.size()) / 2, M = groups.size(0), N = groups.size(1);
  TORCH_CHECK(M >= 1 && N >= 1 && N <= K, "groups must be [M, N] with 1 <= N <= K");
  const int64_t B = gate1.size(0);
  TORCH_CHECK(gate2.size(0) == B && (experts.dim() == 1 || experts.size(0) == B), "batch sizes differ");
  int64_t S = 0;
  for (size_t k = 0; k + 1 < sizes.size(); k += 2) S += sizes[k] * sizes[k + 1];
  TORCH_CHECK(experts.dim() == 1 ? experts.numel() == B * S : experts.size(1) == S, "experts has shape ",
              experts.sizes(), " but expert_sizes describe ", S, " elements per image (B = ", B, ")");
  TORCH_CHECK(gate1.size(1) == M * N, "gate1 must have M*N = ", M * N, " channels, got ", gate1.size(1));
  TORCH_CHECK(gate2.size(1) == M, "gate2 must have M = ", M, " channels, got ", gate2.size(1));
  // A loop, not groups.min()/max(): four dispatched ops per call cost more than the check (groups is tiny).
  TORCH_CHECK(groups.is_cpu(), "groups must be on the CPU with the other inputs, got ", groups.device());
  const auto grp = groups.contiguous();
  const int64_t* gi = grp.data_ptr<int64_t>();
  for (int64_t i = 0; i < grp.numel(); ++i)
    TORCH_CHECK(gi[i] >= 0 && gi[i] < K, "groups must index experts 0..", K - 1, ", got ", gi[i]);
}

// Nearest gather of one row: dst[x] = src[ix[x]] for x < W, with straight copies when every source
// column repeats fx times (fx = 1, 2, 4: the common power-of-two upsamplings).
template <typename T>
void gather_row(T* __restrict__ dst, const T* __restrict__ src, const int64_t* ix, int64_t fx, int64_t W) {
  if (fx == 1) {
    std::copy(src, src + W, dst);
  } else if (fx == 2) {
    for (int64_t c = 0; c < W / 2; ++c) dst[2 * c] = dst[2 * c + 1] = src[c];
  } else if (fx == 4) {
    for (int64_t c = 0; c < W / 4; ++c) {
      const T v = src[c];
      dst[4 * c] = v;
      dst[4 * c + 1] = v;
      dst[4 * c + 2] = v;
      dst[4 * c + 3] = v;
    }
  } else {
    for (int64_t x = 0; x < W; ++x) dst[x] = src[ix[x]];
  }
}

// Samples every input along output row y of image b into rows of `buf` (channel stride RS): the K experts,
// then G1 (M*N rows) and G2 (M rows), softmaxed. With nearest upsampling, softmax commutes with sampling
// (which only copies logits), so the gates are softmaxed once per native pixel, image by image, into `nat`,
// whose rows are then gathered; each image's softmax is a pure function of its logits, so a thread that
// starts mid-image computes the same bits as the one that owns the image's start. With bilinear the
// interpolated logits are softmaxed at every output pixel.
template <typename T>
struct RowSampler {
  const Geometry<T>& g;
  const T* E;
  const T* G1;
  const T* G2;
  T* buf;
  T* nat;              // Nearest only: G1 [M*N, hg1*wg1], then G2 [M, hg2*wg2], of image natb
  int64_t natb = -1;
  int64_t key1 = -1, key2 = -1;  // Nearest only: b * h + source row of the gate rows gathered in buf
  // Nearest only: b * h + source row of the expert rows held in erow() (consecutive output rows that read
  // the same source row skip the gather; nothing else writes the sampler's rows).
  std::vector<int64_t> ekey;
  // Nearest only: the sum over output pixels of row y of each G1 channel (importance's per-row terms): the
  // native row weighted by how many output columns read each native column.
  std::vector<T> imp;

  T* erow() const { return buf; }
  T* g1row() const { return buf + g.K * g.RS; }
  T* g2row() const { return buf + (g.K + g.M * g.N) * g.RS; }
  static int64_t rows(const Geometry<T>& geo) { return geo.K + geo.M * geo.N + geo.M; }

  void load(int64_t b, int64_t y) {
    const int64_t W = g.W, RS = g.RS, K = g.K, M = g.M, N = g.N, MN = M * N;
    if (!g.bilinear) {
      if (static_cast<int64_t>(ekey.size()) != K) ekey.assign(K, -1);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t sy = g.ty[k][y].i0, key = b * g.h[k] + sy;
        if (ekey[k] == key) continue;
        const T* src = E + g.offset[k] + b * g.bstride[k] + sy * g.w[k];
        T* dst = erow() + k * RS;
        gather_row(dst, src, g.ix[k].data(), g.fx[k], W);
        ekey[k] = key;
      }
      const int64_t hw1 = g.h[K] * g.w[K], hw2 = g.h[K + 1] * g.w[K + 1];
      if (natb != b) {
        softmax_runs_cpu(G1 + b * MN * hw1, nat, MN, N, hw1, hw1);
        softmax_runs_cpu(G2 + b * M * hw2, nat + MN * hw1, M, M, hw2, hw2);
        natb = b;
      }
      if (gather_gate_rows(nat, b, y, K, MN, key1, g1row())) {
        imp.resize(MN);
        const int64_t w = g.w[K];
        const T* cnt = g.cx1.data();
        for (int64_t c = 0; c < MN; ++c) {
          const T* src = nat + c * hw1 + g.ty[K][y].i0 * w;
          T acc = 0;
          for (int64_t col = 0; col < w; ++col) acc += cnt[col] * src[col];
          imp[c] = acc;
        }
      }
      gather_gate_rows(nat + MN * hw1, b, y, K + 1, M, key2, g2row());
      return;
    }
    // Bilinear: every input interpolated at every output pixel, then the gates softmaxed there.
    for (int64_t k = 0; k < K; ++k) {
      const T* plane = E + g.offset[k] + b * g.bstride[k];
      const Taps<T> ty = g.ty[k][y];
      const Taps<T>* tx = g.tx[k].data();
      T* dst = erow() + k * RS;
      for (int64_t x = 0; x < W; ++x) dst[x] = sample(plane, g.w[k], true, ty, tx[x]);
    }
    for (int64_t c = 0; c < MN + M; ++c) {
      const int64_t p = c < MN ? K : K + 1;
      const int64_t hw = g.h[p] * g.w[p];
      const T* plane = c < MN ? G1 + (b * MN + c) * hw : G2 + (b * M + (c - MN)) * hw;
      const Taps<T> ty = g.ty[p][y];
      const Taps<T>* tx = g.tx[p].data();
      T* dst = g1row() + c * RS;
      for (int64_t x = 0; x < W; ++x) dst[x] = sample(plane, g.w[p], true, ty, tx[x]);
    }
    softmax_runs_cpu(g1row(), g1row(), MN, N, RS, W);
    softmax_runs_cpu(g2row(), g2row(), M, M, RS, W);
  }

  // Nearest only: gathers along the row the `channels` native rows (geometry p, planes of image b's native
  // softmax `G`) that output row y reads. False when they are already there.
  bool gather_gate_rows(const T* G, int64_t b, int64_t y, int64_t p, int64_t channels, int64_t& key, T* dst) {
    const int64_t h = g.h[p], w = g.w[p], sy = g.ty[p][y].i0;
    if (key == b * h + sy) return false;
    key = b * h + sy;
    for (int64_t c = 0; c < channels; ++c)
      gather_row(dst + c * g.RS, G + (c * h + sy) * w, g.ix[p].data(), g.fx[p], g.W);
    return true;
  }
};

// Per-chunk scratch through the torch allocator (so memory profilers see it): `rows` rows of RS, then
// (nearest) one image's native gate softmaxes.
template <typename T>
at::Tensor make_scratch(const Geometry<T>& g, int64_t rows, const at::TensorOptions& options) {
  const int64_t nat = g.bilinear ? 0 : g.M * g.N * g.h[g.K] * g.w[g.K] + g.M * g.h[g.K + 1] * g.w[g.K + 1];
  return at::empty({rows * g.RS + nat}, options);
}

template <typename T>
RowSampler<T> make_sampler(const Geometry<T>& g, const at::Tensor& experts, const at::Tensor& gate1,
                           const at::Tensor& gate2, at::Tensor& scratch, int64_t rows) {
  T* base = scratch.data_ptr<T>();
  return RowSampler<T>{g, experts.data_ptr<T>(), gate1.data_ptr<T>(), gate2.data_ptr<T>(), base, base + rows * g.RS};
}

// Sum of v[0..n) with 8 interleaved partial sums (vectorizable, and the same order on every call).
template <typename T>
T row_sum(const T* v, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t x = 0;
  for (; x + 8 <= n; x += 8)
    for (int l = 0; l < 8; ++l) part[l] += v[x + l];
  for (int l = 0; x < n; ++x, ++l) part[l] += v[x];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

int64_t row_grain(int64_t W) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> gating_forward_cpu(const at::Tensor& experts_,
                                                                  at::IntArrayRef expert_sizes,
                                                                  const at::Tensor& gate1_,
                                                                  const at::Tensor& gate2_,
                                                                  const at::Tensor& groups_, int64_t height,
                                                                  int64_t width, bool bilinear) {
  check_inputs(experts_, expert_sizes, gate1_, gate2_, groups_, height, width);
  const auto experts = experts_.contiguous();
  const auto gate1 = gate1_.contiguous();
  const auto gate2 = gate2_.contiguous();
  const auto groups = groups_.contiguous();
  const int64_t B = gate1.size(0), M = groups.size(0), N = groups.size(1), H = height, W = width;
  auto final_ = ck::new_output({B, 1, H, W}, experts.options());
  auto group_maps = ck::new_output({B, M, H, W}, experts.options());
  auto importance = ck::new_output({B, M, N}, experts.options());


  AT_DISPATCH_FLOATING_TYPES(experts.scalar_type(), "gating_forward_cpu", [&] {
    using T = scalar_t;
    const auto geo = make_geometry<T>(experts, expert_sizes, gate1, gate2, groups, H, W, bilinear);
    const int64_t MN = M * N;
    const int64_t* grp = groups.data_ptr<int64_t>();
    // Per-row partial sums of G1 (importance), summed over rows in a fixed order below. Scratch through the
    // torch allocator, so that memory profilers see it like any tensor.
    const auto imp_rows_t = at::empty({B * H, MN}, experts.options());
    T* imp_rows = imp_rows_t.data_ptr<T>();
    T* out = final_.data_ptr<T>();
    T* gmo = group_maps.data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(W), [&](int64_t begin, int64_t end) {
      const int64_t rows = RowSampler<T>::rows(geo);
      auto scratch = make_scratch(geo, rows, experts.options());
      auto rs = make_sampler(geo, experts, gate1, gate2, scratch, rows);
      const T* e = rs.erow();
      const T* g1 = rs.g1row();
      const T* g2 = rs.g2row();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        rs.load(b, y);
        T* gm = gmo + (b * M * H + y) * W;
        fuse_forward_cpu(e, g1, g2, gm, out + row * W, grp, M, N, geo.RS, H * W, W);
        for (int64_t c = 0; c < MN; ++c) imp_rows[row * MN + c] = bilinear ? row_sum(g1 + c * geo.RS, W) : rs.imp[c];
      }
    });
    T* imp = importance.data_ptr<T>();
    // B*M*N*H additions: too little work to be worth waking the thread pool again.
    for (int64_t u = 0; u < B * MN; ++u) {
      const int64_t b = u / MN, c = u % MN;
      T acc = 0;
      for (int64_t y = 0; y < H; ++y) acc += imp_rows[(b * H + y) * MN + c];
      imp[u] = acc;
    }
  });
  return {final_, group_maps, importance};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gating_backward_cpu(
    const std::optional<at::Tensor>& grad_final_, const std::optional<at::Tensor>& grad_group_maps_,
    const std::optional<at::Tensor>& grad_importance_, const at::Tensor& experts_, at::IntArrayRef expert_sizes,
    const at::Tensor& gate1_, const at::Tensor& gate2_, const at::Tensor& groups_, int64_t height, int64_t width,
    bool bilinear) {
  check_inputs(experts_, expert_sizes, gate1_, gate2_, groups_, height, width);
  const auto experts = experts_.contiguous();
  const auto gate1 = gate1_.contiguous();
  const auto gate2 = gate2_.contiguous();
  const auto groups = groups_.contiguous();
  const int64_t B = gate1.size(0), M = groups.size(0), N = groups.size(1), H = height, W = width;
  const int64_t K = static_cast<int64_t>(expert_sizes.size()) / 2, MN = M * N;
  auto opt = [&](const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
    CK_CHECK_DTYPE(*t, experts.scalar_type());
    return *t;  // any strides: rows are gathered below (an expanded gradient stays unmaterialized)
  };
  const auto gf_t = opt(grad_final_, {B, 1, H, W}, "grad_final");
  const auto ggm_t = opt(grad_group_maps_, {B, M, H, W}, "grad_group_maps");
  auto gimp_t = opt(grad_importance_, {B, M, N}, "grad_importance");
  if (gimp_t.defined()) gimp_t = gimp_t.contiguous();  // [B, M, N]: read per image as a flat array

  auto grad_experts = ck::new_output(experts.sizes(), experts.options());
  auto grad_gate1 = ck::new_output(gate1.sizes(), gate1.options());
  auto grad_gate2 = ck::new_output(gate2.sizes(), gate2.options());

  AT_DISPATCH_FLOATING_TYPES(experts.scalar_type(), "gating_backward_cpu", [&] {
    using T = scalar_t;
    const auto geo = make_geometry<T>(experts, expert_sizes, gate1, gate2, groups, H, W, bilinear);
    const int64_t* grp = groups.data_ptr<int64_t>();
    const T* gf = gf_t.defined() ? gf_t.data_ptr<T>() : nullptr;
    const T* ggm = ggm_t.defined() ? ggm_t.data_ptr<T>() : nullptr;
    const T* gimp = gimp_t.defined() ? gimp_t.data_ptr<T>() : nullptr;

    // Planes of the native-resolution gradients: K experts, then gate1's M*N channels, then gate2's M.
    // geom: which Geometry entry maps the plane; col: its first column in a fold row; row_start: its first
    // row among the image's native rows (pass 2 of the two-pass schedule).
    const int64_t P = K + MN + M;
    std::vector<int64_t> geom(P), col(P), row_start(P + 1, 0);
    T* gE = grad_experts.data_ptr<T>();
    T* gG1 = grad_gate1.data_ptr<T>();
    T* gG2 = grad_gate2.data_ptr<T>();
    int64_t width_sum = 0;
    for (int64_t p = 0; p < P; ++p) {
      geom[p] = p < K ? p : (p < K + MN ? K : K + 1);
      col[p] = width_sum;
      width_sum += geo.w[geom[p]];
      row_start[p + 1] = row_start[p] + geo.h[geom[p]];
    }
    const int64_t rows_per_image = row_start[P];
    // Batch stride of each plane's gradient, and its offset inside image 0.
    auto plane_base = [&](int64_t p, int64_t b) -> T* {
      if (p < K) return gE + geo.offset[p] + b * geo.bstride[p];
      const int64_t hw1 = geo.h[K] * geo.w[K], hw2 = geo.h[K + 1] * geo.w[K + 1];
      if (p < K + MN) return gG1 + (b * MN + (p - K)) * hw1;
      return gG2 + (b * M + (p - K - MN)) * hw2;
    };

    // Folds output row y of image b onto each input's native columns: fold row f ([width_sum]) receives,
    // at col[p] + c, the sum over x (in order) of the gradient the row sends to column c of plane p.
    const int64_t sampler_rows = RowSampler<T>::rows(geo);
    // Rows: the sampler's, then the group maps [M], de [K], dl1 [M*N], dl2 [M], grad_final's row (zeros
    // when absent), fuse_backward's scratch [2] and grad_group_maps' rows [M].
    const int64_t rows = sampler_rows + M + K + MN + M + 3 + M;
    struct RowFolder {
      RowSampler<T> rs;
      T *gm, *de, *dl1, *dl2, *gf_row, *tmp, *ggm_rows;
      // The source of each gathered gradient row (grad_final's, then grad_group_maps' M): an expanded
      // gradient (the backward of a sum) has stride 0 and hands every row the same source, filled once.
      std::vector<const T*> src;
    };
    auto make_folder = [&](at::Tensor& scratch) {
      auto rs = make_sampler(geo, experts, gate1, gate2, scratch, rows);
      const int64_t RS = geo.RS;
      RowFolder r{rs};
      r.gm = rs.buf + sampler_rows * RS;
      r.de = r.gm + M * RS;
      r.dl1 = r.de + K * RS;
      r.dl2 = r.dl1 + MN * RS;
      r.gf_row = r.dl2 + M * RS;
      r.tmp = r.gf_row + RS;
      r.ggm_rows = r.tmp + 2 * RS;
      std::fill(r.gf_row, r.gf_row + W, T(0));
      r.src.assign(1 + M, nullptr);
      return r;
    };
    // Copies n elements at stride sx (an expanded gradient has stride 0: a fill; contiguous: a copy).
    auto strided_row = [](T* dst, const T* src, int64_t sx, int64_t n, const T*& last) {
      if (sx == 0 && src == last) return;  // already filled with src[0]
      last = sx == 0 ? src : nullptr;
      if (sx == 1) {
        std::copy(src, src + n, dst);
      } else if (sx == 0) {
        std::fill(dst, dst + n, src[0]);
      } else {
        for (int64_t x = 0; x < n; ++x) dst[x] = src[x * sx];
      }
    };
    auto fold_row = [&](RowFolder& r, int64_t b, int64_t y, T* f) {
      const int64_t RS = geo.RS;
      r.rs.load(b, y);
      if (gf) {
        const T* src = gf + b * gf_t.stride(0) + y * gf_t.stride(2);
        strided_row(r.gf_row, src, gf_t.stride(3), W, r.src[0]);
      }
      if (ggm) {
        const int64_t sx = ggm_t.stride(3);
        for (int64_t i = 0; i < M; ++i) {
          const T* src = ggm + b * ggm_t.stride(0) + i * ggm_t.stride(1) + y * ggm_t.stride(2);
          strided_row(r.ggm_rows + i * RS, src, sx, W, r.src[1 + i]);
        }
      }
      const T* e = r.rs.erow();
      const T* g1 = r.rs.g1row();
      const T* g2 = r.rs.g2row();
      fuse_forward_cpu(e, g1, g2, r.gm, r.tmp, grp, M, N, RS, RS, W);  // final itself is not needed
      // Nearest: the gate rows receive d loss / d G, and the softmax backward runs once per native gate
      // pixel when the image's rows are all folded (native_softmax_backward).
      fuse_backward_cpu(e, g1, g2, r.gm, grp, K, M, N, r.gf_row, ggm ? r.ggm_rows : nullptr, RS,
                        gimp ? gimp + b * MN : nullptr, r.de, r.dl1, r.dl2, RS, W, r.tmp, !bilinear);
      std::fill(f, f + width_sum, T(0));
      for (int64_t p = 0; p < P; ++p) {
        const Taps<T>* tx = geo.tx[geom[p]].data();
        const T* d = r.de + p * RS;  // de, dl1 and dl2 are consecutive rows, in plane order
        T* fp = f + col[p];  // zeroed above
        fold_columns_cpu(d, fp, tx, geo.fx[geom[p]], geo.w[geom[p]], W, bilinear);
      }
    };
    // The vertical adjoint: native row r of plane p receives w0 * fold row y where tap 0 of y is r, then
    // w1 * fold row y where tap 1 is (bilinear), for y in increasing order. Both schedules below add in
    // exactly this order, so they give the same bits.
    auto add_scaled = [](T* dst, T w, const T* src, int64_t n) { add_scaled_cpu(dst, w, src, n); };

    // Nearest only: image b's gate gradients hold d loss / d G1 and d loss / d G2 summed over the output
    // pixels that read each native pixel (G is constant over them, so this is the same sum of the same
    // per-pixel softmax backward); `nat` holds the image's native softmaxes (RowSampler's layout).
    const int64_t hw1 = geo.h[K] * geo.w[K], hw2 = geo.h[K + 1] * geo.w[K + 1];
    auto native_softmax_backward = [&](int64_t b, const T* nat) {
      softmax_backward_cpu(nat, gG1 + b * MN * hw1, MN, N, hw1, hw1);
      softmax_backward_cpu(nat + MN * hw1, gG2 + b * M * hw2, M, M, hw2, hw2);
    };

    if (B >= at::get_num_threads()) {
      // Enough images for every thread: each image is owned by one thread, which streams its output rows
      // and adds each fold row straight into the native rows it belongs to; no [B*H, width_sum] buffer.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        auto scratch = make_scratch(geo, rows + 1, experts.options());  // + the fold row
        auto r = make_folder(scratch);
        std::vector<T> f(width_sum);
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t p = 0; p < P; ++p) {
            T* dst = plane_base(p, b);
            std::fill(dst, dst + geo.h[geom[p]] * geo.w[geom[p]], T(0));
          }
          for (int64_t y = 0; y < H; ++y) {
            fold_row(r, b, y, f.data());
            for (int64_t p = 0; p < P; ++p) {
              const auto& t = geo.ty[geom[p]][y];
              const int64_t w = geo.w[geom[p]];
              T* base = plane_base(p, b);
              add_scaled(base + t.i0 * w, t.w0, f.data() + col[p], w);
              if (bilinear) add_scaled(base + t.i1 * w, t.w1, f.data() + col[p], w);
            }
          }
          if (!bilinear) native_softmax_backward(b, r.rs.nat);  // the sampler holds image b's softmaxes
        }
      });
      return;
    }

    // Fewer images than threads: pass 1 folds all output rows in parallel into a [B*H, width_sum] buffer
    // (torch allocator: profilers see it); pass 2 gives each native row of each input to one work item.
    const auto fold_t = at::empty({B * H, width_sum}, experts.options());
    T* fold = fold_t.data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(W), [&](int64_t begin, int64_t end) {
      auto scratch = make_scratch(geo, rows, experts.options());
      auto r = make_folder(scratch);
      for (int64_t row = begin; row < end; ++row) fold_row(r, row / H, row % H, fold + row * width_sum);
    });

    // Output rows [lo, hi) of each geometry's native row r (empty when downsampling skips r).
    std::vector<std::vector<int64_t>> lo(K + 2), hi(K + 2);
    for (int64_t g = 0; g < K + 2; ++g) {
      lo[g].assign(geo.h[g], H);
      hi[g].assign(geo.h[g], 0);
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t r : {geo.ty[g][y].i0, geo.ty[g][y].i1}) {
          lo[g][r] = std::min(lo[g][r], y);
          hi[g][r] = std::max(hi[g][r], y + 1);
        }
      }
    }
    at::parallel_for(0, B * rows_per_image, 4, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / rows_per_image, rem = u % rows_per_image;
        const int64_t p = std::upper_bound(row_start.begin(), row_start.end(), rem) - row_start.begin() - 1;
        const int64_t r = rem - row_start[p], g = geom[p], w = geo.w[g];
        T* dst = plane_base(p, b) + r * w;
        std::fill(dst, dst + w, T(0));
        for (int64_t y = lo[g][r]; y < hi[g][r]; ++y) {
          const auto& t = geo.ty[g][y];
          const T* src = fold + (b * H + y) * width_sum + col[p];
          if (t.i0 == r) add_scaled(dst, t.w0, src, w);
          if (bilinear && t.i1 == r) add_scaled(dst, t.w1, src, w);
        }
      }
    });
    if (!bilinear) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> nat(MN * hw1 + M * hw2);
        for (int64_t b = begin; b < end; ++b) {
          softmax_runs_cpu(gate1.data_ptr<T>() + b * MN * hw1, nat.data(), MN, N, hw1, hw1);
          softmax_runs_cpu(gate2.data_ptr<T>() + b * M * hw2, nat.data() + MN * hw1, M, M, hw2, hw2);
          native_softmax_backward(b, nat.data());
        }
      });
    }
  });
  return {grad_experts, grad_gate1, grad_gate2};
}

}  // namespace
}  // namespace gating
}  // namespace ck

TORCH_LIBRARY_IMPL(crowdkernels, CPU, m) {
  m.impl("gating_forward", &ck::gating::gating_forward_cpu);
  m.impl("gating_backward", &ck::gating::gating_backward_cpu);
}
