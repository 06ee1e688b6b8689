"""Ground-truth density maps for training: made on the fly with :func:`crowdkernels.density_maps` after
augmentation (so they follow the crop and the flip exactly), or read from the cache that
``crowdkernels density`` writes (then the transforms move the maps with the images).

:class:`CrowdCollate` turns a list of samples into a batch for the models' criteria::

    {"images": [B, 3, H, W], "points": B x [N_i, 2], "density": [B, 1, H, W] (full resolution),
     "counts": [B] (heads in each image), "names": [...], "sizes": B x (h, w) before padding,
     "skipped": [(name, reason), ...] (samples that failed to load)}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ..ops.density import density_maps
from .transforms import crop_sample

__all__ = ["DensityTarget", "DensityCache", "CrowdCollate"]


@dataclass(frozen=True)
class DensityTarget:
    """The ``density_maps`` settings of the ground truth (docs/definitions.md, "Density maps"); calling it makes
    the [B, 1, H, W] maps of a ragged batch of points in one pass of the kernel. The default is the
    geometry-adaptive "exact" style, whose maps sum to the head count."""

    style: str = "exact"
    sigma: object = "adaptive"
    k: int = 3
    beta: float = 0.3
    truncate: float = 4.0
    kernel_size: int = 15

    def __call__(self, points_list, size) -> torch.Tensor:
        return density_maps([p.float() for p in points_list], size, **asdict(self))


class DensityCache:
    """The maps a ``crowdkernels density --out FOLDER`` run wrote (FOLDER/<image stem>.npy, float32,
    with FOLDER/manifest.json). Only full-resolution maps (``--stride 1``) can follow the transforms."""

    def __init__(self, folder):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
            self.settings = dict(data["settings"])
            self.images = dict(data.get("images", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{manifest}: not a density cache written by `crowdkernels density` ({type(exc).__name__}: {exc})"
            ) from None
        if int(self.settings.get("stride", 1)) != 1:
            raise ValueError(
                f"{manifest}: the cached maps have stride {self.settings['stride']}; training targets need "
                "full-resolution maps (rerun `crowdkernels density` with --stride 1)"
            )

    def load(self, name: str, size) -> torch.Tensor:
        """float32 [H, W] map of image ``name``; ValueError naming the file when absent or of another size."""
        path = self.folder / f"{name}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the cached density map ({exc})") from None
        if tuple(arr.shape) != tuple(size):
            raise ValueError(f"{path}: cached map is {tuple(arr.shape)}, the image is {tuple(size)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: cached map holds NaN or inf")
        return torch.from_numpy(arr.astype(np.float32, copy=False))


def _pad_to(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) if t.shape[-2:] != (h, w) else t


class CrowdCollate:
    """Collates samples of different sizes: images (and cached maps) zero-padded at the bottom/right to
    the largest (rounded up to ``multiple``), points kept as a ragged list, density targets made with
    ``target`` on the padded canvas (None: no "density" unless the samples carry cached maps).
    Samples that failed to load (``{"name", "error"}``) are listed under "skipped", not batched.
    ``tiles=t`` cuts each sample into t x t parts of ceil(H/t) x ceil(W/t) pixels (the last row and column
    of parts zero-padded), batched together: L2SM sec. 4.2 trains on UCF-QNRF images "divided into 2 x 2
    and combined into a tensor with batch size equal to 4". Each head goes to the part holding it."""

    def __init__(self, target: DensityTarget | None = DensityTarget(), multiple: int = 1, tiles: int = 1):
        self.target = target
        self.multiple = int(multiple)
        if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
            raise ValueError(f"tiles must be an int >= 1, got {tiles!r}")
        self.tiles = tiles

    def _cut(self, item: dict) -> list[dict]:
        t = self.tiles
        H, W = item["image"].shape[-2:]
        h, w = -(-H // t), -(-W // t)
        parts = []
        for i in range(t):
            for j in range(t):
                part = crop_sample(item, i * h, j * w, h, w)
                part["name"] = f"{item['name']}#{i * t + j}"
                parts.append(part)
        return parts

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if "error" not in it]
        if self.tiles > 1:
            good = [part for it in good for part in self._cut(it)]
        batch = {"skipped": [(it["name"], it["error"]) for it in items if "error" in it]}
        batch["names"] = [it["name"] for it in good]
        if not good:
            batch.update(images=None, points=[], density=None, counts=torch.zeros(0), sizes=[])
            return batch
        m = self.multiple
        h = -(-max(it["image"].shape[-2] for it in good) // m) * m
        w = -(-max(it["image"].shape[-1] for it in good) // m) * m
        batch["sizes"] = [tuple(it["image"].shape[-2:]) for it in good]
        batch["images"] = torch.stack([_pad_to(it["image"], h, w) for it in good])
        batch["points"] = [it["points"] for it in good]
        batch["counts"] = torch.tensor([float(it["points"].shape[0]) for it in good])
        if all("density" in it for it in good):
            batch["density"] = torch.stack([_pad_to(it["density"], h, w) for it in good]).unsqueeze(1)
        elif self.target is not None:
            batch["density"] = self.target(batch["points"], (h, w))
        else:
            batch["density"] = None
        return batch
