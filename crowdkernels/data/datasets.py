"""Annotation readers and split-folder layouts of the public crowd-counting datasets.

Every reader returns the head points of one image as a float64 NumPy array of shape [N, 2] in (x, y)
pixel coordinates (pixel (i, j) covers [j, j+1) x [i, i+1), as the density API expects), exactly as
annotated: points outside the image are kept (UCF_CC_50 has a few), dropping them is the density
op's job. A file that is missing, unreadable, or holds anything but finite [N, 2] points raises
:class:`AnnotationError`, whose message names the file.

Layouts (ROOT is one split folder):

==============  ======================================================================
shanghaitech    ROOT/images/IMG_N.jpg, ROOT/ground-truth/GT_IMG_N.mat
                (``image_info[0, 0][0, 0]["location"]``)
ucf_cc_50       ROOT/N.jpg, ROOT/N_ann.mat (``annPoints``)
ucf_qnrf        ROOT/img_XXXX.jpg, ROOT/img_XXXX_ann.mat (``annPoints``)
jhu             ROOT/images/XXXX.jpg, ROOT/gt/XXXX.txt (one head per line: ``x y w h o b``)
nwpu            ROOT/images/XXXX.jpg, ROOT/jsons/XXXX.json (``{"points": [[x, y], ...]}``)
==============  ======================================================================

New formats are one :class:`DatasetFormat` added to :data:`FORMATS`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "AnnotationError",
    "ImageError",
    "LayoutError",
    "DatasetFormat",
    "Sample",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "read_shanghaitech_mat",
    "read_ucf_mat",
    "read_jhu_txt",
    "read_nwpu_json",
    "read_points",
    "image_size",
    "list_samples",
    "natural_key",
    "count_inside",
    "relative_to_root",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class AnnotationError(ValueError):
    """An annotation file is missing, unreadable, or does not hold finite [N, 2] points."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageError(ValueError):
    """An image file is missing or its header cannot be read."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LayoutError(ValueError):
    """A dataset root does not have the folder layout of its format."""


# ----------------------------------------------------------------------------------------- helpers
def natural_key(name: str):
    """Sort key putting IMG_2 before IMG_10 (UCF_CC_50's cross-validation folds are by image number)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _as_points(path: Path, array) -> np.ndarray:
    """Validated float64 [N, 2] (x, y) points, or AnnotationError naming `path`."""
    try:
        pts = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(path, f"points are not numeric ({exc})") from None
    if pts.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise AnnotationError(path, f"expected points of shape [N, 2] (x, y), got shape {pts.shape}")
    pts = np.ascontiguousarray(pts)
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise AnnotationError(
            path, f"{int(bad.sum())} point(s) are not finite, first at row {row}: {pts[row].tolist()}"
        )
    return pts


def _loadmat(path: Path) -> dict:
    import scipy.io  # scipy is slow to import and only the .mat formats need it

    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        return scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, MatReadError, ... on bad files
        raise AnnotationError(path, f"not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None


def _mat_keys(mat: dict) -> list[str]:
    return sorted(k for k in mat if not k.startswith("__"))


# ----------------------------------------------------------------------------------------- readers
def read_shanghaitech_mat(path) -> np.ndarray:
    """ShanghaiTech ``GT_IMG_N.mat``: ``image_info[0, 0][0, 0]["location"]``, float64 [N, 2] (x, y)."""
    path = Path(path)
    mat = _loadmat(path)
    if "image_info" not in mat:
        raise AnnotationError(path, f"no 'image_info' variable (a ShanghaiTech GT file has one; found {_mat_keys(mat)})")
    try:
        location = mat["image_info"][0, 0][0, 0]["location"]
    except (IndexError, KeyError, ValueError, TypeError) as exc:
        raise AnnotationError(path, f"'image_info' has no [0, 0][0, 0]['location'] field ({exc})") from None
    return _as_points(path, location)


def read_ucf_mat(path) -> np.ndarray:
    """UCF_CC_50 ``N_ann.mat`` and UCF-QNRF ``img_XXXX_ann.mat``: ``annPoints``, float64 [N, 2] (x, y)."""
    path = Path(path)
    mat = _loadmat(path)
    if "annPoints" not in mat:
        raise AnnotationError(path, f"no 'annPoints' variable (found {_mat_keys(mat)})")
    return _as_points(path, mat["annPoints"])


def read_jhu_txt(path) -> np.ndarray:
    """JHU-CROWD++ ``gt/XXXX.txt``: one head per line, ``x y w h occlusion blur``; the first two columns
    are the point. An empty file is an image without heads."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot read the text file ({exc})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise AnnotationError(path, f"line {lineno}: expected 'x y ...', got {line.strip()!r}")
        try:
            rows.append((float(fields[0]), float(fields[1])))
        except ValueError:
            raise AnnotationError(path, f"line {lineno}: x and y are not numbers: {line.strip()!r}") from None
    return _as_points(path, rows)


def read_nwpu_json(path) -> np.ndarray:
    """NWPU-Crowd ``jsons/XXXX.json``: ``{"img_id": ..., "human_num": N, "points": [[x, y], ...], ...}``.
    A bare list of [x, y] pairs is accepted too."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"not a readable JSON file ({exc})") from None
    if isinstance(data, dict):
        if "points" not in data:
            raise AnnotationError(path, f"no 'points' key (found {sorted(data)})")
        data = data["points"]
    if not isinstance(data, list):
        raise AnnotationError(path, f"'points' must be a list of [x, y] pairs, got {type(data).__name__}")
    return _as_points(path, data)


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image from its header only: Pillow opens lazily and the pixels are never decoded.
    The stored pixel grid is used (EXIF orientation is ignored), which is what the annotations refer to."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "image file not found")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageError(path, f"cannot read the image header ({exc})") from None
    if width < 1 or height < 1:
        raise ImageError(path, f"image header gives an empty size {width}x{height}")
    return int(height), int(width)


# ----------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Sample:
    """One annotated image of a dataset split. ``annotation`` is where the format expects the points;
    it may not exist (then :meth:`points` raises AnnotationError naming it)."""

    name: str
    image: Path
    annotation: Path
    format: str

    def points(self) -> np.ndarray:
        """float64 [N, 2] (x, y) points as annotated (out-of-image points included)."""
        return FORMATS[self.format].reader(self.annotation)

    def size(self) -> tuple[int, int]:
        """(H, W) from the image header."""
        return image_size(self.image)


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


def _is_ucf_cc_50_image(p: Path) -> bool:
    return p.stem.isdigit()


def _is_qnrf_image(p: Path) -> bool:
    return p.stem.startswith("img_") and not p.stem.endswith("_ann")


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat(
            name="shanghaitech",
            layout="ROOT/images/IMG_N.jpg with ROOT/ground-truth/GT_IMG_N.mat (e.g. ROOT = part_A/train_data)",
            image_dir="images",
            annotation_path=lambda root, img: root / "ground-truth" / f"GT_{img.stem}.mat",
            reader=read_shanghaitech_mat,
            required_dirs=("images", "ground-truth"),
            split_hint=("train_data", "test_data", "part_A", "part_B"),
        ),
        DatasetFormat(
            name="ucf_cc_50",
            layout="ROOT/N.jpg with ROOT/N_ann.mat side by side (N = 1..50)",
            image_dir="",
            annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
            reader=read_ucf_mat,
            image_filter=_is_ucf_cc_50_image,
        ),
        DatasetFormat(
            name="ucf_qnrf",
            layout="ROOT/img_XXXX.jpg with ROOT/img_XXXX_ann.mat side by side (e.g. ROOT = UCF-QNRF_ECCV18/Train)",
            image_dir="",
            annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
            reader=read_ucf_mat,
            image_filter=_is_qnrf_image,
            split_hint=("Train", "Test"),
        ),
        DatasetFormat(
            name="jhu",
            layout="ROOT/images/XXXX.jpg with ROOT/gt/XXXX.txt (e.g. ROOT = jhu_crowd_v2.0/train)",
            image_dir="images",
            annotation_path=lambda root, img: root / "gt" / f"{img.stem}.txt",
            reader=read_jhu_txt,
            required_dirs=("images", "gt"),
            split_hint=("train", "val", "test"),
        ),
        DatasetFormat(
            name="nwpu",
            layout="ROOT/images/XXXX.jpg with ROOT/jsons/XXXX.json",
            image_dir="images",
            annotation_path=lambda root, img: root / "jsons" / f"{img.stem}.json",
            reader=read_nwpu_json,
            required_dirs=("images", "jsons"),
        ),
    )
}


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


