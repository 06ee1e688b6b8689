"""Preprocessing and augmentation of crowd samples: images, head points and (optionally) density maps
transformed together, so they stay aligned and the count is kept.

A sample is a dict (what :class:`crowdkernels.data.CrowdDataset` yields):

- ``"image"``: float32 [3, H, W] in [0, 1];
- ``"points"``: float32 [N, 2] (x, y) pixel coordinates, pixel (i, j) covering [j, j+1) x [i, i+1);
- ``"density"`` (optional, from a cache written by ``crowdkernels density``): float32 [H, W] heads/pixel;
- anything else (``"name"``, ...) passes through unchanged.

Every transform is a callable ``sample -> sample``. Random transforms draw from torch's global RNG (or
the ``generator`` given), so a training run is reproduced by restoring the RNG state, and DataLoader
workers, which torch seeds from the main process, stay reproducible too.

Policies follow the papers: L2SM caps UCF-QNRF at 1920 x 1080 (``Resize(max_size=(1920, 1080))``);
HMoDE trains on random 256 x 256 crops (128 x 128 on ShanghaiTech A) with horizontal flips.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from .._constants import IMAGENET_NORM  # the ImageNet mean/std the models declare

__all__ = [
    "IMAGENET_NORM",
    "Normalize",
    "check_norm",
    "normalize_image",
    "shrink_image",
    "denormalize_image",
    "Compose",
    "Resize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "resized_shape",
    "resize_sample",
    "crop_sample",
    "flip_sample",
    "resize_density",
]




def check_norm(norm, name: str = "input_norm"):
    """``norm`` as ``{"mean": (m_r, m_g, m_b), "std": (s_r, s_g, s_b)}`` of floats, or None (raw RGB in [0, 1]:
    checkpoints written before the convention was stored). "imagenet" names :data:`IMAGENET_NORM`."""
    if norm is None:
        return None
    if isinstance(norm, str):
        if norm != "imagenet":
            raise ValueError(f"{name} must be 'imagenet', None or {{'mean': [3 floats], 'std': [3 floats]}}, got {norm!r}")
        norm = IMAGENET_NORM
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise ValueError(f"{name} must be None or {{'mean': [3 floats], 'std': [3 floats]}}, got {norm!r}")
    out = {}
    for key in ("mean", "std"):
        v = norm[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in v
        ):
            raise ValueError(f"{name}[{key!r}] must be 3 finite numbers, got {v!r}")
        out[key] = tuple(float(x) for x in v)
    if any(x <= 0 for x in out["std"]):
        raise ValueError(f"{name}['std'] must be positive, got {out['std']!r}")
    return out


def _norm_tensors(norm, image: torch.Tensor):
    shape = (3, 1, 1)
    mean = torch.tensor(norm["mean"], dtype=image.dtype, device=image.device).reshape(shape)
    std = torch.tensor(norm["std"], dtype=image.dtype, device=image.device).reshape(shape)
    return mean, std


def normalize_image(image: torch.Tensor, norm) -> torch.Tensor:
    """RGB in [0, 1] (``[3, H, W]`` or ``[B, 3, H, W]``, floating point) -> what a model with input
    convention ``norm`` expects: ``(image - mean) / std`` per channel; the image itself when ``norm`` is None.
    Every path that feeds a model (training, validation, ``eval``, ``count``, ``crowdkernels.load``, the
    demo) goes through this function, so a checkpoint is fed the way it was trained."""
    norm = check_norm(norm)
    if norm is None:
        return image
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    mean, std = _norm_tensors(norm, image)
    return (image - mean) / std


def denormalize_image(image: torch.Tensor, norm) -> torch.Tensor:
    """The inverse of :func:`normalize_image` (for drawing): ``image * std + mean``."""
    norm = check_norm(norm)
    if norm is None:
        return image
    mean, std = _norm_tensors(norm, image)
    return image * std + mean


class Normalize:
    """The last step of a sample pipeline: ``sample["image"]`` (RGB in [0, 1]) through
    :func:`normalize_image` with ``norm`` (e.g. :data:`IMAGENET_NORM`; None leaves it raw). It comes after
    the geometric transforms (which clamp to [0, 1]) and before batching, so the collate's zero padding is
    the mean colour, as the models' own padding is."""

    def __init__(self, norm=IMAGENET_NORM):
        self.norm = check_norm(norm, "norm")

    def __call__(self, sample: dict) -> dict:
        if self.norm is None:
            return sample
        out = dict(sample)
        out["image"] = normalize_image(sample["image"], self.norm)
        return out

    def __repr__(self) -> str:
        return f"Normalize({self.norm!r})"


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    a, b = value
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return int(a), int(b)


