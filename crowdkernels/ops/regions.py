"""Region rescaling for L2SM (Xu et al., "Learn to Scale", ICCV 2019, sec. 3.3 and Figs. 3-4).

L2SM divides the image into K x K regions (`grid_boxes`), selects the dense ones by their mean initial
density D_i (`region_means`), zooms their features by a learned factor r (`scale_regions`), re-predicts
density in the zoomed space, and puts it back resized and multiplied by r^2 so that the count is kept
(`unscale_regions`). Its targets are the heads of each region with their box-relative coordinates
multiplied by r, each keeping its own sigma (`transform_region_targets`, Fig. 4).

Boxes are `[N, 5]` int64 rows (b, y0, x0, h, w): image b, top-left pixel (y0, x0), h x w pixels. Pixel
(i, j) covers [j, j + 1) x [i, i + 1) in (x, y). The sampling is defined exactly in docs/definitions.md ("Region
rescaling"); per axis, output index d samples the source at src = a (d + 0.5) - 0.5 with a = 1/r (zoom) or
a = r (zoom back), clamped to the source as F.interpolate(align_corners=False) clamps.

Gradients reach every tensor input, `scale` included, through the sampling coordinates and the r^2 factor.
The valid extent floor(r h) is piecewise constant in r and contributes no gradient; where a coordinate is
clamped its derivative is 0. At a kink (a coordinate exactly on 0 or on the last sample, e.g. r = 1 exactly)
the derivative is one-sided.

Backends: the C++ kernels on the CPU (deterministic whatever the thread count), the CUDA kernels on a GPU
(scale_regions' backward scatters into `features` with atomics there, so its gradients are not bit-for-bit
reproducible on a GPU), the plain-PyTorch reference in `ops/reference.py` where no compiled kernel exists.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .. import _ext
from . import reference
from ._autograd import register_autograd
from .density import density_maps

__all__ = [
    "grid_boxes",
    "scale_regions",
    "unscale_regions",
    "region_means",
    "region_points",
    "transform_region_targets",
]

# Above this many boxes the pairwise overlap test of unscale_regions runs in row blocks, so that its
# memory stays O(block * N) rather than O(N^2).
_OVERLAP_BLOCK = 1024
_MAX_COORD = 2**62  # grid_boxes' sides: y0 + h and x0 + w of int64 boxes then never overflow


# ----------------------------------------------------------------------------------------------------- checks
def _out_size(out_size) -> tuple[int, int]:
    if isinstance(out_size, Integral) and not isinstance(out_size, bool):
        size = (int(out_size), int(out_size))
    elif (
        isinstance(out_size, (tuple, list))
        and len(out_size) == 2
        and all(isinstance(v, Integral) and not isinstance(v, bool) for v in out_size)
    ):
        size = (int(out_size[0]), int(out_size[1]))
    else:
        raise TypeError(f"out_size must be an int or a pair of ints (Sh, Sw), got {out_size!r}")
    if min(size) < 1:
        raise ValueError(f"out_size must be >= 1 on both axes, got {size}")
    return size


def _check_float4d(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(t.shape)}")


def _check_boxes(boxes, image_shape, device) -> torch.Tensor:
    """Checks boxes [N, 5] (b, y0, x0, h, w) against images of shape (B, H, W); returns them on `device`."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"boxes must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dtype != torch.int64:
        raise TypeError(f"boxes must be int64, got {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must have shape [N, 5] (b, y0, x0, h, w), got {tuple(boxes.shape)}")
    boxes = boxes.to(device)
    if boxes.shape[0] == 0:
        return boxes
    nb, height, width = image_shape
    b, y0, x0, h, w = boxes.unbind(1)
    problems = torch.stack(
        [
            (b < 0) | (b >= nb),
            (h < 1) | (w < 1),
            (y0 < 0) | (x0 < 0) | (y0 + h > height) | (x0 + w > width),
        ]
    )
    if bool(problems.any()):  # one synchronization for the common, valid case
        kind, n = (int(v) for v in problems.nonzero()[0])
        row = tuple(boxes[n].tolist())
        what = [
            f"batch index out of range [0, {nb})",
            "empty box (h and w must be >= 1)",
            f"box outside the {height}x{width} image",
        ][kind]
        raise ValueError(f"boxes[{n}] = (b, y0, x0, h, w) = {row}: {what}")
    return boxes


