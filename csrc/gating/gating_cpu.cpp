// Hierarchical gating fusion (HMoDE eq. 1): C++ (OpenMP through at::parallel_for) forward and backward.
//
// Experts arrive packed: `experts` is [B, S], expert k's [h_k, w_k] plane starting at column
// sum_{k' < k} h_k' * w_k' (expert_sizes = [h_0, w_0, h_1, w_1, ...]). Gates are [B, M*N, hg1, wg1] and
// [B, M, hg2, wg2]. Everything is sampled at the [H, W] output pixel as F.interpolate would sample it.
//
// Determinism: the forward writes each output pixel from one thread, and the per-row importance partials are
// summed over rows in a fixed order. The backward runs in two passes so that no two threads ever add to the
// same gradient element: pass 1 (parallel over output rows) folds each output row onto the native columns of
// every input into a private row of a [B*H, sum of widths] buffer; pass 2 (parallel over native rows of every
// input) adds those rows, in increasing output-row order, into the native row that owns them. The bits are
// therefore the same whatever torch.set_num_threads says.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/common.h"
#include "gating/gating.h"

namespace ck {
namespace gating {
namespace {

// Where every input lives and how it maps onto the output grid. Index g < K is expert g, K is gate1, K+1 gate2.
template <typename T>
struct Geometry {
  int64_t B, K, M, N, H, W, S;
  bool bilinear;
  std::vector<int64_t> h, w;      // [K + 2]
  std::vector<int64_t> offset;    // [K]: expert k's first column in the packed [B, S] tensor
  std::vector<std::vector<Taps<T>>> ty, tx;  // [K + 2][H], [K + 2][W]
};

template <typename T>
Geometry<T> make_geometry(const at::Tensor& experts, at::IntArrayRef sizes, const at::Tensor& gate1,
                          const at::Tensor& gate2, const at::Tensor& groups, int64_t H, int64_t W,
                          bool bilinear) {
  Geometry<T> g;
  g.B = experts.size(0);
  g.S = experts.size(1);
  g.K = static_cast<int64_t>(sizes.size()) / 2;
  g.M = groups.size(0);
  g.N = groups.size(1);
  g.H = H;
  g.W = W;
  g.bilinear = bilinear;
  int64_t off = 0;
  for (int64_t k = 0; k < g.K; ++k) {
    g.h.push_back(sizes[2 * k]);
    g.w.push_back(sizes[2 * k + 1]);
    g.offset.push_back(off);
    off += sizes[2 * k] * sizes[2 * k + 1];
  }
  TORCH_CHECK(off == g.S, "experts has ", g.S, " columns but expert_sizes describe ", off);
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
  return g;
}

void check_inputs(const at::Tensor& experts, at::IntArrayRef sizes, const at::Tensor& gate1,
                  const at::Tensor& gate2, const at::Tensor& groups, int64_t H, int64_t W) {
  CK_CHECK_FLOATING(experts);
  CK_CHECK_DIM(experts, 2);
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
  TORCH_CHECK(gate1.size(0) == experts.size(0) && gate2.size(0) == experts.size(0), "batch sizes differ");
  TORCH_CHECK(gate1.size(1) == M * N, "gate1 must have M*N = ", M * N, " channels, got ", gate1.size(1));
  TORCH_CHECK(gate2.size(1) == M, "gate2 must have M = ", M, " channels, got ", gate2.size(1));
  TORCH_CHECK(groups.numel() == 0 || (groups.min().item<int64_t>() >= 0 && groups.max().item<int64_t>() < K),
              "groups must index experts 0..", K - 1);
}

// Samples every input at output pixel (y, x) of image b. Gate softmaxes are reused while, with nearest
// upsampling, the gate pixel does not change along the row (`*_src` remember the last source column).
template <typename T>
struct PixelSampler {
  const Geometry<T>& g;
  const T* E;
  const T* G1;
  const T* G2;
  std::vector<T> e, g1, g2;
  int64_t g1_src = -1, g2_src = -1;

  PixelSampler(const Geometry<T>& geo, const T* experts, const T* gate1, const T* gate2)
      : g(geo), E(experts), G1(gate1), G2(gate2), e(geo.K), g1(geo.M * geo.N), g2(geo.M) {}

  void start_row() { g1_src = g2_src = -1; }

  void load(int64_t b, int64_t y, int64_t x) {
    const int64_t K = g.K, MN = g.M * g.N;
    for (int64_t k = 0; k < K; ++k)
      e[k] = sample(E + b * g.S + g.offset[k], g.w[k], g.bilinear, g.ty[k][y], g.tx[k][x]);
    const bool fresh1 = g.bilinear || g.tx[K][x].i0 != g1_src;
    const bool fresh2 = g.bilinear || g.tx[K + 1][x].i0 != g2_src;
    if (fresh1) {
      const int64_t plane = g.h[K] * g.w[K];
      for (int64_t c = 0; c < MN; ++c)
        g1[c] = sample(G1 + (b * MN + c) * plane, g.w[K], g.bilinear, g.ty[K][y], g.tx[K][x]);
      for (int64_t i = 0; i < g.M; ++i) softmax(g1.data() + i * g.N, g.N);
      g1_src = g.tx[K][x].i0;
    }
    if (fresh2) {
      const int64_t plane = g.h[K + 1] * g.w[K + 1];
      for (int64_t i = 0; i < g.M; ++i)
        g2[i] = sample(G2 + (b * g.M + i) * plane, g.w[K + 1], g.bilinear, g.ty[K + 1][y], g.tx[K + 1][x]);
      softmax(g2.data(), g.M);
      g2_src = g.tx[K + 1][x].i0;
    }
  }
};

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
  const int64_t B = experts.size(0), M = groups.size(0), N = groups.size(1), H = height, W = width;
  auto final_ = ck::new_output({B, 1, H, W}, experts.options());
  auto group_maps = ck::new_output({B, M, H, W}, experts.options());
  auto importance = ck::new_output({B, M, N}, experts.options());