def resized_shape(height: int, width: int, *, max_size=None, min_size: int | None = None, multiple: int = 1):
    """The (H', W') a resize policy gives an (H, W) image.

    Args:
        max_size: None; an int (the longest side is capped at it); or a box (a, b), e.g. (1920, 1080):
            the image is shrunk to fit inside it in either orientation (longest side <= max(a, b),
            shortest side <= min(a, b)). Never enlarges.
        min_size: the shortest side is raised to at least this (small images against large crops).
            Where it contradicts ``max_size`` (extreme aspect ratios), ``max_size`` wins.
        multiple: each side rounded to the nearest multiple of this (at least one multiple), e.g. 16 so
            that the models' 1/8 or 1/16 feature maps tile the image exactly.
    Aspect ratio is kept up to that rounding.
    """
    scale = 1.0
    if min_size is not None:
        scale = max(scale, min_size / min(height, width))
    if max_size is not None:
        if isinstance(max_size, numbers.Integral):
            cap = max_size / max(height, width)
        else:
            a, b = _pair(max_size, "max_size")
            cap = min(max(a, b) / max(height, width), min(a, b) / min(height, width))
        scale = min(scale, cap)
    h, w = height * scale, width * scale
    if multiple > 1:
        h = max(multiple, int(round(h / multiple)) * multiple)
        w = max(multiple, int(round(w / multiple)) * multiple)
    return max(1, int(round(h))), max(1, int(round(w)))


def resize_density(density: torch.Tensor, size) -> torch.Tensor:
    """A density map ([H, W] or [..., H, W]) resampled to ``size`` with its total kept: bilinear
    resampling (antialiased when shrinking) followed by a rescale to the original sum, per map."""
    h, w = size
    if tuple(density.shape[-2:]) == (h, w):
        return density
    lead = density.shape[:-2]
    d = density.reshape(-1, 1, *density.shape[-2:]).to(torch.float32)
    total = d.sum(dim=(-2, -1), keepdim=True, dtype=torch.float64)
    shrink = h < d.shape[-2] or w < d.shape[-1]
    out = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink).clamp_min_(0)
    got = out.sum(dim=(-2, -1), keepdim=True, dtype=torch.float64)
    ratio = torch.where(got > 0, total / got.clamp_min(1e-30), torch.zeros_like(got))
    return (out.double() * ratio).to(density.dtype).reshape(*lead, h, w)


def resize_sample(sample: dict, size) -> dict:
    """The sample at (H', W'): image bilinear (antialiased when shrinking), points scaled by
    (W'/W, H'/H) (a point at the right edge of pixel j lands at the right edge of its image pixel), the
    density resampled with its count kept."""
    h, w = size
    image = sample["image"]
    H, W = image.shape[-2:]
    if (H, W) == (h, w):
        return sample
    out = dict(sample)
    shrink = h < H or w < W
    out["image"] = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[0].clamp_(0, 1)
    scale = torch.tensor([w / W, h / H], dtype=sample["points"].dtype)
    out["points"] = sample["points"] * scale
    if "density" in sample:
        out["density"] = resize_density(sample["density"], (h, w))
    return out


def shrink_image(image: torch.Tensor, max_size) -> torch.Tensor:
    """RGB [3, H, W] in [0, 1] shrunk to fit ``max_size`` (:func:`resized_shape`: an int caps the longest side,
    a pair is a box; None: unchanged), antialiased bilinear as :func:`resize_sample` resizes an image: the
    image a counter's model sees of a photo."""
    if max_size is None:
        return image
    box = tuple(max_size) if isinstance(max_size, (list, tuple)) else max_size
    size = resized_shape(*image.shape[-2:], max_size=box)
    return resize_sample({"image": image, "points": torch.zeros(0, 2)}, size)["image"]