def _check_scale(scale, n: int, dtype, device) -> torch.Tensor:
    """scale: a tensor (or sequence) of N finite factors r > 0; returns it in `dtype` on `device`
    (differentiably, so that its gradient flows back to the caller's tensor)."""
    if not isinstance(scale, torch.Tensor):
        try:
            scale = torch.as_tensor(scale, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"scale must be a tensor or a sequence of numbers, got {type(scale).__name__}") from exc
    if scale.dtype == torch.bool or scale.is_complex():
        raise TypeError(f"scale must be a real tensor, got {scale.dtype}")
    if scale.dim() != 1 or scale.shape[0] != n:
        raise ValueError(f"scale must have shape [N] with N = {n} (one per box), got {tuple(scale.shape)}")
    scale = scale.to(dtype=dtype, device=device)
    if n and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        bad = (~(torch.isfinite(scale) & (scale > 0))).nonzero()[0, 0]
        raise ValueError(f"scale must be finite and > 0, got scale[{int(bad)}] = {float(scale[bad])}")
    return scale


def _check_no_overlap(boxes: torch.Tensor) -> None:
    """Raises ValueError if two boxes of one image overlap: pairwise on the boxes' device, in row blocks."""
    n = boxes.shape[0]
    if n < 2:
        return
    b, y0, x0, h, w = boxes.unbind(1)
    y1, x1 = y0 + h, x0 + w
    idx = torch.arange(n, device=boxes.device)
    for start in range(0, n, _OVERLAP_BLOCK):
        s = slice(start, start + _OVERLAP_BLOCK)
        hit = (
            (b[s, None] == b[None])
            & (y0[s, None] < y1[None])
            & (y0[None] < y1[s, None])
            & (x0[s, None] < x1[None])
            & (x0[None] < x1[s, None])
            & (idx[s, None] != idx[None])
        )
        if bool(hit.any()):
            i, j = (int(v) for v in hit.nonzero()[0])
            i += start
            raise ValueError(
                f"boxes of one image must not overlap in unscale_regions: boxes[{i}] = {tuple(boxes[i].tolist())} "
                f"and boxes[{j}] = {tuple(boxes[j].tolist())} do"
            )


def _per_point_sigma(sigma, counts: list[int], device) -> torch.Tensor:
    """A float (fixed), one [sum P_b] tensor, or a list of B [P_b] tensors -> [sum P_b] float64."""
    total = sum(counts)
    if isinstance(sigma, Real) and not isinstance(sigma, bool):
        flat = torch.full((total,), float(sigma), dtype=torch.float64, device=device)
    elif isinstance(sigma, torch.Tensor):
        if sigma.dim() != 1 or sigma.shape[0] != total:
            raise ValueError(f"sigma must have shape [{total}] (one value per head of all images), got {tuple(sigma.shape)}")
        flat = sigma
    elif isinstance(sigma, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in sigma):
        if len(sigma) != len(counts):
            raise ValueError(f"sigma must be a list of {len(counts)} tensors (one per image), got {len(sigma)}")
        for b, (s, n) in enumerate(zip(sigma, counts)):
            if s.dim() != 1 or s.shape[0] != n:
                raise ValueError(f"sigma[{b}] must have shape [{n}] (one value per head), got {tuple(s.shape)}")
        flat = torch.cat([s.to(device) for s in sigma]) if sigma else torch.zeros(0, device=device)
    else:
        raise TypeError(
            f"sigma must be a float, a [sum P_b] tensor or a list of B [P_b] tensors, got {type(sigma).__name__}"
        )
    if flat.dtype == torch.bool or flat.is_complex():
        raise TypeError(f"sigma must be a real tensor, got {flat.dtype}")
    flat = flat.detach().to(device=device, dtype=torch.float64)
    if total and not bool((torch.isfinite(flat) & (flat > 0)).all()):
        i = int((~(torch.isfinite(flat) & (flat > 0))).nonzero()[0, 0])
        raise ValueError(f"sigma must be finite and > 0 for every head, got {float(flat[i])} at head {i}")
    return flat


