"""Plain-PyTorch / NumPy oracles for every op, written from the papers' equations, readable first.

They are the ground truth the compiled kernels are tested against, and the fallback where no compiled
kernel exists. Speed does not matter here; clarity does.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch


# ===================================================================================== density (issue 2)
# L2SM sec. 3.2: D(p) = sum_i delta(p - p_i) * G_sigma_i, with the geometry-adaptive spread
# sigma_i = beta * mean_{j in kNN(i)} d_ij (MCNN/CSRNet; beta = 0.3, k = 3). HMoDE sec. III-D uses the
# same construction ("convolving Gaussian kernels at head centers"). The three styles differ only in where
# each Gaussian is centred, how far it reaches, and how it is normalized; see docs/definitions.md, "Density maps".

DENSITY_STYLES = ("exact", "csrnet", "matlab")


def knn_sigma_reference(points: torch.Tensor, k: int = 3, beta: float = 0.3, lone: float = float("nan")):
    """Brute-force geometry-adaptive sigma: beta * mean Euclidean distance to the k nearest *other* points
    (fewer when the image has <= k points; `lone` when it has none). points: [N, 2] (x, y) -> [N] float64.
    O(N^2) memory: an oracle, not for large N. Distances are hypot(dx, dy), which neither under- nor
    overflows where dx^2 + dy^2 would (points 1e-300 or 1e200 apart)."""
    pts = points.detach().to(torch.float64).cpu()
    n = pts.shape[0]
    out = torch.full((n,), float(lone), dtype=torch.float64)
    kk = min(k, n - 1)
    if kk < 1:
        return out
    diff = pts[:, None, :] - pts[None, :, :]
    d = torch.hypot(diff[..., 0], diff[..., 1])
    d.fill_diagonal_(float("inf"))  # a point is not its own neighbour; duplicates (d = 0) are
    nearest = torch.sort(d, dim=1).values[:, :kk]
    return beta * nearest.mean(dim=1)


def _gauss(offsets: np.ndarray, sigma: float) -> np.ndarray:
    """exp(-d^2 / (2 sigma^2)) at integer offsets. A sigma whose square underflows (sigma < ~1e-154,
    0 included) is a unit impulse, the limit; one whose square overflows gives 1 everywhere."""
    a = 0.5 / (sigma * sigma) if sigma * sigma > 0 else math.inf
    if math.isinf(a):
        return (offsets == 0).astype(np.float64)
    return np.exp(-a * offsets.astype(np.float64) ** 2)


_DIRECT_TERMS = 2**20  # scipy-style normalizers up to this many terms a side are summed term by term


@functools.lru_cache(maxsize=4096)
def _gauss_window_sum(sigma: float, radius: float) -> float:
    """sum_{d=-R}^{R} exp(-d^2 / (2 sigma^2)), R = radius (a whole number, possibly huge or inf): the
    normalizer of scipy.ndimage.gaussian_filter's 1-D weights, in bounded time and memory.

    Terms past d = sqrt(746 * 2 sigma^2) are below the smallest double and left out. Up to 2^20 terms a
    side, the rest are summed exactly rounded (math.fsum). Past that (sigma > ~27000 px), the midpoint
    Euler-Maclaurin formula: with a = 1 / (2 sigma^2), x = R + 1/2, u = x sqrt(a), f = exp(-u^2),
    sum = sqrt(pi / a) erf(u) - [f'(x) - f'(-x)] / 24 + 7 [f'''(x) - f'''(-x)] / 5760 + E, where the next
    term is ~1e-3 a^3 of the sum (< 1e-30 here) and the rest of E is rounding.
    """
    a = 0.5 / (sigma * sigma) if sigma * sigma > 0 else math.inf
    if math.isinf(a):
        return 1.0  # a unit impulse
    q = math.sqrt(746.0 / a) if a > 0 else math.inf  # 746 / a overflows for a subnormal a
    reach = math.ceil(q) if math.isfinite(q) else math.inf
    n = min(radius, reach)
    if n <= _DIRECT_TERMS:
        d = np.arange(1, int(n) + 1, dtype=np.float64)
        return 1.0 + 2.0 * math.fsum(np.exp(-a * d * d).tolist())
    if a == 0:
        return math.inf  # sigma^2 overflows: every term is 1
    x = radius + 0.5
    u = x * math.sqrt(a)
    f = math.exp(-u * u) if u < 40 else 0.0
    correction = f * x * a * (1 / 6 + 7 / 240 * a - 7 / 360 * a * u * u) if f > 0 else 0.0
    return math.sqrt(math.pi / a) * math.erf(u) + correction


def _splat_reference(points: np.ndarray, sigmas: np.ndarray, size, style: str, truncate: float,
                     kernel_size: int) -> np.ndarray:
    """Windowed NumPy splatting of one image's points at full resolution (float64 [H, W])."""
    H, W = size
    out = np.zeros((H, W), dtype=np.float64)
    for (x, y), s in zip(points.tolist(), sigmas.tolist()):
        if style in ("exact", "csrnet"):
            cy, cx = math.floor(y), math.floor(x)  # the pixel holding the point (csrnet: already integral)
            radius = float(np.floor(truncate * s + 0.5))  # scipy.ndimage.gaussian_filter's radius (maybe inf)
            r = int(min(radius, H + W))  # the window, clipped to the image (it may reach far beyond)
            y0, y1 = max(cy - r, 0), min(cy + r, H - 1)
            x0, x1 = max(cx - r, 0), min(cx + r, W - 1)
            wy = _gauss(np.arange(y0, y1 + 1) - cy, s)
            wx = _gauss(np.arange(x0, x1 + 1) - cx, s)
            if style == "exact":
                # renormalized over the in-image part of the window: each point contributes exactly 1
                wy, wx = wy / wy.sum(), wx / wx.sum()
            else:
                # scipy: 1-D weights normalized over the full window, mode='constant': mass past the border is lost
                full = _gauss_window_sum(s, radius)
                wy, wx = wy / full, wx / full
            out[y0:y1 + 1, x0:x1 + 1] += np.outer(wy, wx)
        else:  # matlab: MCNN get_density_map_gaussian.m / SASNet prepare_dataset.py
            cy = min(max(abs(math.floor(y)), 1), H) - 1
            cx = min(max(abs(math.floor(x)), 1), W) - 1
            h = kernel_size // 2
            y0, y1 = max(cy - h, 0), min(cy + h, H - 1)
            x0, x1 = max(cx - h, 0), min(cx + h, W - 1)
            # fspecial('gaussian', [hh, ww], sigma): centred on the (possibly truncated) window itself
            hh, ww = y1 - y0 + 1, x1 - x0 + 1
            oy = np.arange(hh) - (hh - 1) / 2.0
            ox = np.arange(ww) - (ww - 1) / 2.0
            # exp(-(d^2 - min d^2) / (2 s^2)): the same kernel once normalized, whose largest value is 1,
            # so a tiny sigma gives the limit (the 1, 2 or 4 pixels nearest the centre share the point)
            # where exp(-d^2 / (2 s^2)) would underflow to an all-zero kernel
            d2 = oy[:, None] ** 2 + ox[None, :] ** 2
            d2 = d2 - d2.min()
            two_var = 2.0 * s * s
            with np.errstate(over="ignore"):  # d2 / two_var = inf for a subnormal two_var: exp(-inf) = 0
                g = np.exp(-d2 / two_var) if two_var > 0 else (d2 == 0).astype(np.float64)
            g[g < np.finfo(np.float64).eps * g.max()] = 0
            out[y0:y1 + 1, x0:x1 + 1] += g / g.sum()
    return out