def crop_sample(sample: dict, top: int, left: int, height: int, width: int) -> dict:
    """The window [top, top+height) x [left, left+width) of the sample. Parts of the window outside the
    image are zero padding (so crops larger than small images still batch); points outside the window
    are dropped and the rest shifted, so the count is the number of heads inside the window."""
    image = sample["image"]
    H, W = image.shape[-2:]
    out = dict(sample)

    def window(t):
        canvas = t.new_zeros(*t.shape[:-2], height, width)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, H), min(left + width, W)
        if y1 > y0 and x1 > x0:
            canvas[..., y0 - top : y1 - top, x0 - left : x1 - left] = t[..., y0:y1, x0:x1]
        return canvas

    out["image"] = window(image)
    if "density" in sample:
        out["density"] = window(sample["density"])
    x, y = sample["points"][:, 0], sample["points"][:, 1]
    # the part of the window that is image: heads there are kept, heads in the padding do not exist
    inside = (x >= max(left, 0)) & (x < min(left + width, W)) & (y >= max(top, 0)) & (y < min(top + height, H))
    pts = sample["points"][inside] - torch.tensor([left, top], dtype=sample["points"].dtype)
    out["points"] = pts
    return out


def flip_sample(sample: dict) -> dict:
    """The mirror image (left-right). A point x maps to W - x: pixel j, covering [j, j+1), becomes pixel
    W-1-j, covering [W-1-j, W-j), and x = j + f goes to W - j - f, inside it (for 0 < f < 1)."""
    out = dict(sample)
    W = sample["image"].shape[-1]
    out["image"] = sample["image"].flip(-1)
    if "density" in sample:
        out["density"] = sample["density"].flip(-1)
    pts = sample["points"].clone()
    pts[:, 0] = W - pts[:, 0]
    out["points"] = pts
    return out


class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize policy (see :func:`resized_shape`): ``max_size`` (int or (a, b) box), ``min_size``,
    ``multiple`` (e.g. 16). Points are scaled with the image; a density map is resampled, count kept."""

    def __init__(self, max_size=None, min_size: int | None = None, multiple: int = 1):
        if max_size is not None and not isinstance(max_size, numbers.Integral):
            _pair(max_size, "max_size")
        elif max_size is not None and (isinstance(max_size, bool) or max_size < 1):
            raise ValueError(f"max_size must be a positive int or a pair, got {max_size!r}")
        if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 1):
            raise ValueError(f"min_size must be a positive int or None, got {min_size!r}")
        if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {multiple!r}")
        self.max_size, self.min_size, self.multiple = max_size, min_size, int(multiple)

    def __call__(self, sample: dict) -> dict:
        H, W = sample["image"].shape[-2:]
        size = resized_shape(H, W, max_size=self.max_size, min_size=self.min_size, multiple=self.multiple)
        return resize_sample(sample, size)

    def __repr__(self) -> str:
        return f"Resize(max_size={self.max_size!r}, min_size={self.min_size!r}, multiple={self.multiple})"


class RandomCrop:
    """A random window of a fixed ``size`` (int or (h, w)) or of a ``fraction`` of each side (e.g. 0.5:
    a quarter of the image). Images smaller than the window are zero-padded at the bottom/right, so
    fixed crops always batch."""

    def __init__(self, size=None, *, fraction: float | None = None, generator: torch.Generator | None = None):
        if (size is None) == (fraction is None):
            raise ValueError(f"give exactly one of size and fraction, got size={size!r}, fraction={fraction!r}")
        self.size = None if size is None else _pair(size, "size")
        if fraction is not None and not (isinstance(fraction, numbers.Real) and 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=self.generator)) if high > 0 else 0

    def __call__(self, sample: dict) -> dict:
        H, W = sample["image"].shape[-2:]
        if self.size is not None:
            h, w = self.size
        else:
            h, w = max(1, int(math.floor(H * self.fraction))), max(1, int(math.floor(W * self.fraction)))
        top, left = self._randint(H - h), self._randint(W - w)
        return crop_sample(sample, top, left, h, w)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size!r})" if self.size else f"RandomCrop(fraction={self.fraction})"


class RandomHorizontalFlip:
    """Mirrors the sample left-right with probability ``p`` (see :func:`flip_sample`)."""

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        if not (isinstance(p, numbers.Real) and 0 <= p <= 1):
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p, self.generator = float(p), generator

    def __call__(self, sample: dict) -> dict:
        if float(torch.rand((), generator=self.generator)) < self.p:
            return flip_sample(sample)
        return sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"