# ------------------------------------------------------------------------------------------------- public API
def grid_boxes(height: int, width: int, k: int) -> torch.Tensor:
    """The K x K non-overlapping division of an image (L2SM sec. 3.3).

    Returns a LongTensor [k*k, 4] of (y0, x0, h, w) in pixels, row-major (region i*k + j is row i, column j).
    Every region but the last of each axis is floor(height / k) x floor(width / k); the last row and column
    take the remainder. Prepend a batch index to get `scale_regions` boxes:
    ``torch.cat([torch.full((k*k, 1), b), grid_boxes(H, W, k)], 1)``.
    """
    for name, v in (("height", height), ("width", width), ("k", k)):
        if not isinstance(v, Integral) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v > _MAX_COORD:  # int64 boxes: y0 + h must not overflow
            raise ValueError(f"{name} must be <= 2^62 (int64 boxes), got {v}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if height < k or width < k:
        raise ValueError(f"height and width must be >= k = {k} (no empty regions), got {height}x{width}")

    def axis(size):
        step = size // k
        start = torch.arange(k, dtype=torch.int64) * step
        length = torch.full((k,), step, dtype=torch.int64)
        length[-1] = size - (k - 1) * step
        return start, length

    y0, h = axis(int(height))
    x0, w = axis(int(width))
    return torch.stack(
        [y0.repeat_interleave(k), x0.repeat(k), h.repeat_interleave(k), w.repeat(k)], dim=1
    )


def scale_regions(features: torch.Tensor, boxes: torch.Tensor, scale, out_size) -> torch.Tensor:
    """Zooms each box of `features` by its factor r (L2SM sec. 3.3: "we scale the feature fb on the selected
    regions accordingly through bilinear upsampling").

    Args:
        features: [B, C, H, W] float32/float64.
        boxes: [N, 5] int64 (b, y0, x0, h, w), inside the image, h, w >= 1; boxes may overlap; N = 0 is valid.
        scale: [N] factors r > 0 (finite); converted to features' dtype and device, differentiably.
        out_size: int or (Sh, Sw) >= 1, the canvas.

    Returns:
        [N, C, Sh, Sw]. For i < floor(r h), j < floor(r w) (cropped to the canvas), out[n, c, i, j] is the
        bilinear sample of features[b, c] at (y0 + (i + 0.5)/r - 0.5, x0 + (j + 0.5)/r - 0.5), clamped to the
        box, i.e. F.interpolate(region, scale_factor=r, mode="bilinear", align_corners=False,
        recompute_scale_factor=False); the rest of the canvas is 0. Differentiable in features and scale.
    """
    _check_float4d(features, "features")
    sh, sw = _out_size(out_size)
    nb, _, height, width = features.shape
    boxes = _check_boxes(boxes, (nb, height, width), features.device)
    scale = _check_scale(scale, boxes.shape[0], features.dtype, features.device)
    if _ext.backend(features.device, "scale_regions") != "reference":
        return torch.ops.crowdkernels.scale_regions(features, boxes, scale, sh, sw)
    return reference.scale_regions_reference(features, boxes, scale, (sh, sw))


def unscale_regions(pred: torch.Tensor, boxes: torch.Tensor, scale, base: torch.Tensor) -> torch.Tensor:
    """Puts re-predicted regions back, resized by 1/r and multiplied by r^2 so that the count is kept
    (L2SM sec. 3.3: "resize the re-predicted density map to the original size of Ri and multiply the density
    on each pixel by r_i^2").

    Args:
        pred: [N, C, Sh, Sw] float32/float64, the re-prediction on the `scale_regions` canvas.
        boxes: [N, 5] int64 (b, y0, x0, h, w); boxes of one image must not overlap (ValueError); N = 0 is valid.
        scale: [N] factors r > 0 with floor(r h) >= 1 and floor(r w) >= 1 (a non-empty valid part).
        base: [B, C, H, W], same dtype as pred: the prediction outside the boxes (the initial density).

    Returns:
        [B, C, H, W]: `base`, except inside box n, where out[b, c, y0 + i, x0 + j] = r^2 x the bilinear sample
        of pred[n, c] at ((i + 0.5) r - 0.5, (j + 0.5) r - 0.5), clamped to the valid
        min(floor(r h), Sh) x min(floor(r w), Sw) part. Differentiable in pred, scale and base.
    """
    _check_float4d(pred, "pred")
    _check_float4d(base, "base")
    if base.dtype != pred.dtype:
        raise TypeError(f"base must have pred's dtype {pred.dtype}, got {base.dtype}")
    if base.device != pred.device:
        raise ValueError(f"base must be on pred's device {pred.device}, got {base.device}")
    nb, channels, height, width = base.shape
    if pred.shape[1] != channels:
        raise ValueError(f"pred must have base's {channels} channels, got pred of shape {tuple(pred.shape)}")
    boxes = _check_boxes(boxes, (nb, height, width), pred.device)
    if pred.shape[0] != boxes.shape[0]:
        raise ValueError(f"pred must have one canvas per box (N = {boxes.shape[0]}), got {pred.shape[0]}")
    scale = _check_scale(scale, boxes.shape[0], pred.dtype, pred.device)
    if boxes.shape[0]:
        r = scale.detach().double()
        empty = (torch.floor(r * boxes[:, 3]) < 1) | (torch.floor(r * boxes[:, 4]) < 1)
        if bool(empty.any()):
            n = int(empty.nonzero()[0, 0])
            raise ValueError(
                f"scale[{n}] = {float(r[n])} leaves box {tuple(boxes[n].tolist())} an empty valid part "
                "(floor(r*h) and floor(r*w) must be >= 1)"
            )
    if boxes.shape[0]:
        # r^2 multiplies the samples: past sqrt(dtype max) it is inf, and inf * 0 = NaN where pred is 0
        limit = math.sqrt(torch.finfo(pred.dtype).max)
        big = scale.detach() > limit
        if bool(big.any()):
            n = int(big.nonzero()[0, 0])
            raise ValueError(
                f"scale[{n}] = {float(scale[n])} is too large for {pred.dtype}: r**2 must fit the dtype "
                f"(r <= {limit:.4g}); use float64"
            )
    _check_no_overlap(boxes)
    if _ext.backend(pred.device, "unscale_regions") != "reference":
        return torch.ops.crowdkernels.unscale_regions(pred, boxes, scale, base)
    return reference.unscale_regions_reference(pred, boxes, scale, base)


def region_means(density: torch.Tensor, k: int) -> torch.Tensor:
    """The mean density D_i = sum_{p in R_i} D(p) / |R_i| of each region of `grid_boxes(H, W, k)`
    (L2SM sec. 3.3, what dense regions are selected by).

    density: [B, 1, H, W] float -> [B, k*k], row-major as `grid_boxes`. Differentiable.
    """
    _check_float4d(density, "density")
    if density.shape[1] != 1:
        raise ValueError(f"density must have one channel [B, 1, H, W], got shape {tuple(density.shape)}")
    if not isinstance(k, Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {k!r}")
    _, _, height, width = density.shape
    boxes = grid_boxes(height, width, k).to(density.device)  # validates k against the size
    # Region row/column of every pixel row/column: the last region takes the remainder.
    row = torch.clamp(torch.arange(height, device=density.device) // (height // k), max=k - 1)
    col = torch.clamp(torch.arange(width, device=density.device) // (width // k), max=k - 1)
    # float32 maps are summed in float64: a region of values near float32's max would overflow its sum
    # (and a mean of tiny values underflow) where the mean itself is representable
    acc = torch.float64 if density.dtype == torch.float32 else density.dtype
    d = density[:, 0].to(acc)
    sums = d.new_zeros(d.shape[0], k, width).index_add_(1, row, d)
    sums = sums.new_zeros(d.shape[0], k, k).index_add_(2, col, sums)
    area = (boxes[:, 2] * boxes[:, 3]).to(acc)
    return (sums.reshape(d.shape[0], k * k) / area).to(density.dtype)


def region_points(points, boxes: torch.Tensor, scale, sigma):
    """The heads of each box, in box-relative coordinates multiplied by r, with their own sigmas: the input
    of the L2SM ground-truth transform (sec. 3.3, Fig. 4), for a whole batch without loops over heads.

    Args:
        points: list of B tensors [P_b, 2] of (x, y) head positions in pixels (pixel (i, j) covers
            [j, j + 1) x [i, i + 1)); image b owns points[b].
        boxes: [N, 5] int64 (b, y0, x0, h, w), b < B, h, w >= 1; boxes may overlap (a head is then in both).
        scale: [N] factors r > 0 (no gradient flows: targets are constants).
        sigma: each head's Gaussian spread in pixels (of the original image, e.g. `knn_sigma(points[b])`):
            a float, one [sum P_b] tensor, or a list of B tensors [P_b].

    Returns:
        (points_list, sigma): N tensors [P_n, 2] and one [sum P_n] float64 tensor, as `density_maps` takes
        them. Head (x, y) of image b belongs to box n when y0 <= y < y0 + h and x0 <= x < x0 + w, and maps to
        ((x - x0) r, (y - y0) r); its sigma is kept ("enlarging the distance between blobs while keeping the
        original peaks", Fig. 4). Coordinates are float64 if any points are, else float32.

    Memory: one [N, sum P_b] boolean membership matrix.
    """
    if isinstance(points, torch.Tensor) or not isinstance(points, (list, tuple)):
        raise TypeError(f"points must be a list of B [P_b, 2] tensors (one per image), got {type(points).__name__}")
    for b, p in enumerate(points):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"points[{b}] must be a tensor [P, 2], got {type(p).__name__}")
        if p.numel() and (p.dim() != 2 or p.shape[1] != 2):
            raise ValueError(f"points[{b}] must have shape [P, 2] of (x, y), got {tuple(p.shape)}")
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"points[{b}] must be finite")
    device = points[0].device if points else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in points) else torch.float32
    # No image size here: boxes are checked against the batch only (h, w >= 1, y0, x0 >= 0).
    boxes = _check_boxes(boxes, (len(points), 2**62, 2**62), device)
    n_boxes = boxes.shape[0]
    scale = _check_scale(scale, n_boxes, torch.float64, device).detach()
    counts = [p.reshape(-1, 2).shape[0] for p in points]
    sig = _per_point_sigma(sigma, counts, device)

    pts = torch.cat([p.reshape(-1, 2).to(device=device, dtype=torch.float64) for p in points] or [torch.zeros(0, 2)])
    pts = pts.to(device=device, dtype=torch.float64)
    image = torch.repeat_interleave(torch.arange(len(points), device=device), torch.tensor(counts, device=device))
    b, y0, x0, h, w = (c[:, None] for c in boxes.unbind(1))
    x, y = pts[None, :, 0], pts[None, :, 1]
    inside = (image[None] == b) & (y0 <= y) & (y < y0 + h) & (x0 <= x) & (x < x0 + w)  # [N, T]
    box_of, head = inside.nonzero().unbind(1)  # sorted by box, then by head
    origin = torch.stack([boxes[:, 2], boxes[:, 1]], dim=1).to(torch.float64)  # (x0, y0)
    moved = ((pts[head] - origin[box_of]) * scale[box_of, None]).to(out_dtype)
    per_box = torch.bincount(box_of, minlength=n_boxes).tolist()
    return list(moved.split(per_box)), sig[head]


def transform_region_targets(points, boxes: torch.Tensor, scale, sigma, out_size) -> torch.Tensor:
    """The L2SM ground truth of zoomed regions (sec. 3.3, Fig. 4): D'_i(p) = sum_m delta(p - r_i p_m) * G_sigma_m(p)
    over the P_i heads of region i, on the `scale_regions` canvas.

    Args:
        points, boxes, scale, sigma: as `region_points` (heads of image b in points[b]; box membership
            y0 <= y < y0 + h, x0 <= x < x0 + w; box-relative coordinates multiplied by r; sigma kept).
        out_size: int or (Sh, Sw) >= 1, the canvas of `scale_regions`.

    Returns:
        [N, 1, Sh, Sw] heads per pixel, float64 if any points are float64, else float32: one
        `density_maps(..., sigma=<per head>, style="exact")` call over all boxes, so every moved head that
        lands on the canvas counts exactly 1 (its Gaussian is renormalized over the canvas) and a head moved
        past the canvas (r h > Sh) is dropped. A head in the last fraction of a pixel of a box, at
        floor(r w) <= (x - x0) r < r w, lands one pixel past the valid floor(r w) x floor(r h) part of the
        zoomed features, where they are 0.
    """
    sh, sw = _out_size(out_size)
    moved, sig = region_points(points, boxes, scale, sigma)
    if not moved:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in points) else torch.float32
        device = points[0].device if points else torch.device("cpu")
        return torch.zeros(0, 1, sh, sw, dtype=dtype, device=device)
    return density_maps(moved, (sh, sw), sigma=sig, style="exact")


