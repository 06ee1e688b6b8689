"""Head locations from a density map, and how well located heads match annotated ones.

:func:`density_to_points` turns a density map (people per element: a map at image resolution, or a model's
output cells) into as many points as it counts people, the rounded sum: the highest local maxima first, each
one suppressing the lower maxima within its radius (non-maximum suppression). The radius of a peak is its
local sigma: a head of one person spread as a Gaussian of width sigma peaks at 1 / (2 pi sigma^2), so a peak
of height v has sigma = 1 / sqrt(2 pi v) elements (at least :data:`MIN_RADIUS`, so that the 8 neighbours of a
flat top are suppressed). Where the maxima left are fewer than the count (heads so close that their
Gaussians merge into one peak), each point taken so far takes one person (a Gaussian of its radius) out of
the map, and the highest elements of what is left are taken one by one, each taking its own person out. So
the number of points is always the count.

:func:`match_points` scores located heads against annotated ones: the largest one-to-one matching of pairs
closer than a radius (scipy's Hopcroft-Karp), as precision, recall and F1.

Coordinates are (x, y) in the map's pixel convention: element (i, j) covers [j, j+1) x [i, i+1), its centre is
(j + 0.5, i + 0.5), as :func:`crowdkernels.density_map` takes points.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MIN_RADIUS", "density_to_points", "local_sigma", "match_points"]

#: the smallest suppression radius, elements: covers the 8 neighbours (distance sqrt(2)) of a peak
MIN_RADIUS = 1.5


def local_sigma(peak) -> np.ndarray:
    """The width (elements) of a one-person Gaussian whose peak is ``peak`` (people per element):
    sqrt(1 / (2 pi peak)). ``peak`` > 0."""
    return np.sqrt(1.0 / (2.0 * math.pi * np.asarray(peak, dtype=np.float64)))


def _as_map(density) -> np.ndarray:
    if isinstance(density, torch.Tensor):
        density = density.detach().to("cpu", torch.float64).numpy()
    d = np.asarray(density, dtype=np.float64)
    if d.ndim == 3 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"density must be a map [H, W] (or [1, H, W]), got shape {tuple(d.shape)}")
    if not np.isfinite(d).all():
        raise ValueError("density holds NaN or inf")
    return d


def _disc(shape, i: int, j: int, r: float):
    """(row slice, column slice, mask) of the elements within distance r of element (i, j)."""
    k = int(math.floor(r))
    i0, i1, j0, j1 = max(0, i - k), min(shape[0], i + k + 1), max(0, j - k), min(shape[1], j + k + 1)
    ii, jj = np.ogrid[i0 - i:i1 - i, j0 - j:j1 - j]
    return slice(i0, i1), slice(j0, j1), ii * ii + jj * jj <= r * r


def _offset(left: float, centre: float, right: float) -> float:
    """Where the peak through three neighbouring samples lies, relative to the centre one (elements, within
    +-0.5): the vertex of the parabola through their logarithms (exact for a Gaussian) when all three are
    positive, else their centre of mass (a peak shared by two elements lies between them)."""
    if left > 0 and right > 0 and centre >= left and centre >= right:
        a, b, c = math.log(left), math.log(centre), math.log(right)
        curvature = a - 2.0 * b + c
        return 0.0 if curvature >= 0 else min(0.5, max(-0.5, 0.5 * (a - c) / curvature))
    left, centre, right = max(left, 0.0), max(centre, 0.0), max(right, 0.0)
    total = left + centre + right
    return 0.0 if not total > 0 else min(0.5, max(-0.5, (right - left) / total))


def _refine(d: np.ndarray, i: int, j: int) -> tuple[float, float]:
    """(x, y) of the peak at element (i, j), to a fraction of an element (:func:`_offset` along each axis)."""
    H, W = d.shape
    x, y = j + 0.5, i + 0.5
    if 0 < j < W - 1:
        x += _offset(d[i, j - 1], d[i, j], d[i, j + 1])
    if 0 < i < H - 1:
        y += _offset(d[i - 1, j], d[i, j], d[i + 1, j])
    return x, y


def density_to_points(density, count=None, radius=None, *, refine: bool = True) -> torch.Tensor:
    """Head locations from a density map: exactly as many points as the map counts people (see the module
    docstring for the rule).

    Args:
        density: [H, W] (or [1, H, W]) people per element, a tensor or an array: a density map at image
            resolution (e.g. :meth:`crowdkernels.Counter.density`, :func:`crowdkernels.density_map`) or a model's
            cells (then the points are in cell units).
        count: how many points: ``round(count)``, at least 0 and at most H x W (default: the map's sum).
        radius: the suppression radius in elements, one for every peak (default: each peak's local sigma,
            :func:`local_sigma`, at least :data:`MIN_RADIUS`).
        refine: place each point between elements, along x and y: where a Gaussian through the peak and its
            two neighbours peaks (the vertex of a parabola through their logarithms), or their centre of mass
            where a neighbour is not positive; off: the peak element's centre.
    Returns:
        float32 [N, 3]: (x, y, score) per point, in the order taken (the maxima from the highest down, then
        the rest); x, y in elements (element (i, j) covers
        [j, j+1) x [i, i+1)); score: the people of the map within the point's radius of its peak.
    Raises:
        ValueError naming the argument for a map that is not [H, W] or holds NaN/inf, a count that is not a
        finite number, or a radius that is not a positive number.
    """
    d = _as_map(density)
    H, W = d.shape
    if count is None:
        count = float(d.sum())
    if isinstance(count, bool) or not isinstance(count, (int, float, np.integer, np.floating)) or not math.isfinite(count):
        raise ValueError(f"count must be a finite number (people), got {count!r}")
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0
                               or not math.isfinite(radius)):
        raise ValueError(f"radius must be a positive number of elements (or None: each peak's local sigma), got {radius!r}")
    n = min(max(int(round(float(count))), 0), H * W)
    if n == 0:
        return torch.zeros(0, 3)

    peaks_mask = (d > 0) & (d == _maximum_filter(d))
    flat = np.flatnonzero(peaks_mask.ravel())
    order = flat[np.argsort(-d.ravel()[flat], kind="stable")]
    if radius is None:
        radii = np.maximum(local_sigma(np.maximum(d.ravel()[order], 1e-300)), MIN_RADIUS)
    else:
        radii = np.full(order.shape, float(radius))

    chosen: list[tuple[int, float]] = []  # (flat index, radius)
    taken = np.zeros(H * W, dtype=bool)
    blocked = np.zeros((H, W), dtype=bool)
    for idx, r in zip(order, radii):
        if len(chosen) == n:
            break
        if blocked.flat[idx]:
            continue
        chosen.append((int(idx), float(r)))
        taken[idx] = True
        rows, cols, mask = _disc((H, W), idx // W, idx % W, r)
        blocked[rows, cols] |= mask
    if len(chosen) < n:  # fewer maxima than people (merged heads): the peaks of what they leave unexplained
        chosen += _residual_peaks(d, chosen, taken, n - len(chosen), radius)

    out = np.empty((len(chosen), 3), dtype=np.float64)
    positive = np.clip(d, 0.0, None)
    for k, (idx, r) in enumerate(chosen):
        i, j = divmod(idx, W)
        x, y = _refine(d, i, j) if refine else (j + 0.5, i + 0.5)
        rows, cols, mask = _disc((H, W), i, j, r)
        out[k] = (x, y, float(positive[rows, cols][mask].sum()))
    return torch.from_numpy(out).float()


def _subtract_head(res: np.ndarray, i: int, j: int, sigma: float) -> None:
    """Takes one person, a Gaussian of width ``sigma`` centred on element (i, j), out of ``res`` (in place)."""
    k = int(math.ceil(3.0 * sigma))
    i0, i1, j0, j1 = max(0, i - k), min(res.shape[0], i + k + 1), max(0, j - k), min(res.shape[1], j + k + 1)
    ii, jj = np.ogrid[i0 - i:i1 - i, j0 - j:j1 - j]
    res[i0:i1, j0:j1] -= np.exp(-(ii * ii + jj * jj) / (2.0 * sigma * sigma)) / (2.0 * math.pi * sigma * sigma)


def _residual_peaks(d: np.ndarray, chosen, taken: np.ndarray, m: int, radius) -> list:
    """``m`` more points where the map holds people the chosen ones do not explain: each chosen point takes
    one person (a Gaussian of its radius) out of the map, then the highest element of what is left is taken
    and takes its own person out, and so on (elements already taken are not taken again)."""
    res = d.copy()
    W = d.shape[1]
    for idx, r in chosen:
        _subtract_head(res, idx // W, idx % W, r)
    res_flat = res.ravel()
    res_flat[taken] = -np.inf
    out = []
    for _ in range(m):
        idx = int(np.argmax(res_flat))
        v = res_flat[idx]
        r = float(radius) if radius is not None else float(max(local_sigma(v) if v > 0 else MIN_RADIUS, MIN_RADIUS))
        out.append((idx, r))
        _subtract_head(res, idx // W, idx % W, r)
        res_flat[idx] = -np.inf
    return out


def _maximum_filter(d: np.ndarray) -> np.ndarray:
    """The largest value of each element's 3 x 3 neighbourhood (outside the map: -inf)."""
    from scipy.ndimage import maximum_filter

    return maximum_filter(d, size=3, mode="constant", cval=-np.inf)


def _xy(points, name: str) -> np.ndarray:
    a = points.detach().to("cpu", torch.float64).numpy() if isinstance(points, torch.Tensor) else points
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"{name} must be points [N, 2] (x, y) or [N, 3] (x, y, score), got shape {a.shape}")
    return a[:, :2]


def match_points(pred, true, radius: float) -> dict:
    """Located heads ``pred`` ([N, 2+], (x, y) first) against annotated ``true`` ([M, 2+]): the largest
    one-to-one matching of pairs at most ``radius`` apart (same units as the points). Returns
    ``{"tp", "fp", "fn", "precision", "recall", "f1"}`` (precision 1 when nothing was located, recall 1 when
    nothing was annotated)."""
    from scipy.sparse import coo_matrix  # scipy is slow to import: only here
    from scipy.sparse.csgraph import maximum_bipartite_matching
    from scipy.spatial import cKDTree

    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"radius must be a positive number, got {radius!r}")
    p, t = _xy(pred, "pred"), _xy(true, "true")
    tp = 0
    if len(p) and len(t):
        near = cKDTree(p).query_ball_tree(cKDTree(t), float(radius))
        rows = np.repeat(np.arange(len(p)), [len(c) for c in near])
        cols = np.fromiter((c for cs in near for c in cs), dtype=np.int64, count=len(rows))
        graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(p), len(t))).tocsr()
        tp = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    fp, fn = len(p) - tp, len(t) - tp
    precision = tp / len(p) if len(p) else 1.0
    recall = tp / len(t) if len(t) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}
