"""Geometry-adaptive Gaussian density maps (L2SM sec. 3.2; HMoDE sec. III-D).

The ground truth of density-map crowd counting: D(p) = sum_i delta(p - p_i) * G_sigma_i, one Gaussian per
annotated head, with the geometry-adaptive spread sigma_i = beta * (mean distance from head i to its k
nearest neighbours) (k = 3, beta = 0.3 in MCNN/CSRNet and their many copies).

Public API (the definitions: docs/definitions.md, "Density maps"):

- ``knn_sigma(points, k=3, beta=0.3)``: [N] geometry-adaptive sigmas, exact kNN on a uniform grid
  (O(N) memory, never an N x N matrix).
- ``density_map(points, size, ...)``: one [H, W] map (or [ceil(H/s), ceil(W/s)] with ``stride=s``).
- ``density_maps(points_list, size, ...)``: a ragged batch, [B, 1, H, W], in one pass of the kernels.

Coordinates are (x, y) in pixels, pixel (i, j) covering [j, j+1) x [i, i+1). Units of the map: heads per
pixel, so ``map.sum()`` is the count (minus whatever a style loses at borders).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from .. import _ext
from . import reference

__all__ = ["density_map", "density_maps", "knn_sigma", "STYLES"]

STYLES = ("exact", "csrnet", "matlab")
_STYLE_CODE = {name: code for code, name in enumerate(STYLES)}
MAX_K = 64  # the kNN kernels keep the k best candidates in a fixed-size register array
# Image sides up to 2^31 - 1 px, strides and kernel sizes up to 2^62: the kernels' int64 pixel arithmetic
# (H + W, H + stride - 1, centre +- kernel_size / 2, ...) never overflows below these. A stride or a
# window larger than the image is clipped to it, so these bounds take nothing valid away.
MAX_SIDE = 2**31 - 1
_MAX_STEP = 2**62


# ----------------------------------------------------------------------------------------------------- checks
def _int_arg(name: str, value, minimum: int, maximum: int | None = None) -> int:
    # `type(...) is int` first: the ABC check costs ~0.4 us, and a density_map call makes a dozen of them
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _positive_float_arg(name: str, value) -> float:
    if type(value) not in (float, int) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _size_arg(size) -> tuple[int, int]:
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    if type(size) not in (tuple, list) and (not isinstance(size, Sequence) or isinstance(size, str)) or len(size) != 2:
        raise TypeError(f"size must be a pair (H, W) of positive ints, got {size!r}")
    return _int_arg("size[0] (height)", size[0], 1, MAX_SIDE), _int_arg("size[1] (width)", size[1], 1, MAX_SIDE)


def _points_arg(points, name: str, check_finite: bool = True) -> torch.Tensor:
    if not isinstance(points, torch.Tensor):
        try:
            points = torch.as_tensor(points)
        except Exception as exc:
            raise TypeError(f"{name} must be a tensor of shape [N, 2], got {type(points).__name__}") from exc
    if points.dtype == torch.bool or points.is_complex():
        raise TypeError(f"{name} must be a floating or integer tensor, got dtype {points.dtype}")
    if points.numel() == 0:
        return points.reshape(0, 2)
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] of (x, y) coordinates, got {tuple(points.shape)}")
    if check_finite:
        _check_finite(points, name)
    return points


def _check_finite(points: torch.Tensor, name: str) -> None:
    if points.numel() and points.is_floating_point() and not _all_finite(points):
        bad = ~torch.isfinite(points).all(dim=1)
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite, got {points[row].tolist()} at row {row} ({int(bad.sum())} non-finite rows)"
        )


def _all_finite(t: torch.Tensor) -> bool:
    # NumPy on a CPU view costs ~1 us against ~8 us for two tensor ops: it matters at one call per image
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _sigma_arg(sigma, counts: list[int], device, single: bool = False) -> torch.Tensor | float | None:
    """None for "adaptive", a float for a fixed sigma, or a concatenated [sum N_i] float64 tensor.
    `single`: the caller is density_map, whose per-point sigma is one tensor of N values (any shape)."""
    if isinstance(sigma, str):
        if sigma != "adaptive":
            raise ValueError(f"sigma must be 'adaptive', a positive float or a per-point tensor, got {sigma!r}")
        return None
    if isinstance(sigma, (torch.Tensor, list, tuple)):
        parts = list(sigma) if isinstance(sigma, (list, tuple)) else None
        if single and isinstance(sigma, torch.Tensor):
            flat = sigma.reshape(-1)
            if flat.shape[0] != counts[0]:
                raise ValueError(
                    f"sigma must be a tensor of {counts[0]} values (one per point), got shape {tuple(sigma.shape)}"
                )
        elif parts is not None and len(parts) == len(counts) and all(isinstance(p, torch.Tensor) for p in parts):
            for i, (p, n) in enumerate(zip(parts, counts)):
                if p.reshape(-1).shape[0] != n:
                    raise ValueError(f"sigma[{i}] must have one value per point ({n}), got shape {tuple(p.shape)}")
            flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
        elif isinstance(sigma, torch.Tensor):
            flat = sigma.reshape(-1)
            if sigma.dim() > 1 or flat.shape[0] != sum(counts):
                raise ValueError(
                    f"sigma must be a tensor of shape [{sum(counts)}] (one value per point), got {tuple(sigma.shape)}"
                )
        else:
            raise TypeError(f"sigma must be 'adaptive', a float, a tensor, or a list of per-image tensors, got {sigma!r}")
        if not flat.is_floating_point() and flat.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sigma must be a floating tensor, got dtype {flat.dtype}")
        flat = flat.to(device=device, dtype=torch.float64)
        bad = ~(torch.isfinite(flat) & (flat > 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"sigma must be positive and finite for every point, got {float(flat[i])} at point {i}")
        return flat
    return _positive_float_arg("sigma", sigma)


# ------------------------------------------------------------------------------------------------- public API
def knn_sigma(points, k: int = 3, beta: float = 0.3, *, lone: float = float("nan")) -> torch.Tensor:
    """Geometry-adaptive Gaussian spread of every point (MCNN; L2SM sec. 3.2).

    sigma_i = beta * mean of the Euclidean distances from point i to its k nearest *other* points. Exact
    kNN on a uniform grid: O(N) memory, expected O(N k) time for annotation-like layouts (the work grows
    with the number of points sharing a grid cell, so thousands of exactly coincident points are slow but
    still correct). Duplicates count as neighbours at distance 0; with N <= k the N - 1 neighbours that
    exist are used; a point with no other point gets ``lone`` (NaN by default: undefined).

    Any finite coordinates work, at any scale and aspect ratio: distances from the smallest subnormal
    (5e-324) to the largest double are computed without under- or overflow (the squares are rescaled
    where they would), to rounding.

    Args:
        points: [N, 2] (x, y) in pixels; float or integer.
        k: neighbours, 1 <= k <= 64.
        beta: the spread per unit distance (0.3 in the papers).
    Returns:
        [N] sigmas in pixels: float64 for float64 points, else float32; on the points' device.
    Raises:
        ValueError naming `beta` when beta x a mean distance exceeds the output dtype's range (float32's
        3.4e38 for float32 or integer points), rather than returning inf.
    """
    points = _points_arg(points, "points")
    k = _int_arg("k", k, 1, MAX_K)
    beta = _positive_float_arg("beta", beta)
    if not isinstance(lone, numbers.Real):
        raise TypeError(f"lone must be a float, got {type(lone).__name__}")
    out_dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
    pts = points.to(torch.float64).contiguous()
    offsets = torch.tensor([0, pts.shape[0]], dtype=torch.int64, device=pts.device)
    out = _knn_sigma(pts, offsets, k, beta, float(lone)).to(out_dtype)
    # A distance is at most 2 sqrt(2) x the largest coordinate (a float32, or an int64 < 9.3e18, for float32
    # output), so only beta > 0.35 can overflow; with two points or more, `lone` is never used.
    if beta > 0.35 and pts.shape[0] > 1 and not _all_finite(out):
        worst = float(out.double().abs().max())
        raise ValueError(
            f"beta x the mean distance to the k nearest points must fit {out_dtype} (at most "
            f"{torch.finfo(out_dtype).max:.3g}), got beta = {beta} and a sigma of {worst:.3g}"
            + (" (pass float64 points for float64 sigmas)" if out_dtype == torch.float32 else "")
        )
    return out


_DENSITY_DOC_ARGS = """
        size: (H, W) of the image(s), each in [1, 2^31 - 1].
        sigma: "adaptive" (knn_sigma per image; a point alone in its image gets mean(H, W) / 4, the
            classic recipe's rule; style "matlab" uses 4.0), a positive float (fixed), or per-point
            values (see below). Any positive finite value: a window wider than the image is clipped to
            it (exact: renormalized there, so a huge sigma gives a flat map of the point's count;
            csrnet: scipy's normalization over the whole window, so it loses almost all of its mass; a
            tiny one is a unit impulse).
        k, beta: the adaptive rule (sigma = beta * mean distance to the k nearest; 1 <= k <= 64).
        truncate: the Gaussian reaches int(truncate * sigma + 0.5) pixels (scipy's radius).
        style: "exact" (default), "csrnet" or "matlab"; see docs/definitions.md, "Density maps":
            - exact: each in-image point's truncated Gaussian is renormalized over the part of its window
              inside the image, so the map sums to the number of in-image points; duplicates are kept.
            - csrnet: the classic KD-tree + scipy.ndimage.gaussian_filter recipe (CSRNet make_dataset),
              to 1e-6: heads at pixel (int(y), int(x)), coincident heads collapse, mass past the border
              is lost.
            - matlab: the fixed-kernel MATLAB/SASNet recipe: kernel_size x kernel_size fspecial Gaussian,
              regenerated at the truncated size at borders; every point counts 1, none is dropped.
        kernel_size: odd window side of the matlab style.
        stride: s >= 1 returns [ceil(H/s), ceil(W/s)] maps of s x s block sums (count kept), for models
            that predict at 1/s resolution.
        deterministic: on CUDA, bit-reproducible accumulation (fixed-point atomics). The CPU kernel is
            always deterministic, whatever the thread count."""


def density_maps(
    points_list,
    size,
    *,
    sigma="adaptive",
    k: int = 3,
    beta: float = 0.3,
    truncate: float = 4.0,
    style: str = "exact",
    kernel_size: int = 15,
    stride: int = 1,
    deterministic: bool = False,
) -> torch.Tensor:
    if isinstance(points_list, torch.Tensor) or (type(points_list) not in (list, tuple) and not isinstance(points_list, Sequence)):
        raise TypeError(
            f"points_list must be a list of [N_i, 2] tensors, got {type(points_list).__name__}"
            + (" (use density_map for a single [N, 2] tensor)" if isinstance(points_list, torch.Tensor) else "")
        )
    return _density_maps(points_list, size, sigma, k, beta, truncate, style, kernel_size, stride, deterministic,
                         single=False)


density_maps.__doc__ = """Density maps of a ragged batch of point sets, all of one image size.

    Args:
        points_list: B tensors [N_i, 2] of (x, y) pixel coordinates (float or integer; N_i may be 0).
        {args}
            Per-point sigma here: one [sum N_i] tensor or a list of B tensors [N_i].
    Returns:
        [B, 1, ceil(H/s), ceil(W/s)] heads per pixel; float64 if any points are float64, else float32; on
        the points' device. Points outside the image are dropped in "exact" and "csrnet".
    Raises:
        ValueError / TypeError naming the argument (``points_list[i]``, ``size``, ``sigma``, ...).
    """.format(args=_DENSITY_DOC_ARGS.strip())


def density_map(
    points,
    size,
    *,
    sigma="adaptive",
    k: int = 3,
    beta: float = 0.3,
    truncate: float = 4.0,
    style: str = "exact",
    kernel_size: int = 15,
    stride: int = 1,
    deterministic: bool = False,
) -> torch.Tensor:
    if isinstance(points, (list, tuple)) and points and isinstance(points[0], torch.Tensor):
        raise TypeError("points must be one [N, 2] tensor; use density_maps for a list of point sets")
    return _density_maps([points], size, sigma, k, beta, truncate, style, kernel_size, stride, deterministic,
                         single=True)[0, 0]


density_map.__doc__ = """The density map of one image: [H, W] (or [ceil(H/s), ceil(W/s)] with stride s).

    Args:
        points: [N, 2] (x, y) pixel coordinates, pixel (i, j) covering [j, j+1) x [i, i+1); float or
            integer; N may be 0.
        {args}
            Per-point sigma here: one tensor of N values.
    Returns:
        [ceil(H/s), ceil(W/s)] heads per pixel; float64 for float64 points, else float32; on the points'
        device. Points outside the image are dropped in "exact" and "csrnet".
    Raises:
        ValueError / TypeError naming the argument (``points``, ``size``, ``sigma``, ...).

    Example::

        pts = torch.tensor([[10.5, 20.2], [30.0, 12.7], [31.5, 14.0]])
        d = density_map(pts, (64, 64))          # d.sum() == 3 (style "exact")
    """.format(args=_DENSITY_DOC_ARGS.strip())


def _density_maps(points_list, size, sigma, k, beta, truncate, style, kernel_size, stride, deterministic,
                  single: bool) -> torch.Tensor:
    """density_maps' work; `single`: called by density_map, whose errors name `points` and `sigma`."""
    def name(i: int) -> str:
        return "points" if single else f"points_list[{i}]"

    H, W = _size_arg(size)
    if style not in _STYLE_CODE:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    k = _int_arg("k", k, 1, MAX_K)
    beta = _positive_float_arg("beta", beta)
    truncate = _positive_float_arg("truncate", truncate)
    kernel_size = _int_arg("kernel_size", kernel_size, 1, _MAX_STEP)
    if style == "matlab" and kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd for style 'matlab' (the recipe's window is 2*(k//2)+1), got {kernel_size}")
    stride = _int_arg("stride", stride, 1, _MAX_STEP)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")

    # finiteness is checked below, by the C++ CPU pipeline itself when it runs (it reads the points anyway,
    # and a NumPy pass over them here cost ~10 us an image on caches the previous map had flushed)
    pts_list = [_points_arg(p, name(i), check_finite=False) for i, p in enumerate(points_list)]
    devices = {p.device for p in pts_list if p.numel() or p.device.type != "cpu"}
    if len(devices) > 1:
        raise ValueError(f"points_list tensors must all be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in pts_list) else torch.float32
    counts = [p.shape[0] for p in pts_list]
    B = len(pts_list)
    sig = _sigma_arg(sigma, counts, device, single=single)
    fused = sig is None and style != "matlab" and _ext.backend(device, "density_adaptive") == "cpu"
    if not fused:
        for i, p in enumerate(pts_list):
            _check_finite(p, name(i))

    if B == 1:
        pts = pts_list[0].to(device=device, dtype=out_dtype)
    elif B:
        pts = torch.cat([p.to(device=device, dtype=out_dtype) for p in pts_list])
    else:
        pts = torch.zeros(0, 2, dtype=out_dtype, device=device)
    if fused:
        # prepare, kNN and splat in one C++ call (the same bits as the three ops below)
        try:
            return torch.ops.crowdkernels.density_adaptive(
                pts, counts, H, W, _STYLE_CODE[style], k, beta, (H + W) / 8.0, truncate, kernel_size, stride
            )
        except ValueError as exc:  # the C++ finiteness check names points_list[b]: density_map's is `points`
            if not single:
                raise
            raise ValueError(str(exc).replace("points_list[0]", "points", 1)) from None
    # Image b owns pts[offsets[b]:offsets[b+1]]. exact and csrnet then drop (and csrnet merges) points
    # in one pass of density_prepare: per-image tensor ops here cost more than the kernels on CPU.
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + n)
    offsets = torch.tensor(bounds, dtype=torch.int64, device=device)
    if style in ("exact", "csrnet") and pts.shape[0]:
        pts, offsets, index = _density_prepare(pts, offsets, H, W, style)
        sig = sig[index] if isinstance(sig, torch.Tensor) else sig
    pts = pts.contiguous()

    if sig is None:
        if style == "matlab":
            sig = torch.full((pts.shape[0],), 4.0, dtype=torch.float64, device=device)
        else:
            sig = _knn_sigma(pts, offsets, k, beta, (H + W) / 8.0)  # the kernels read any float dtype
    elif not isinstance(sig, torch.Tensor):
        sig = torch.full((pts.shape[0],), sig, dtype=torch.float64, device=device)
    out = _density_splat(pts, offsets, sig.contiguous(), H, W, style, truncate, kernel_size, stride, deterministic)
    return out.unsqueeze(1)


# ---------------------------------------------------------------------- the ops, on the backend of the device
def _knn_sigma(points: torch.Tensor, offsets: torch.Tensor, k: int, beta: float, lone: float) -> torch.Tensor:
    """[T, 2] points (any float dtype; the kernels compute in float64) of B images (offsets [B+1]) -> [T] float64 sigmas."""
    if _ext.backend(points.device, "knn_sigma") != "reference":
        return torch.ops.crowdkernels.knn_sigma(points, offsets, k, beta, lone)
    bounds = offsets.tolist()
    parts = [
        reference.knn_sigma_reference(points[a:b], k, beta, lone).to(points.device)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts) if parts else points.new_zeros(0)


def _prepare_vectorized(points, offsets, height, width, style):
    """density_prepare with tensor ops alone (no per-image loop), for devices without a compiled kernel:
    the same contract as the C++ op and reference.density_prepare_reference."""
    device = points.device
    B = offsets.shape[0] - 1
    batch = torch.repeat_interleave(torch.arange(B, device=device), offsets.diff())
    index = torch.arange(points.shape[0], device=device)
    if style != "matlab":
        keep = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
        index, batch = index[keep], batch[keep]
    if style == "csrnet" and index.shape[0]:
        pix = torch.floor(points[index])
        key = (batch * height + pix[:, 1].long()) * width + pix[:, 0].long()
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        first = torch.full((uniq.shape[0],), points.shape[0], dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(index.shape[0], device=device), reduce="amin")
        index, batch = index[first], batch[first]
    out = points[index]
    if style == "csrnet":
        out = torch.floor(out)
    counts = torch.bincount(batch, minlength=B)
    return out, torch.cat([offsets.new_zeros(1), torch.cumsum(counts, 0)]), index


def _density_prepare(points, offsets, height, width, style):
    """[T, 2] points of B images -> the (points, offsets, index) that `style` splats; see density_prepare
    in csrc/crowdkernels.cpp."""
    if _ext.backend(points.device, "density_prepare") != "reference":
        return torch.ops.crowdkernels.density_prepare(points, offsets, height, width, _STYLE_CODE[style])
    return _prepare_vectorized(points, offsets, height, width, style)


def _density_splat(points, offsets, sigma, height, width, style, truncate, kernel_size, stride, deterministic):
    """[T, 2] points (the output dtype) of B images -> [B, ceil(H/s), ceil(W/s)]."""
    if _ext.backend(points.device, "density_splat") != "reference":
        return torch.ops.crowdkernels.density_splat(
            points, offsets, sigma, height, width, _STYLE_CODE[style], truncate, kernel_size, stride, deterministic
        )
    bounds = offsets.tolist()
    maps = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        full = reference._splat_reference(
            points[a:b].double().cpu().numpy(), sigma[a:b].cpu().numpy(), (height, width), style, truncate, kernel_size
        )
        maps.append(reference.sum_pool_reference(torch.from_numpy(full), stride))
    hs, ws = -(-height // stride), -(-width // stride)
    out = torch.stack(maps) if maps else torch.zeros(0, hs, ws, dtype=torch.float64)
    return out.to(device=points.device, dtype=points.dtype)


# ------------------------------------------------------------------------------------------------------- fake
def _knn_sigma_fake(points, offsets, k, beta, lone):
    return points.new_empty((points.shape[0],), dtype=torch.float64)


def _density_prepare_fake(points, offsets, height, width, style):
    n = torch.library.get_ctx().new_dynamic_size()
    return points.new_empty((n, 2)), offsets.new_empty(offsets.shape), offsets.new_empty((n,))


def _density_adaptive_fake(points, counts, height, width, style, k, beta, lone, truncate, kernel_size, stride):
    return points.new_empty((len(counts), 1, -(-height // stride), -(-width // stride)))


def _density_splat_fake(points, offsets, sigma, height, width, style, truncate, kernel_size, stride, deterministic):
    return points.new_empty((offsets.shape[0] - 1, -(-height // stride), -(-width // stride)))


if _ext.compiled():
    torch.library.register_fake("crowdkernels::knn_sigma")(_knn_sigma_fake)
    torch.library.register_fake("crowdkernels::density_prepare")(_density_prepare_fake)
    if hasattr(torch.ops.crowdkernels, "density_adaptive"):
        torch.library.register_fake("crowdkernels::density_adaptive")(_density_adaptive_fake)
    torch.library.register_fake("crowdkernels::density_splat")(_density_splat_fake)