def list_samples(root, format: str, *, missing: str = "raise") -> list[Sample]:
    """The (image, annotation) pairs of one split folder, in natural order of the image names.

    Args:
        root: the split folder (see the module docstring for each format's layout).
        format: one of :data:`FORMATS` ("shanghaitech", "ucf_cc_50", "ucf_qnrf", "jhu", "nwpu").
        missing: "raise" (default): an AnnotationError listing every image whose annotation file is
            absent; "keep": return those samples anyway (reading their points raises AnnotationError
            naming the absent file), so a long run can report them per file and go on.
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
    if missing == "raise":
        lost = [s.annotation for s in samples if not s.annotation.is_file()]
        if lost:
            shown = ", ".join(str(p) for p in lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise AnnotationError(lost[0], f"annotation file not found ({len(lost)} missing: {shown})")
    return samples


def relative_to_root(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it (for manifests that stay valid when a tree moves)."""
    try:
        return os.path.relpath(path, root) if Path(path).resolve().is_relative_to(Path(root).resolve()) else str(path)
    except (ValueError, OSError):
        return str(path)


def count_inside(points: np.ndarray, size: tuple[int, int]) -> int:
    """How many points lie inside an (H, W) image, [0, W) x [0, H): the ones the density op keeps."""
    h, w = size
    if points.shape[0] == 0:
        return 0
    x, y = points[:, 0], points[:, 1]
    return int(np.count_nonzero((x >= 0) & (x < w) & (y >= 0) & (y < h)))

