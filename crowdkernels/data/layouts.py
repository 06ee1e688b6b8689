"""Split folders on disk: where a format keeps its images and each image's annotation file, the
(image, annotation) pairs of one split folder (:func:`list_samples`), and the annotation files that belong
to no image (:func:`orphan_annotations`).

A :class:`DatasetFormat` describes one split folder ROOT: e.g. ShanghaiTech's ROOT/images/IMG_N.jpg with
ROOT/ground-truth/GT_IMG_N.mat, or the generic ``folder`` format's ROOT/NAME.jpg with a point file
ROOT/NAME.txt | .csv | .json beside it. :data:`FORMATS` maps each format's name to its :class:`DatasetFormat`:
the formats of the datasets registered with :func:`crowdkernels.data.specs.register_dataset`, which defines
them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .readers import POINT_EXTENSIONS, AnnotationError, image_orientation, image_points, image_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "LayoutError",
    "DatasetWarning",
    "natural_key",
    "Sample",
    "DatasetFormat",
    "FORMATS",
    "read_points",
    "has_layout",
    "orphan_annotations",
    "list_samples",
    "point_file_beside",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class LayoutError(ValueError):
    """A dataset root does not have the folder layout of its format."""


class DatasetWarning(UserWarning):
    """Something in a dataset folder is left out (e.g. an annotation file whose image is missing)."""


def natural_key(name: str):
    """Sort key putting IMG_2 before IMG_10 (UCF_CC_50's cross-validation folds are by image number)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Sample:
    """One annotated image of a dataset split. ``annotation`` is where the format expects the points;
    it may not exist (then :meth:`points` raises AnnotationError naming it)."""

    name: str
    image: Path
    annotation: Path
    format: str

    def points(self) -> np.ndarray:
        """float64 [N, 2] (x, y) points as annotated (out-of-image points included), on the image shown
        upright: a photo's EXIF orientation turns its points with it (:func:`image_points`)."""
        return image_points(FORMATS[self.format].reader(self.annotation), self.image)

    def size(self) -> tuple[int, int]:
        """(H, W) of the image shown upright, from its header."""
        return image_size(self.image)

    def orientation(self) -> int:
        """The image's EXIF orientation (1-8; 1: none), from its header."""
        return image_orientation(self.image)


@dataclass(frozen=True)
class DatasetFormat:
    """How one dataset lays out a split: where the images are, where each image's annotation is, and
    the reader for it. ``layout`` is the human description used in error messages."""

    name: str
    layout: str
    image_dir: str  # relative to ROOT ("" = ROOT itself)
    annotation_path: Callable[[Path, Path], Path]  # (root, image) -> expected annotation file
    reader: Callable[[object], np.ndarray]
    required_dirs: tuple[str, ...] = ()
    image_filter: Callable[[Path], bool] = lambda p: True
    split_hint: tuple[str, ...] = ()  # sub-folders that mean "you passed the dataset, not a split"
    # where the annotation files lie (relative to ROOT) and their glob patterns: the files found there
    # that belong to no image are reported (an annotation whose image is missing is otherwise dropped unseen)
    annotation_dir: str = ""
    annotation_globs: tuple[str, ...] = ()
    # every annotation file named like an image belongs to it, read or not (the folder layout's NAME.txt,
    # NAME.csv and NAME.json: one is read, the others are no orphans)
    annotations_by_stem: bool = False


#: format name -> :class:`DatasetFormat`, filled by :func:`crowdkernels.data.specs.register_dataset`
FORMATS: dict[str, DatasetFormat] = {}


def read_points(path, format: str) -> np.ndarray:
    """The reader of `format` applied to one annotation file: float64 [N, 2] (x, y)."""
    return _format(format).reader(Path(path))


def _format(format: str) -> DatasetFormat:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    return FORMATS[format]


def _layout_error(fmt: DatasetFormat, root: Path, problem: str) -> LayoutError:
    msg = f"{root} does not have the {fmt.name} layout: {problem}. Expected {fmt.layout}."
    present = [d for d in fmt.split_hint if (root / d).is_dir()]
    if present:
        msg += f" {root} holds {', '.join(d + '/' for d in present)}: pass one split folder as ROOT."
    return LayoutError(msg)


def orphan_annotations(root, format: str, samples) -> list[Path]:
    """The annotation files of a split folder that belong to no image of ``samples`` (their image is
    missing), in natural order. Where the format has ``annotations_by_stem`` (the generic ``folder`` layout),
    a file counts as belonging to an image of the same stem even when another file of that stem is the one read."""
    fmt = _format(format)
    root = Path(root)
    folder = root / fmt.annotation_dir if fmt.annotation_dir else root
    if not fmt.annotation_globs or not folder.is_dir():
        return []
    used = {s.annotation.resolve() for s in samples}
    stems = {s.image.stem for s in samples}
    found = {p for pattern in fmt.annotation_globs for p in folder.glob(pattern) if p.is_file()}
    orphans = [p for p in found if p.resolve() not in used and not (fmt.annotations_by_stem and p.stem in stems)]
    return sorted(orphans, key=lambda p: natural_key(p.name))


def _report_orphans(root: Path, fmt: DatasetFormat, samples, warn) -> None:
    orphans = orphan_annotations(root, fmt.name, samples)
    if not orphans:
        return
    shown = ", ".join(p.name for p in orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    msg = (f"{root}: {len(orphans)} annotation file(s) without an image are left out (their heads are not "
           f"counted): {shown}")
    if warn is not None:
        warn(msg)
    else:
        import warnings

        warnings.warn(msg, DatasetWarning, stacklevel=3)


def list_samples(root, format: str, *, missing: str = "raise", warn=None) -> list[Sample]:
    """The (image, annotation) pairs of one split folder, in natural order of the image names.

    Args:
        root: the split folder (its format's ``layout`` says what it holds).
        format: one of :data:`FORMATS` ("shanghaitech", "ucf_cc_50", "ucf_qnrf", "jhu", "nwpu", "folder").
        missing: "raise" (default): an AnnotationError listing every image whose annotation file is
            absent; "keep": return those samples anyway (reading their points raises AnnotationError
            naming the absent file), so a long run can report them per file and go on.
        warn: called with one message naming the annotation files whose image is missing (they are left
            out); default: a :class:`DatasetWarning`.
    Raises:
        LayoutError: ROOT is not a folder, lacks the format's sub-folders, or holds no images; the
            message gives the expected layout.
    """
    fmt = _format(format)
    if missing not in ("raise", "keep"):
        raise ValueError(f"missing must be 'raise' or 'keep', got {missing!r}")
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(fmt, root, "it is not a folder")
    absent = [d + "/" for d in fmt.required_dirs if not (root / d).is_dir()]
    if absent:
        raise _layout_error(fmt, root, f"missing {' and '.join(absent)}")
    image_dir = root / fmt.image_dir if fmt.image_dir else root
    images = sorted(
        (
            p
            for p in image_dir.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and fmt.image_filter(p)
        ),
        key=lambda p: natural_key(p.name),
    )
    if not images:
        where = f"{fmt.image_dir}/" if fmt.image_dir else "the folder itself"
        raise _layout_error(fmt, root, f"no matching images ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    samples = [Sample(p.stem, p, fmt.annotation_path(root, p), fmt.name) for p in images]
    _report_orphans(root, fmt, samples, warn)
    if missing == "raise":
        lost = [s.annotation for s in samples if not s.annotation.is_file()]
        if lost:
            shown = ", ".join(str(p) for p in lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise AnnotationError(lost[0], f"annotation file not found ({len(lost)} missing: {shown})")
    return samples


def has_layout(folder: Path, fmt: DatasetFormat) -> bool:
    """Whether ``folder`` is a split folder of ``fmt``: it holds the format's sub-folders, or, for a format
    without any, images the format takes."""
    return folder.is_dir() and all((folder / d).is_dir() for d in fmt.required_dirs) and (
        bool(fmt.required_dirs) or any(p.suffix.lower() in IMAGE_EXTENSIONS and fmt.image_filter(p) for p in folder.iterdir())
    )


def point_file_beside(image) -> Path | None:
    """The point file of an image in the ``folder`` layout: NAME.txt, NAME.csv or NAME.json beside
    NAME.jpg (the first that exists, in that order), or None."""
    image = Path(image)
    for ext in POINT_EXTENSIONS:
        p = image.with_suffix(ext)
        if p.is_file():
            return p
    return None
