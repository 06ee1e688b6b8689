"""Plain-PyTorch / NumPy oracles for every op, written from the papers' equations, readable first.

They are the ground truth the compiled kernels are tested against, and the fallback where no compiled
kernel exists. Speed does not matter here; clarity does.
"""
from __future__ import annotations

import math

import numpy as np
import torch


# ===================================================================================== density (issue 2)
# (filled in below by the density section)


# ===================================================================================== regions (issue 3)
# L2SM sec. 3.3: dense regions are zoomed by r (bilinear), re-predicted, resized back and multiplied by
# r^2 "to preserve the same counting result". The sampling is defined exactly in DESIGN.md ("Region
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


# ===================================================================================== local counts (issue 5)