  AT_DISPATCH_FLOATING_TYPES(experts.scalar_type(), "gating_forward_cpu", [&] {
    using T = scalar_t;
    const auto geo = make_geometry<T>(experts, expert_sizes, gate1, gate2, groups, H, W, bilinear);
    const int64_t MN = M * N;
    const int64_t* grp = groups.data_ptr<int64_t>();
    std::vector<T> imp_rows(B * H * MN);
    T* out = final_.data_ptr<T>();
    T* gmo = group_maps.data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(W), [&](int64_t begin, int64_t end) {
      PixelSampler<T> px(geo, experts.data_ptr<T>(), gate1.data_ptr<T>(), gate2.data_ptr<T>());
      std::vector<T> gm(M);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        T* imp = imp_rows.data() + row * MN;
        std::fill(imp, imp + MN, T(0));
        px.start_row();
        for (int64_t x = 0; x < W; ++x) {
          px.load(b, y, x);
          out[row * W + x] = fuse_forward(px.e.data(), px.g1.data(), px.g2.data(), gm.data(), grp, M, N);
          for (int64_t i = 0; i < M; ++i) gmo[((b * M + i) * H + y) * W + x] = gm[i];
          for (int64_t c = 0; c < MN; ++c) imp[c] += px.g1[c];
        }
      }
    });
    T* imp = importance.data_ptr<T>();
    at::parallel_for(0, B * MN, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / MN, c = u % MN;
        T acc = 0;
        for (int64_t y = 0; y < H; ++y) acc += imp_rows[(b * H + y) * MN + c];
        imp[u] = acc;
      }
    });
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
  const int64_t B = experts.size(0), M = groups.size(0), N = groups.size(1), H = height, W = width;
  const int64_t K = static_cast<int64_t>(expert_sizes.size()) / 2, MN = M * N;
  auto opt = [&](const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
    CK_CHECK_DTYPE(*t, experts.scalar_type());
    return t->contiguous();
  };
  const auto gf_t = opt(grad_final_, {B, 1, H, W}, "grad_final");
  const auto ggm_t = opt(grad_group_maps_, {B, M, H, W}, "grad_group_maps");
  const auto gimp_t = opt(grad_importance_, {B, M, N}, "grad_importance");

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
    // geom: which Geometry entry maps the plane; col: its first column in a fold row; out/stride: where
    // its gradient goes.
    const int64_t P = K + MN + M;
    std::vector<int64_t> geom(P), col(P), row_start(P + 1, 0);
    std::vector<T*> out(P);
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
      if (p < K) return gE + b * geo.S + geo.offset[p];
      const int64_t hw1 = geo.h[K] * geo.w[K], hw2 = geo.h[K + 1] * geo.w[K + 1];
      if (p < K + MN) return gG1 + (b * MN + (p - K)) * hw1;
      return gG2 + (b * M + (p - K - MN)) * hw2;
    };

    // Pass 1: fold every output row onto each input's native columns.
    std::vector<T> fold(B * H * width_sum);
    at::parallel_for(0, B * H, row_grain(W), [&](int64_t begin, int64_t end) {
      PixelSampler<T> px(geo, experts.data_ptr<T>(), gate1.data_ptr<T>(), gate2.data_ptr<T>());
      std::vector<T> gm(M), de(K), dl1(MN), dl2(M), ggm_px(M);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        T* f = fold.data() + row * width_sum;
        std::fill(f, f + width_sum, T(0));
        px.start_row();
        for (int64_t x = 0; x < W; ++x) {
          px.load(b, y, x);
          fuse_forward(px.e.data(), px.g1.data(), px.g2.data(), gm.data(), grp, M, N);
          if (ggm)
            for (int64_t i = 0; i < M; ++i) ggm_px[i] = ggm[((b * M + i) * H + y) * W + x];
          fuse_backward(px.e.data(), px.g1.data(), px.g2.data(), gm.data(), grp, K, M, N,
                        gf ? gf[row * W + x] : T(0), ggm ? ggm_px.data() : nullptr,
                        gimp ? gimp + b * MN : nullptr, de.data(), dl1.data(), dl2.data());
          for (int64_t k = 0; k < K; ++k) scatter_row(f + col[k], bilinear, geo.tx[k][x], de[k]);
          for (int64_t c = 0; c < MN; ++c) scatter_row(f + col[K + c], bilinear, geo.tx[K][x], dl1[c]);
          for (int64_t i = 0; i < M; ++i) scatter_row(f + col[K + MN + i], bilinear, geo.tx[K + 1][x], dl2[i]);
        }
      }
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

    // Pass 2: each native row of each input is owned by one work item, which adds its output rows in order.
    at::parallel_for(0, B * rows_per_image, 4, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / rows_per_image, rem = u % rows_per_image;
        const int64_t p = std::upper_bound(row_start.begin(), row_start.end(), rem) - row_start.begin() - 1;
        const int64_t r = rem - row_start[p], g = geom[p], w = geo.w[g];
        T* dst = plane_base(p, b) + r * w;
        std::fill(dst, dst + w, T(0));
        for (int64_t y = lo[g][r]; y < hi[g][r]; ++y) {
          const auto& t = geo.ty[g][y];
          T coef = 0;
          if (t.i0 == r) coef += t.w0;
          if (bilinear && t.i1 == r) coef += t.w1;
          const T* src = fold.data() + (b * H + y) * width_sum + col[p];
          for (int64_t c = 0; c < w; ++c) dst[c] += coef * src[c];
        }
      }
    });
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