# ------------------------------------------------------------------------------------------------------- fake
# The kernels return contiguous tensors whatever the inputs' strides: new_empty(shape), not empty_like.
def _scale_regions_fake(features, boxes, scale, out_h, out_w):
    return features.new_empty(boxes.shape[0], features.shape[1], out_h, out_w)


def _scale_regions_backward_fake(grad, features, boxes, scale):
    return features.new_empty(features.shape), scale.new_empty(scale.shape)


def _unscale_regions_fake(pred, boxes, scale, base):
    return base.new_empty(base.shape)


def _unscale_regions_backward_fake(grad, pred, boxes, scale):
    return pred.new_empty(pred.shape), scale.new_empty(scale.shape), grad.new_empty(grad.shape)


if _ext.compiled():
    torch.library.register_fake("crowdkernels::scale_regions")(_scale_regions_fake)
    torch.library.register_fake("crowdkernels::scale_regions_backward")(_scale_regions_backward_fake)
    torch.library.register_fake("crowdkernels::unscale_regions")(_unscale_regions_fake)
    torch.library.register_fake("crowdkernels::unscale_regions_backward")(_unscale_regions_backward_fake)


# --------------------------------------------------------------------------------------------------- autograd
def register_regions_autograd(namespace: str, ops, lib=None) -> None:
    """The autograd formulas of ``<namespace>::scale_regions`` and ``::unscale_regions``: their backward kernels
    (``ops.scale_regions_backward``, ``ops.unscale_regions_backward``) give the gradients of every tensor
    input, ``scale`` included. Registered for crowdkernels' own ops below, and by the tests for the CUDA
    kernels they run on the CPU (python_tests/cuda_emulation.py) under another namespace.

    scale_regions_backward(grad, features, boxes, scale) -> (grad_features, grad_scale);
    unscale_regions_backward(grad, pred, boxes, scale) -> (grad_pred, grad_scale, grad_base).
    """
    register_autograd(f"{namespace}::scale_regions", ops.scale_regions_backward, saved=(0, 1, 2), grads_of=(0, 2),
                      lib=lib)
    register_autograd(f"{namespace}::unscale_regions", ops.unscale_regions_backward, saved=(0, 1, 2),
                      grads_of=(0, 2, 3), lib=lib)


if _ext.compiled():
    register_regions_autograd("crowdkernels", torch.ops.crowdkernels)
