"""Synthetic crowds: procedurally rendered images with their exact head points.

The built-in data set of the demo and the tests (as a Dataset: :class:`crowdkernels.data.datasets.SyntheticCrowds`).
Each image is a textured ground seen in perspective, with people drawn as a shoulder ellipse in a light
clothing colour under a dark hair disk centred on the annotated head point. Head radius follows a linear
perspective gradient (small at the top of the image, large at the bottom: :func:`head_radius`), and heads
are placed in a few Gaussian clusters plus a scattered part, from a handful of people to a dense crowd.

Promises (checked by python_tests/test_synthetic.py):

- Deterministic: the same seed (and index) gives the same bytes, on any machine (NumPy ``Generator``,
  PCG64, and only elementwise float64 maths).
- Every point lies inside the image, [0, W) x [0, H).
- Points match the rendering: the pixel holding each point is head-dark (luminance below
  :data:`HEAD_LUMINANCE_MAX`), and every head-dark pixel lies within its head radius + 1 px of a point,
  so there is no unannotated head. Ground and clothing stay above :data:`BACKGROUND_LUMINANCE_MIN`.
- People are drawn far to near, so a nearer person can hide a farther one's shoulders but never the
  centre of its head (shoulders hang below the head; heads are spaced by at least the larger radius).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "SyntheticSample",
    "render_crowd",
    "synthetic_set",
    "synthetic_crowd",
    "synthetic_dataset",
    "head_radius",
    "luminance",
    "HEAD_LUMINANCE_MAX",
    "BACKGROUND_LUMINANCE_MIN",
]

HEAD_LUMINANCE_MAX = 0.30  # hair is drawn at luminance <= 0.20; the margin absorbs noise and blending
BACKGROUND_LUMINANCE_MIN = 0.40  # ground and clothing are drawn at >= 0.45
_NOISE = 0.012  # per-pixel sensor noise (sd, in [0, 1] units)
_GROUNDS = (  # base RGB colours of the ground: pavement, sand, dry grass, tiles
    (0.66, 0.66, 0.64),
    (0.76, 0.70, 0.58),
    (0.62, 0.68, 0.52),
    (0.72, 0.64, 0.60),
)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of [..., 3] RGB in [0, 1] (uint8 input is scaled by 1/255)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float64) / 255.0
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def head_radius(y, height: int, r_top: float | None = None, r_bottom: float | None = None):
    """Head radius in pixels at image row coordinate y: the perspective gradient, linear from r_top at
    y = 0 to r_bottom at y = H. Defaults scale with the image: max(1.5, 0.012 H) and max(3, 0.05 H)."""
    r_top = max(1.5, 0.012 * height) if r_top is None else r_top
    r_bottom = max(3.0, 0.05 * height) if r_bottom is None else r_bottom
    return r_top + (r_bottom - r_top) * np.clip(np.asarray(y, dtype=np.float64) / height, 0.0, 1.0)


@dataclass
class SyntheticSample:
    """One rendered crowd image.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        points: float64 [N, 2] (x, y) head centres in pixels (pixel (i, j) covers [j, j+1) x [i, i+1)).
        radii: float64 [N] head radii in pixels (the perspective gradient at each head).
        name: a stable name, e.g. "synthetic_0007".
        seed: the entropy the sample was generated from (reproduce it with ``render_crowd(seed=...)``).
    """

    image: np.ndarray
    points: np.ndarray
    radii: np.ndarray
    name: str = "synthetic"
    seed: tuple = field(default_factory=tuple)
    density: float = 0.0

    @property
    def count(self) -> int:
        return int(self.points.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def image_tensor(self) -> torch.Tensor:
        """float32 [3, H, W] in [0, 1]."""
        return torch.from_numpy(self.image).permute(2, 0, 1).float().div_(255.0)

    def points_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, 2] (x, y) as a tensor (float32 by default, the density API's float32 path)."""
        return torch.from_numpy(self.points).to(dtype)


