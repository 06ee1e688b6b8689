"""The Dataset classes: annotated images as training samples (:class:`CrowdDataset`, from the
:class:`~crowdkernels.data.layouts.Sample` list of :func:`~crowdkernels.data.specs.dataset_samples` or
:func:`~crowdkernels.data.layouts.list_samples`) and synthetic crowds as samples of the same form
(:class:`SyntheticCrowds`). A sample is ``{"image": float32 [3, H, W] RGB in [0, 1], "points": float32
[N, 2] (x, y) pixels, "name", "index"}``, through the dataset's ``transform``, for
:class:`crowdkernels.data.CrowdCollate`.
"""
from __future__ import annotations

import numpy as np
import torch

from .readers import AnnotationError, ImageError, load_image
from .synthetic import SyntheticSample, synthetic_crowd, synthetic_set

__all__ = ["DENSITY_LEVELS", "density_level", "CrowdDataset", "SyntheticCrowds"]

#: JHU-CROWD++'s count subsets (Sindagi et al., PAMI 2020), as inclusive count ranges; None: no upper bound.
DENSITY_LEVELS = {"low": (0, 50), "medium": (51, 500), "high": (501, None)}


def density_level(count: float, levels: dict = DENSITY_LEVELS) -> str | None:
    """The name of the level whose inclusive [lo, hi] range holds ``count`` (rounded), or None."""
    c = int(round(count))
    for name, (lo, hi) in levels.items():
        if c >= lo and (hi is None or c <= hi):
            return name
    return None


class CrowdDataset(torch.utils.data.Dataset):
    """Annotated images as samples ``{"image": [3, H, W], "points": [N, 2], "name", "index"}`` (plus
    ``"density"`` with a cache), through ``transform``, for :class:`crowdkernels.data.CrowdCollate`.

    Annotations and image headers are checked once, up front: a missing file, a corrupt annotation, or
    NaN points give a warning naming the file and the sample is left out (``skipped`` maps its name to
    the reason), or, with ``strict=True``, the error is raised. An image that fails to decode later
    yields ``{"name", "error"}`` (with strict too), which the collate reports instead of batching and the
    consumer (:func:`crowdkernels.engine.evaluate`, the Trainer) raises when strict.
    Points outside their image are dropped at load, so ``counts`` are the heads a density map holds.

    Args:
        samples: :class:`Sample` list (from :func:`list_samples` or :func:`dataset_samples`).
        transform: ``sample -> sample`` (see :mod:`crowdkernels.data.transforms`).
        density_cache: a :class:`crowdkernels.data.DensityCache` to read the targets from.
        levels: keep only images whose count falls in these :data:`DENSITY_LEVELS` names (e.g. ["high"]).
    """

    def __init__(self, samples, transform=None, *, strict: bool = False, density_cache=None, levels=None, warn=None):
        import warnings

        self.transform = transform
        self.strict = strict
        self.density_cache = density_cache
        self.samples, self.points, self.skipped = [], [], {}
        report = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        for s in samples:
            try:
                size = s.size()
                pts = s.points()
            except (AnnotationError, ImageError) as exc:
                if strict:
                    raise
                self.skipped[s.name] = str(exc)
                report(f"skipping {exc}")
                continue
            h, w = size
            inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
            pts = pts[inside]
            if levels is not None and density_level(pts.shape[0]) not in levels:
                continue
            self.samples.append(s)
            self.points.append(pts.astype(np.float32))

    @property
    def counts(self) -> list[int]:
        return [int(p.shape[0]) for p in self.points]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        try:
            item = {"image": load_image(s.image), "points": torch.from_numpy(self.points[index]), "name": s.name, "index": index}
            if tuple(item["image"].shape[-2:]) != s.size():
                raise ImageError(s.image, f"decoded size {tuple(item['image'].shape[-2:])} differs from the header's {s.size()}")
            if self.density_cache is not None:
                item["density"] = self.density_cache.load(s.name, item["image"].shape[-2:])
        except (ImageError, ValueError, OSError) as exc:
            # returned even with strict: raised here, in a DataLoader worker, it would reach the main process
            # as a RuntimeError holding a traceback; the consumer (evaluate, Trainer) raises it with strict
            return {"name": s.name, "error": str(exc), "index": index}
        return self.transform(item) if self.transform is not None else item


class SyntheticCrowds(torch.utils.data.Dataset):
    """Synthetic crowds (:mod:`crowdkernels.data.synthetic`) as samples of the same form as
    :class:`CrowdDataset`. Crowd i is rendered on the fly from (seed, i)
    (:func:`~crowdkernels.data.synthetic.synthetic_crowd`: the densities go from sparse to dense over the set),
    so DataLoader workers agree without sharing state, and with ``cache`` it is kept in each process.

    Args:
        num_images: the number of crowds, >= 1.
        size: H = W = size, or (H, W); at least 16.
        seed: an int >= 0; the same seed gives the same images.
        transform: ``sample -> sample`` (see :mod:`crowdkernels.data.transforms`).
        cache: keep each rendered crowd.
        render_kwargs: for :func:`crowdkernels.data.synthetic.render_crowd` (e.g. ``min_heads``, ``max_heads``).
    """

    def __init__(self, num_images: int = 20, size=128, seed: int = 0, transform=None, *, cache: bool = True,
                 **render_kwargs):
        self.num_images, self.size, self.seed = synthetic_set(num_images, size, seed)
        self.transform = transform
        self.render_kwargs = render_kwargs
        self.skipped: dict = {}
        self._cache: dict[int, SyntheticSample] | None = {} if cache else None

    def sample(self, index: int) -> SyntheticSample:
        """The rendered crowd ``index`` (negative counts from the end): uint8 [H, W, 3] image, float64 [N, 2]
        points, [N] head radii."""
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = synthetic_crowd(index, self.num_images, self.size, self.seed, **self.render_kwargs)
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    @property
    def base(self) -> list[SyntheticSample]:
        """Every rendered crowd, in index order (rendered now where not cached)."""
        return [self.sample(i) for i in range(self.num_images)]

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.base]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        item = {"image": s.image_tensor(), "points": s.points_tensor(), "name": s.name, "index": index}
        return self.transform(item) if self.transform is not None else item
