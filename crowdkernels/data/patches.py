"""Training-set expansions: each image repeated per epoch (:class:`Repeated`), and CSRNet's training patches
(Li et al., CVPR 2018, sec. 3): "we crop 9 patches from each image at different locations with 1/4 size of
the original image. The first four patches contain four quarters of the image without overlapping while the
other five patches are randomly cropped from the input image. After that, we mirror the patches so that we
double the training set."
"""
from __future__ import annotations

import torch

from .transforms import crop_sample, flip_sample

__all__ = ["NinePatches", "Repeated"]

PATCHES_PER_IMAGE = 9


class NinePatches(torch.utils.data.Dataset):
    """Each sample of ``base`` (RGB in [0, 1], as :class:`crowdkernels.data.CrowdDataset` yields them) as 18
    samples: 9 patches of half its height and half its width (a quarter of its area), each as it is and
    mirrored. Patches 0-3 are the quarters (top-left, top-right, bottom-left, bottom-right; an odd side
    leaves its last row or column out), patches 4-8 are at random positions drawn from torch's RNG (a new
    draw each time they are read, as a random crop). Index ``i`` is image ``i // 18``, patch ``(i % 18) // 2``,
    mirrored when ``i`` is odd. ``post`` (e.g. the input normalization) is applied last. Samples that failed to
    load (``{"name", "error"}``) pass through."""

    def __init__(self, base, post=None):
        self.base, self.post = base, post
        self.skipped = dict(getattr(base, "skipped", {}) or {})

    @property
    def counts(self) -> list:
        """The head counts of the whole images (not of the patches)."""
        return list(getattr(self.base, "counts", []))

    def __len__(self) -> int:
        return 2 * PATCHES_PER_IMAGE * len(self.base)

    def __getitem__(self, index: int) -> dict:
        image_index, rest = divmod(int(index), 2 * PATCHES_PER_IMAGE)
        patch, mirror = divmod(rest, 2)
        sample = self.base[image_index]
        if "error" in sample:
            return sample
        H, W = sample["image"].shape[-2:]
        h, w = max(1, H // 2), max(1, W // 2)
        if patch < 4:
            top, left = (patch // 2) * h, (patch % 2) * w
        else:
            top = int(torch.randint(0, H - h + 1, (1,)))
            left = int(torch.randint(0, W - w + 1, (1,)))
        out = crop_sample(sample, top, left, h, w)
        if mirror:
            out = flip_sample(out)
        out["name"] = f"{sample['name']}#p{patch}{'m' if mirror else ''}"
        return self.post(out) if self.post is not None else out


class Repeated(torch.utils.data.Dataset):
    """Each sample of ``base`` ``times`` times an epoch: index ``i`` is sample ``i // times`` (a new draw of
    its random crop and flip each time), as the released HMoDE ``SHHA.py`` reads ``index // data_augment``
    (``AUGMENT`` in its ``setting.py``) and the released CSRNet ``dataset.py`` lists every training image 4
    times (``root * 4``). Other attributes (``counts``, ``samples``, ``skipped``, ...) are ``base``'s."""

    def __init__(self, base, times: int):
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"repeat must be an int >= 1, got {times!r}")
        self.base, self.times = base, times

    def __len__(self) -> int:
        return self.times * len(self.base)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.base[int(index) // self.times]

    def __getattr__(self, name):
        if name == "base":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.base, name)