def _size_arg(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not isinstance(size, Sequence) or len(size) != 2:
        raise TypeError(f"size must be an int or a pair (H, W), got {size!r}")
    h, w = size
    for name, v in (("size[0] (height)", h), ("size[1] (width)", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 16:
            raise ValueError(f"{name} must be an int >= 16, got {v!r}")
    return int(h), int(w)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured ground: a base colour, low-frequency blotches, fine grain and a haze gradient (far =
    lighter, flatter), kept within [0.45, 0.95] luminance so heads stand out."""
    base = np.asarray(_GROUNDS[rng.integers(len(_GROUNDS))], dtype=np.float64)
    base = base + rng.uniform(-0.04, 0.04, size=3)
    coarse = rng.standard_normal((1, 1, max(2, h // 16), max(2, w // 16)))
    blotches = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(h, w), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    blotches = np.clip(blotches * 0.05, -0.08, 0.08)
    grain = rng.standard_normal((h, w))
    # a 3-tap blur makes the grain look like surface texture rather than sensor noise
    grain = (grain + np.roll(grain, 1, 0) + np.roll(grain, 1, 1)) / 3.0
    grain = np.clip(grain * 0.025, -0.05, 0.05)
    haze = 0.06 * (1.0 - np.arange(h, dtype=np.float64) / h)[:, None]
    shade = blotches + grain + haze
    return np.clip(base[None, None, :] + shade[:, :, None], 0.47, 0.95)


def _place_heads(rng: np.random.Generator, h: int, w: int, n_target: int) -> np.ndarray:
    """Up to n_target head points: Gaussian clusters (1-4) plus a scattered share, with centres at least
    1.1 x the larger head radius apart so each head centre stays visible."""
    n_clusters = int(rng.integers(1, 5))
    centres = np.stack([rng.uniform(0.05 * w, 0.95 * w, n_clusters), rng.uniform(0.1 * h, 0.95 * h, n_clusters)], 1)
    spreads = rng.uniform(0.06, 0.2, n_clusters) * min(h, w)
    weights = rng.dirichlet(np.ones(n_clusters))
    scattered = rng.uniform(0.15, 0.4)
    accepted = np.zeros((0, 2))
    radii = np.zeros(0)
    for _ in range(40 * max(n_target, 1)):
        if accepted.shape[0] >= n_target:
            break
        if rng.uniform() < scattered:
            p = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        else:
            c = rng.choice(n_clusters, p=weights)
            p = centres[c] + rng.standard_normal(2) * spreads[c]
        if not (0 <= p[0] < w and 0 <= p[1] < h):
            continue
        r = float(head_radius(p[1], h))
        if accepted.shape[0]:
            d = np.hypot(accepted[:, 0] - p[0], accepted[:, 1] - p[1])
            if np.any(d < 1.1 * np.maximum(radii, r)):
                continue
        accepted = np.vstack([accepted, p])
        radii = np.append(radii, r)
    return accepted


def _paint_ellipse(img, cx, cy, ax, ay, colour):
    """Alpha-blends an anti-aliased ellipse (semi-axes ax, ay px) into img [H, W, 3], in place."""
    h, w = img.shape[:2]
    i0, i1 = max(int(math.floor(cy - ay - 1)), 0), min(int(math.ceil(cy + ay + 1)), h)
    j0, j1 = max(int(math.floor(cx - ax - 1)), 0), min(int(math.ceil(cx + ax + 1)), w)
    if i0 >= i1 or j0 >= j1:
        return
    py = np.arange(i0, i1, dtype=np.float64)[:, None] + 0.5  # pixel centres
    px = np.arange(j0, j1, dtype=np.float64)[None, :] + 0.5
    q = np.sqrt(((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2)
    # signed distance to the rim, approximately, in pixels: 1 px of anti-aliasing
    alpha = np.clip((1.0 - q) * min(ax, ay) + 0.5, 0.0, 1.0)[:, :, None]
    region = img[i0:i1, j0:j1]
    region *= 1.0 - alpha
    region += alpha * colour


def _clothing(rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.3, 1.0, 3)
    lum = float(luminance(c))
    if lum < 0.5:  # lift dark draws towards white so clothes never pass for hair
        t = (0.5 - lum) / (1.0 - lum)
        c = c + t * (1.0 - c)
    return c


def _hair(rng: np.random.Generator) -> np.ndarray:
    dark = rng.uniform(0.04, 0.14)
    return np.clip(dark + np.array([0.05, 0.02, 0.0]) * rng.uniform(0, 1), 0, 0.2)


def render_crowd(
    seed: int | Sequence[int] = 0,
    size=128,
    *,
    density: float | None = None,
    min_heads: int = 3,
    max_heads: int | None = None,
    name: str = "synthetic",
) -> SyntheticSample:
    """Render one synthetic crowd image with its exact head points.

    Args:
        seed: an int or a sequence of ints (e.g. (dataset seed, index)), fed to ``np.random.default_rng``.
        size: H = W = size, or (H, W); at least 16.
        density: 0 (sparse: ``min_heads``) to 1 (dense: ``max_heads``); None draws it uniformly.
        min_heads, max_heads: the head-count range; ``max_heads`` defaults to 0.008 x H x W (131 at 128x128).
            Dense targets may be cut short where heads no longer fit at their spacing.
    Returns:
        A :class:`SyntheticSample`: uint8 [H, W, 3] image, float64 [N, 2] (x, y) points, [N] radii.
    """
    h, w = _size_arg(size)
    if max_heads is None:
        max_heads = max(min_heads, int(round(0.008 * h * w)))
    if not 0 <= min_heads <= max_heads:
        raise ValueError(f"min_heads and max_heads must satisfy 0 <= min_heads <= max_heads, got {min_heads}, {max_heads}")
    entropy = tuple(int(s) for s in (seed if isinstance(seed, Sequence) else (seed,)))
    rng = np.random.default_rng(list(entropy))
    if density is None:
        density = float(rng.uniform())
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")

    img = _background(rng, h, w)
    n_target = int(round(min_heads + (max_heads - min_heads) * density**1.5))
    points = _place_heads(rng, h, w, n_target)
    radii = head_radius(points[:, 1], h) if points.shape[0] else np.zeros(0)
    # far to near (top to bottom), so nearer people overlap farther ones as in a real view
    order = np.argsort(points[:, 1], kind="stable")
    points, radii = points[order], radii[order]
    for (x, y), r in zip(points.tolist(), radii.tolist()):
        sway = rng.uniform(-0.3, 0.3) * r
        _paint_ellipse(img, x + sway, y + 1.9 * r, 1.6 * r, 1.1 * r, _clothing(rng))
        _paint_ellipse(img, x, y, r, r, _hair(rng))
    img += rng.standard_normal(img.shape) * _NOISE
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return SyntheticSample(image, points, radii, name=name, seed=entropy, density=float(density))


def synthetic_set(num_images, size, seed) -> tuple[int, tuple[int, int], int]:
    """(num_images, (H, W), seed) of a set of synthetic crowds, checked: ``num_images`` an int >= 1, ``seed`` an
    int >= 0, ``size`` as :func:`render_crowd` takes it. ValueError (TypeError for a malformed size) otherwise."""
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(num_images), _size_arg(size), int(seed)


def synthetic_crowd(index: int, num_images: int, size=128, seed: int = 0, **render_kwargs) -> SyntheticSample:
    """Crowd ``index`` (0 <= index < num_images) of a set of ``num_images`` from sparse to dense: rendered
    from seed (seed, index) at density (index + u) / num_images, u uniform from (seed, index, 1), named
    ``synthetic_<index:04d>``; so any one regenerates alone. Extra keyword arguments go to
    :func:`render_crowd`."""
    jitter = np.random.default_rng([seed, index, 1]).uniform()
    return render_crowd(
        (seed, index),
        size,
        density=(index + jitter) / num_images,
        name=f"synthetic_{index:04d}",
        **render_kwargs,
    )


def synthetic_dataset(num_images: int = 20, size=128, seed: int = 0, **kwargs) -> list[SyntheticSample]:
    """A list of ``num_images`` crowds from sparse to dense (image i gets density (i + u) / num_images,
    u uniform), sample i rendered from seed (seed, i) so any one can be regenerated alone
    (:func:`synthetic_crowd`). Extra keyword arguments go to :func:`render_crowd`."""
    num_images, size, seed = synthetic_set(num_images, size, seed)
    return [synthetic_crowd(i, num_images, size, seed, **kwargs) for i in range(num_images)]