def sum_pool_reference(density: torch.Tensor, stride: int) -> torch.Tensor:
    """[..., H, W] -> [..., ceil(H/s), ceil(W/s)]: sums of s x s blocks (partial at the edges), so the
    count is kept exactly."""
    if stride == 1:
        return density
    H, W = density.shape[-2:]
    Hs, Ws = -(-H // stride), -(-W // stride)
    # block (i, j) gathers rows i*s .. i*s+s-1 and the same columns: index sums, not a padded copy (a
    # stride of 2^62 cannot be padded to)
    rows = torch.arange(H, device=density.device) // stride
    cols = torch.arange(W, device=density.device) // stride
    out = density.new_zeros(*density.shape[:-2], Hs, W).index_add_(-2, rows, density)
    return out.new_zeros(*density.shape[:-2], Hs, Ws).index_add_(-1, cols, out)


def density_prepare_reference(points: torch.Tensor, offsets: torch.Tensor, height: int, width: int, style: int):
    """The point set each style splats (docs/definitions.md, "Density maps"), image by image.

    points: [T, 2] (x, y) of B images, offsets: [B + 1]. style 0 (exact): the in-image points, in order
    (a head outside the image is not in it); 1 (csrnet): those moved to their pixel (floor), the first of
    the points sharing a pixel kept, row-major per image as the classic recipe's np.nonzero lists them;
    2 (matlab): every point. Returns (points [T', 2], offsets [B + 1], index [T']: kept input rows).
    """
    bounds = offsets.tolist()
    rows, out_off = [], [0]
    for b in range(len(bounds) - 1):
        kept = []
        for i in range(bounds[b], bounds[b + 1]):
            x, y = float(points[i, 0]), float(points[i, 1])
            if style == 2 or (0 <= x < width and 0 <= y < height):
                kept.append(i)
        if style == 1:
            first = {}
            for i in kept:
                first.setdefault(math.floor(float(points[i, 1])) * width + math.floor(float(points[i, 0])), i)
            kept = [first[key] for key in sorted(first)]
        rows += kept
        out_off.append(len(rows))
    index = torch.tensor(rows, dtype=torch.int64, device=points.device)
    kept_pts = points[index]
    if style == 1:
        kept_pts = torch.floor(kept_pts)
    return kept_pts, torch.tensor(out_off, dtype=torch.int64, device=points.device), index


def density_map_reference(points, size, *, sigma="adaptive", k=3, beta=0.3, truncate=4.0, style="exact",
                          kernel_size=15, stride=1) -> torch.Tensor:
    """The density map of one image, from the definitions in docs/definitions.md, as float64 [ceil(H/s), ceil(W/s)].

    points: [N, 2] (x, y) pixel coordinates, pixel (i, j) covering [j, j+1) x [i, i+1); size: (H, W).
    sigma: "adaptive" (knn_sigma_reference; a lone point gets mean(H, W) / 4, the classic rule;
    matlab: 4.0), a float, or an [N] tensor.
    """
    H, W = size
    pts = torch.as_tensor(points).detach().to(torch.float64).cpu().reshape(-1, 2)
    if isinstance(sigma, torch.Tensor):
        sig = sigma.detach().to(torch.float64).cpu().reshape(-1)
    else:
        sig = None
    if style in ("exact", "csrnet"):
        # points outside the image are dropped, not clipped
        keep = (pts[:, 0] >= 0) & (pts[:, 0] < W) & (pts[:, 1] >= 0) & (pts[:, 1] < H)
        pts = pts[keep]
        sig = sig[keep] if sig is not None else None
    if style == "csrnet":
        # the classic recipe rasterizes heads to pixels (int(y), int(x)): coincident heads collapse
        # into one; np.nonzero then lists them in row-major order
        pix = torch.floor(pts)
        key = pix[:, 1] * W + pix[:, 0]
        first = {}
        for i, kv in enumerate(key.tolist()):
            if kv not in first:
                first[kv] = i
        order = sorted(first.items())
        idx = torch.tensor([i for _, i in order], dtype=torch.long)
        pts = pix[idx] if len(idx) else pix[:0]
        sig = sig[idx] if sig is not None else None
    if sig is None:
        if sigma == "adaptive":
            if style == "matlab":
                sig = torch.full((pts.shape[0],), 4.0, dtype=torch.float64)
            else:
                sig = knn_sigma_reference(pts, k, beta, lone=(H + W) / 8.0)  # mean(H, W) / 4
        else:
            sig = torch.full((pts.shape[0],), float(sigma), dtype=torch.float64)
    full = torch.from_numpy(_splat_reference(pts.numpy(), sig.numpy(), (H, W), style, truncate, kernel_size))
    return sum_pool_reference(full, stride)



# ===================================================================================== regions (issue 3)
# L2SM sec. 3.3: dense regions are zoomed by r (bilinear), re-predicted, resized back and multiplied by
# r^2 "to preserve the same counting result". The sampling is defined exactly in docs/definitions.md ("Region
# rescaling"): per axis, output index d samples the source at src = a * (d + 0.5) - 0.5 (a = 1/r to zoom
# in, a = r to zoom back), clamped to the source as F.interpolate(align_corners=False) clamps.


def _lerp_axis(a: torch.Tensor, n_out: int, n_src: int):
    """The neighbours and weights of `n_out` samples along an axis of `n_src` source samples.

    Differentiable in `a` (a 0-d tensor): torch.clamp passes no gradient where the coordinate is clamped.
    """
    d = torch.arange(n_out, dtype=a.dtype, device=a.device)
    src = (a * (d + 0.5) - 0.5).clamp(0, n_src - 1)
    i0 = src.detach().floor().long().clamp(max=n_src - 1)
    i1 = (i0 + 1).clamp(max=n_src - 1)
    return i0, i1, src - i0.to(src.dtype)


def _bilinear(img: torch.Tensor, ys, xs) -> torch.Tensor:
    """Bilinear samples of img[C, h, w] on the grid given by the row and column tables of `_lerp_axis`."""
    (y0, y1, ly), (x0, x1, lx) = ys, xs
    ly, lx = ly[:, None], lx[None, :]
    top = img[:, y0][:, :, x0] * (1 - lx) + img[:, y0][:, :, x1] * lx
    bottom = img[:, y1][:, :, x0] * (1 - lx) + img[:, y1][:, :, x1] * lx
    return top * (1 - ly) + bottom * ly


def scale_regions_reference(features, boxes, scale, out_size):
    """features [B, C, H, W], boxes [N, 5] (b, y0, x0, h, w), scale [N], out_size (Sh, Sw) -> [N, C, Sh, Sw].

    Box n zoomed by r = scale[n]: out[n, c, i, j] = features[b, c] sampled at (y0 + (i + 0.5)/r - 0.5,
    x0 + (j + 0.5)/r - 0.5) for i < floor(r*h), j < floor(r*w) (cropped to the canvas); 0 elsewhere.
    """
    sh, sw = out_size
    _, c, _, _ = features.shape
    out = []
    for n, (b, y0, x0, h, w) in enumerate(boxes.tolist()):
        r = scale[n]
        vh = min(math.floor(float(r.detach()) * h), sh)
        vw = min(math.floor(float(r.detach()) * w), sw)
        region = features[b, :, y0 : y0 + h, x0 : x0 + w]
        zoomed = _bilinear(region, _lerp_axis(1 / r, vh, h), _lerp_axis(1 / r, vw, w))
        out.append(torch.nn.functional.pad(zoomed, (0, sw - vw, 0, sh - vh)))
    if not out:
        return features.new_zeros(0, c, sh, sw)
    return torch.stack(out)


def unscale_regions_reference(pred, boxes, scale, base):
    """pred [N, C, Sh, Sw], boxes [N, 5], scale [N], base [B, C, H, W] -> [B, C, H, W].

    L2SM sec. 3.3: the re-prediction resized back to the box and multiplied by r^2. Inside box n,
    out[b, c, y0 + i, x0 + j] = r^2 * pred[n, c] sampled at ((i + 0.5) r - 0.5, (j + 0.5) r - 0.5), clamped to
    the valid min(floor(r*h), Sh) x min(floor(r*w), Sw) part; `base` elsewhere.
    """
    _, _, sh, sw = pred.shape
    out = base.clone()
    for n, (b, y0, x0, h, w) in enumerate(boxes.tolist()):
        r = scale[n]
        vh = min(math.floor(float(r.detach()) * h), sh)
        vw = min(math.floor(float(r.detach()) * w), sw)
        if vh == 0 or vw == 0:
            out[b, :, y0 : y0 + h, x0 : x0 + w] = 0
            continue
        valid = pred[n, :, :vh, :vw]
        out[b, :, y0 : y0 + h, x0 : x0 + w] = r**2 * _bilinear(valid, _lerp_axis(r, h, vh), _lerp_axis(r, w, vw))
    return out


def grid_boxes_reference(height: int, width: int, k: int) -> torch.Tensor:
    """The K x K division of L2SM sec. 3.3 as [k*k, 4] (y0, x0, h, w), row-major; the last row and column
    take the remainder."""
    rows = [(i * (height // k), height // k if i < k - 1 else height - (k - 1) * (height // k)) for i in range(k)]
    cols = [(j * (width // k), width // k if j < k - 1 else width - (k - 1) * (width // k)) for j in range(k)]
    return torch.tensor([(y0, x0, h, w) for y0, h in rows for x0, w in cols], dtype=torch.int64)


def region_means_reference(density: torch.Tensor, k: int) -> torch.Tensor:
    """L2SM sec. 3.3: D_i = sum_{p in R_i} D(p) / |R_i| over the K x K regions. density [B, 1, H, W] -> [B, k*k]."""
    _, _, height, width = density.shape
    means = [density[:, 0, y0 : y0 + h, x0 : x0 + w].mean(dim=(1, 2)) for y0, x0, h, w in grid_boxes_reference(height, width, k).tolist()]
    return torch.stack(means, dim=1)


def transform_region_targets_reference(points, boxes, scale, sigma, out_size):
    """L2SM sec. 3.3, Fig. 4: D'_i(p) = sum_m delta(p - r_i * p_m) * G_sigma_m(p) over the heads of box i.

    points: list of B tensors [P_b, 2] (x, y); sigma: list of B tensors [P_b]. A head belongs to box
    (b, y0, x0, h, w) when y0 <= y < y0 + h and x0 <= x < x0 + w; its box-relative coordinates are multiplied
    by r and it keeps its sigma. Returns [N, 1, Sh, Sw], one head at a time through the density reference.
    """
    sh, sw = out_size
    maps = []
    for n, (b, y0, x0, h, w) in enumerate(boxes.tolist()):
        r = float(scale[n])
        heads, sigmas = [], []
        for (x, y), s in zip(points[b].tolist(), sigma[b].tolist()):
            if y0 <= y < y0 + h and x0 <= x < x0 + w:
                heads.append(((x - x0) * r, (y - y0) * r))
                sigmas.append(s)
        pts = torch.tensor(heads, dtype=torch.float64).reshape(-1, 2)
        maps.append(density_map_reference(pts, (sh, sw), sigma=torch.tensor(sigmas, dtype=torch.float64), style="exact"))
    if not maps:
        return torch.zeros(0, 1, sh, sw, dtype=torch.float64)
    return torch.stack(maps)[:, None]



# ===================================================================================== gating (issue 4)
def hierarchical_gating(experts, gate1_logits, gate2_logits, groups, size, upsample="nearest"):
    """HMoDE eq. 1, eagerly: E_out = sum_i G2_i * sum_j G1_ij * E_ij.

    experts: list of K tensors [B, 1, h_k, w_k]; gate1_logits: [B, M*N, hg, wg] (group i owns channels
    i*N .. i*N+N-1); gate2_logits: [B, M, hg', wg']; groups: LongTensor [M, N] of expert indices; size: (H, W).
    Every input is first brought to (H, W) by F.interpolate(mode=upsample) (the gates as logits, so with
    "bilinear" the softmax is taken of the interpolated logits; with "nearest" the order does not matter).
    Returns (final [B, 1, H, W], group_maps [B, M, H, W], importance [B, M, N]): importance[b, i, j] is the
    sum over the output pixels of G1_ij, the expert-importance surrogate of sec. III-B-2.
    """
    H, W = size
    kwargs = {"align_corners": False} if upsample == "bilinear" else {}

    def up(t):
        return torch.nn.functional.interpolate(t, size=(H, W), mode=upsample, **kwargs)

    E = [up(e) for e in experts]  # K x [B, 1, H, W]
    M, N = groups.shape
    B = E[0].shape[0]
    # G1: softmax over the N maps of each group; G2: softmax over the M groups (pixel-wise, sec. III-B-1).
    G1 = torch.softmax(up(gate1_logits).reshape(B, M, N, H, W), dim=2)
    G2 = torch.softmax(up(gate2_logits), dim=1)
    # gathered by tensor indexing, not by reading the indices in Python, so that the export can trace it
    E_ij = torch.cat(E, dim=1)[:, groups.reshape(-1)].reshape(B, M, N, H, W)  # [B, M, N, H, W]
    group_maps = (G1 * E_ij).sum(dim=2)  # eq. 1, inner sum over j
    final = (G2 * group_maps).sum(dim=1, keepdim=True)  # eq. 1, outer sum over i
    importance = G1.sum(dim=(-2, -1))
    return final, group_maps, importance



# ===================================================================================== local counts (issue 5)
def local_counts(pred: torch.Tensor, target: torch.Tensor, window_h: int, window_w: int, keep_partial: bool = True):
    """Window sums of pred, of target and of the pixel-wise squared error, for [B, H, W] maps.

    HMoDE sec. III-C: X (local counting map) and Xg integrate the density over non-overlapping windows; the
    local error map R integrates the pixel-wise squared error over the same windows. Windows are row-major;
    `keep_partial` keeps the windows cut by the right/bottom edge, otherwise they are ignored (AvgPool2d).
    Returns three [B, R] tensors in the input dtype (accumulated in float32 at least).
    """
    B, H, W = pred.shape
    acc = torch.promote_types(pred.dtype, torch.float32)
    p, t = pred.to(acc), target.to(acc)
    nh = -(-H // window_h) if keep_partial else H // window_h
    nw = -(-W // window_w) if keep_partial else W // window_w
    out = []
    for image in (p, t, (p - t) ** 2):
        counts = image.new_zeros(B, nh, nw)
        for wr in range(nh):
            for wc in range(nw):
                window = image[:, wr * window_h:(wr + 1) * window_h, wc * window_w:(wc + 1) * window_w]
                counts[:, wr, wc] = window.sum(dim=(1, 2))
        out.append(counts.reshape(B, nh * nw).to(pred.dtype))
    return tuple(out)


def relative_local_count_loss(pred_counts: torch.Tensor, target_counts: torch.Tensor, sq_error: torch.Tensor,
                              num_hard: int, num_sublists: int, pairs: str) -> torch.Tensor:
    """HMoDE eq. 2 per image, one image at a time, from [B, R] window counts. Returns [B].

    The S = min(num_hard, R) windows with the largest squared error are taken (ties: lower window index
    first), ranked by target count, descending (ties: lower window index first), giving the list
    L_X = x_1..x_S of predicted counts. Sub-list i holds x_i, x_{i+T}, x_{i+2T}, ... (T = num_sublists).
    pairs="adjacent": sum over each sub-list of max(0, x_{j+T} - x_j) (eq. 2);
    pairs="all": sum over every pair j < k of a sub-list of max(0, x_k - x_j) (the released code).
    """
    B, R = pred_counts.shape
    S, T = min(num_hard, R), num_sublists
    losses = []
    for b in range(B):
        errors = sq_error[b].tolist()
        hard = sorted(range(R), key=lambda r: (-errors[r], r))[:S]
        targets = target_counts[b].tolist()
        ranked = sorted(hard, key=lambda r: (-targets[r], r))
        x = [pred_counts[b, r] for r in ranked]
        loss = 0 * pred_counts[b].sum()  # stays in the graph when no pair exists (S <= T)
        for i in range(T):
            sub = x[i::T]
            for j in range(len(sub)):
                partners = [j + 1] if pairs == "adjacent" else range(j + 1, len(sub))
                for k in partners:
                    if k < len(sub):
                        loss = loss + torch.relu(sub[k] - sub[j])  # no gradient at x_k == x_j: order kept
        losses.append(loss)
    return torch.stack(losses)
