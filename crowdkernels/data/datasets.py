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
folder          ROOT/NAME.jpg with ROOT/NAME.txt | .csv | .json (generic point files)
==============  ======================================================================

Above the split folders: :func:`dataset_samples` finds a named dataset's splits under its root
(ShanghaiTech ``part_A/train_data``, UCF-QNRF ``Train``/``Test``, JHU ``train``/``val``/``test``, NWPU's
``train.txt``/``val.txt`` lists, UCF_CC_50's 5 folds), and :class:`CrowdDataset` turns samples into
training samples, skipping bad files with a warning that names them.

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
import torch

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
    "image_orientation",
    "image_points",
    "exif_orientation",
    "upright",
    "oriented_size",
    "orient_points",
    "EXIF_ORIENTATION_TAG",
    "list_samples",
    "natural_key",
    "count_inside",
    "relative_to_root",
    "POINT_EXTENSIONS",
    "read_point_file",
    "point_file_beside",
    "DENSITY_LEVELS",
    "DATASET_NAMES",
    "density_level",
    "ucf_cc_50_folds",
    "holdout",
    "dataset_samples",
    "load_image",
    "pil_to_rgb",
    "orphan_annotations",
    "DatasetWarning",
    "CrowdDataset",
    "SyntheticCrowds",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class AnnotationError(ValueError):
    """An annotation file is missing, unreadable, or does not hold finite [N, 2] points."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageError(ValueError):
    """An image file is missing or its header cannot be read. The message names ``path`` as given (a URL keeps
    its "//", which ``Path`` would fold)."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


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


# ----------------------------------------------------------------------------------------- orientation
#: the EXIF tag of a photo's orientation: how the stored pixels must be turned to show the scene upright
EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(im) -> int:
    """The EXIF orientation (1-8) of an open Pillow image, 1 when it has none or an invalid one. Read from the
    header: a PNG whose eXIf chunk does not come before its pixels counts as 1 (Pillow would decode the whole
    image to find it)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im):
    """The Pillow image as a viewer shows it: turned by its EXIF orientation
    (:func:`PIL.ImageOps.exif_transpose`), or the image itself when it has none."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if exif_orientation(im) != 1 else im


def oriented_size(size, orientation: int) -> tuple[int, int]:
    """(H, W) of an image shown upright, from its stored (H, W): orientations 5-8 swap the sides."""
    h, w = int(size[0]), int(size[1])
    return (w, h) if orientation >= 5 else (h, w)


def _flip(c: np.ndarray, length: float) -> np.ndarray:
    """``length - c``, except that the two edges of [0, length) keep their side: a point on the first pixel's
    edge (0) lands inside the last pixel, one on the far edge (``length``, outside) lands outside."""
    out = length - c
    out[c == 0] = np.nextafter(float(length), 0.0)
    out[c == length] = np.nextafter(0.0, -1.0)
    return out


def orient_points(points, orientation: int, size) -> np.ndarray:
    """Head points of the stored pixel grid moved onto the image shown upright (what
    :func:`PIL.ImageOps.exif_transpose` does to the pixels).

    Args:
        points: [N, 2] (x, y) in pixel coordinates of the stored grid (pixel (i, j) covers [j, j+1) x [i, i+1)).
        orientation: the EXIF orientation, 1-8 (1: as stored; 3: turned 180; 6: turned 90 clockwise; 8: turned
            90 counter-clockwise; 2, 4, 5, 7: those with a mirror).
        size: the stored (H, W).
    Returns:
        float64 [N, 2] (x, y) in the upright image, whose size is :func:`oriented_size`. A point inside
        (outside) the stored image stays inside (outside).
    """
    if isinstance(orientation, bool) or not isinstance(orientation, int) or not 1 <= orientation <= 8:
        raise ValueError(f"orientation must be an EXIF orientation 1-8, got {orientation!r}")
    pts = np.array(points, dtype=np.float64).reshape(-1, 2)
    h, w = float(size[0]), float(size[1])
    x, y = pts[:, 0], pts[:, 1]
    new_x, new_y = {
        1: lambda: (x, y),
        2: lambda: (_flip(x, w), y),
        3: lambda: (_flip(x, w), _flip(y, h)),
        4: lambda: (x, _flip(y, h)),
        5: lambda: (y, x),
        6: lambda: (_flip(y, h), x),
        7: lambda: (_flip(y, h), _flip(x, w)),
        8: lambda: (y, _flip(x, w)),
    }[orientation]()
    return np.stack([new_x, new_y], axis=1)


def open_image_file(path):
    """``PIL.Image.open`` for every format Pillow reads except EPS, which Pillow renders by running Ghostscript
    (an external interpreter) whatever the file's suffix: images are parsed as data, never run."""
    from PIL import Image

    Image.init()
    return Image.open(path, formats=[f for f in Image.OPEN if f != "EPS"])


def _header(path: Path) -> tuple[int, int, int]:
    """(H, W) as stored and the EXIF orientation, from the header only (the pixels are never decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "image file not found")
    try:
        with open_image_file(path) as im:
            width, height = im.size
            orientation = exif_orientation(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageError(path, f"cannot read the image header ({exc})") from None
    if width < 1 or height < 1:
        raise ImageError(path, f"image header gives an empty size {width}x{height}")
    return int(height), int(width), orientation


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image shown upright (its EXIF orientation applied, as :func:`load_image` reads it), from
    its header only: Pillow opens lazily and the pixels are never decoded."""
    h, w, orientation = _header(Path(path))
    return oriented_size((h, w), orientation)


def image_orientation(path) -> int:
    """The EXIF orientation (1-8) of an image file, from its header; 1 when it has none."""
    return _header(Path(path))[2]


def image_points(points, image) -> np.ndarray:
    """Annotated head points of the image file ``image`` on the image as :func:`load_image` reads it:
    annotations refer to the stored pixel grid (the datasets were annotated on the pixels as stored, e.g.
    MATLAB's imread ignores EXIF), so they are turned with the image (:func:`orient_points`).
    float64 [N, 2] (x, y)."""
    h, w, orientation = _header(Path(image))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts if orientation == 1 else orient_points(pts, orientation, (h, w))


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
            annotation_dir="ground-truth",
            annotation_globs=("GT_*.mat",),
            split_hint=("train_data", "test_data", "part_A", "part_B"),
        ),
        DatasetFormat(
            name="ucf_cc_50",
            layout="ROOT/N.jpg with ROOT/N_ann.mat side by side (N = 1..50)",
            image_dir="",
            annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
            reader=read_ucf_mat,
            image_filter=_is_ucf_cc_50_image,
            annotation_globs=("[0-9]*_ann.mat",),
        ),
        DatasetFormat(
            name="ucf_qnrf",
            layout="ROOT/img_XXXX.jpg with ROOT/img_XXXX_ann.mat side by side (e.g. ROOT = UCF-QNRF_ECCV18/Train)",
            image_dir="",
            annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
            reader=read_ucf_mat,
            image_filter=_is_qnrf_image,
            annotation_globs=("img_*_ann.mat",),
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
            annotation_dir="gt",
            annotation_globs=("*.txt",),
        ),
        DatasetFormat(
            name="nwpu",
            layout="ROOT/images/XXXX.jpg with ROOT/jsons/XXXX.json",
            image_dir="images",
            annotation_path=lambda root, img: root / "jsons" / f"{img.stem}.json",
            reader=read_nwpu_json,
            required_dirs=("images", "jsons"),
            annotation_dir="jsons",
            annotation_globs=("*.json",),
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


def orphan_annotations(root, format: str, samples) -> list[Path]:
    """The annotation files of a split folder that belong to no image of ``samples`` (their image is
    missing), in natural order. A generic ``folder`` point file counts as belonging to an image of the same
    stem even when another point file of that stem is the one read."""
    fmt = _format(format)
    root = Path(root)
    folder = root / fmt.annotation_dir if fmt.annotation_dir else root
    if not fmt.annotation_globs or not folder.is_dir():
        return []
    used = {s.annotation.resolve() for s in samples}
    stems = {s.image.stem for s in samples}
    found = {p for pattern in fmt.annotation_globs for p in folder.glob(pattern) if p.is_file()}
    orphans = [p for p in found if p.resolve() not in used and not (fmt.name == "folder" and p.stem in stems)]
    return sorted(orphans, key=lambda p: natural_key(p.name))


class DatasetWarning(UserWarning):
    """Something in a dataset folder is left out (e.g. an annotation file whose image is missing)."""


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
        root: the split folder (see the module docstring for each format's layout).
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



# ----------------------------------------------------------------------------------------- generic folder
POINT_EXTENSIONS = (".txt", ".csv", ".json")


def read_point_file(path) -> np.ndarray:
    """A generic point file, by extension: ``.json`` (``{"points": [[x, y], ...]}``, a bare list of pairs,
    or a list of ``{"x": .., "y": ..}``); ``.txt``/``.csv`` (one head per line, ``x y`` or ``x,y``, extra
    columns ignored, one non-numeric header line allowed)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise AnnotationError(path, f"not a readable JSON file ({exc})") from None
            if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
                try:
                    return _as_points(path, [(d["x"], d["y"]) for d in data])
                except KeyError as exc:
                    raise AnnotationError(path, f"a point object lacks {exc}") from None
        return read_nwpu_json(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot read the text file ({exc})") from None
    rows = []
    first = True
    for lineno, line in enumerate(lines, 1):
        fields = line.replace(",", " ").replace(";", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            rows.append((float(fields[0]), float(fields[1])))
            first = False
        except (ValueError, IndexError):
            if first:  # a header line such as "x,y"
                first = False
                continue
            raise AnnotationError(path, f"line {lineno}: expected 'x y' or 'x,y', got {line.strip()!r}") from None
    return _as_points(path, rows)


def point_file_beside(image) -> Path | None:
    """The point file of an image in the ``folder`` layout: NAME.txt, NAME.csv or NAME.json beside
    NAME.jpg (the first that exists, in that order), or None."""
    image = Path(image)
    for ext in POINT_EXTENSIONS:
        p = image.with_suffix(ext)
        if p.is_file():
            return p
    return None


def _folder_annotation(root: Path, img: Path) -> Path:
    return point_file_beside(img) or img.with_suffix(".txt")


FORMATS["folder"] = DatasetFormat(
    name="folder",
    layout="ROOT/NAME.jpg (or .png, ...) with a point file ROOT/NAME.txt, NAME.csv or NAME.json side by side",
    image_dir="",
    annotation_path=_folder_annotation,
    reader=read_point_file,
    split_hint=("train", "val", "test"),
    annotation_globs=tuple(f"*{ext}" for ext in POINT_EXTENSIONS),
)


# ----------------------------------------------------------------------------------------- splits
#: JHU-CROWD++'s count subsets (Sindagi et al., PAMI 2020), as inclusive count ranges; None: no upper bound.
DENSITY_LEVELS = {"low": (0, 50), "medium": (51, 500), "high": (501, None)}

#: The dataset names of the CLI (``--dataset``).
DATASET_NAMES = ("shanghaitech-a", "shanghaitech-b", "ucf-cc-50", "ucf-qnrf", "jhu", "nwpu", "synthetic", "folder")

_FORMAT_OF = {
    "shanghaitech-a": "shanghaitech",
    "shanghaitech-b": "shanghaitech",
    "ucf-cc-50": "ucf_cc_50",
    "ucf-qnrf": "ucf_qnrf",
    "jhu": "jhu",
    "nwpu": "nwpu",
    "folder": "folder",
}


def density_level(count: float, levels: dict = DENSITY_LEVELS) -> str | None:
    """The name of the level whose inclusive [lo, hi] range holds ``count`` (rounded), or None."""
    c = int(round(count))
    for name, (lo, hi) in levels.items():
        if c >= lo and (hi is None or c <= hi):
            return name
    return None


def ucf_cc_50_folds(samples: list, fold: int) -> tuple[list, list]:
    """(train, test) of 5-fold cross-validation on UCF_CC_50: the samples in natural order of the image
    numbers, fold k (1-5) testing on the k-th fifth (images 10k-9 .. 10k of the full set) and training
    on the other four."""
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= 5:
        raise ValueError(f"fold must be an int in 1..5, got {fold!r}")
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    n = len(ordered)
    lo, hi = (fold - 1) * n // 5, fold * n // 5
    return ordered[:lo] + ordered[hi:], ordered[lo:hi]


def holdout(samples: list, every: int = 10) -> tuple[list, list]:
    """(train, held-out): every ``every``-th sample (natural order) is held out, at least one; the split
    used when a dataset root has no validation/test split."""
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    if len(ordered) < 2:
        return ordered, list(ordered)
    held = set(range(every - 1, len(ordered), every)) or {len(ordered) - 1}
    return [s for i, s in enumerate(ordered) if i not in held], [s for i, s in enumerate(ordered) if i in held]


def _split_folders(dataset: str, split: str) -> list[str]:
    """Where each dataset keeps a split, relative to the root a user may pass (the dataset's folder,
    or one part of it)."""
    train = split == "train"
    if dataset.startswith("shanghaitech"):
        part = "part_A" if dataset.endswith("-a") else "part_B"
        s = "train_data" if train else "test_data"
        return [f"{part}/{s}", f"{part}_final/{s}", s]
    if dataset == "ucf-qnrf":
        return ["Train"] if train else ["Test"]
    if dataset in ("jhu", "folder"):
        return ["train"] if train else ([split] if split != "val" else ["val", "test"])
    return []


def _has_layout(folder: Path, fmt: DatasetFormat) -> bool:
    return folder.is_dir() and all((folder / d).is_dir() for d in fmt.required_dirs) and (
        bool(fmt.required_dirs) or any(p.suffix.lower() in IMAGE_EXTENSIONS and fmt.image_filter(p) for p in folder.iterdir())
    )


def _found_splits(dataset: str, root: Path, fmt: DatasetFormat) -> str:
    """The split folders of ``dataset`` under ``root`` (for an error about one that is not there)."""
    found = []
    for split in ("train", "val", "test"):
        for rel in _split_folders(dataset, split):
            if rel not in found and _has_layout(root / rel, fmt):
                found.append(rel)
    if found:
        return ", ".join(f"{root / rel}/" for rel in found)
    if _has_layout(root, fmt):
        return f"{root}/ itself (one folder of images, no split folders)"
    subs = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
    return f"no split folder ({', '.join(subs[:10]) + (' ...' if len(subs) > 10 else '') if subs else 'no folders'})"


def dataset_samples(dataset: str, root, split: str = "train", *, fold: int | None = None, missing: str = "keep",
                    warn=None, whole: bool = False, fallback: bool = True):
    """The samples of one split of a named dataset (:data:`DATASET_NAMES`, not "synthetic").

    ``root`` is the dataset folder (e.g. ``ShanghaiTech/`` holding ``part_A/train_data``), one part of it,
    or a split folder. ``split`` is "train" or "val" ("val" is the test split where the dataset has no
    validation split, as the papers do; JHU and NWPU use their val split). UCF_CC_50 takes ``fold``
    (1-5). Where the root holds only one split (e.g. a single train_data folder), every 10th image is
    held out for "val" (:func:`holdout`); ``whole=True`` keeps every training image instead (for a
    validation split the caller makes itself, ``train --val-from-train``). ``fallback=False`` (a split the
    user named, ``eval --split val|test``) raises a LayoutError naming the split folders found instead of
    holding out training images for a "val" or "test" split the dataset does not have. ``warn`` reports
    annotation files without an image (see :func:`list_samples`). Returns (samples, note) with note saying
    which split was used. Raises LayoutError naming the expected layout.
    """
    if dataset not in _FORMAT_OF:
        raise ValueError(f"dataset must be one of {[d for d in DATASET_NAMES if d != 'synthetic']}, got {dataset!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    fmt = FORMATS[_FORMAT_OF[dataset]]
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"--root {root} is not a folder (expected the {dataset} dataset: {fmt.layout})")

    if dataset == "ucf-cc-50":
        samples = list_samples(root, fmt.name, missing=missing, warn=warn)
        train, test = ucf_cc_50_folds(samples, 1 if fold is None else fold)
        return (train if split == "train" else test), f"fold {fold or 1} of 5 ({len(test)} test images)"

    if dataset == "nwpu":
        samples = list_samples(root, fmt.name, missing=missing, warn=warn)
        listed = root / f"{split}.txt"
        if listed.is_file():
            ids = {line.split()[0] for line in listed.read_text().splitlines() if line.strip()}
            return [s for s in samples if s.name in ids], f"the images listed in {listed.name}"
        if whole and split == "train":
            return samples, f"every image of {root}"
        if not fallback and split != "train":
            lists = sorted(p.name for p in root.glob("*.txt")) or ["none"]
            raise LayoutError(f"there is no {split} split in {root}: no {split}.txt listing its images (lists found: "
                              f"{', '.join(lists)}); leave out --split to evaluate the images held out for validation")
        train, held = holdout(samples)
        return (train if split == "train" else held), f"no {split}.txt in {root}: every 10th image held out"

    other = "val" if split == "train" else "train"
    has_other = any(_has_layout(root / rel, fmt) for rel in _split_folders(dataset, other))
    for rel in _split_folders(dataset, split):
        if _has_layout(root / rel, fmt):
            if split == "train" and not has_other and not whole:
                # no validation split beside it: hold out the same images "val" will get
                train, _ = holdout(list_samples(root / rel, fmt.name, missing=missing, warn=warn))
                return train, f"{root / rel} less every 10th image (held out: there is no val/test split)"
            return list_samples(root / rel, fmt.name, missing=missing, warn=warn), f"{root / rel}"
    train_folders = [rel for rel in _split_folders(dataset, "train") if _has_layout(root / rel, fmt)]
    if train_folders:  # the dataset has a train split but not this one
        base = root / train_folders[0]
    elif _has_layout(root, fmt):
        base = root
    else:
        expected = " or ".join(f"ROOT/{r}/" for r in _split_folders(dataset, "train"))
        raise LayoutError(
            f"{root} does not have the {dataset} layout: expected {expected + ' holding ' if expected else ''}"
            f"{fmt.layout}"
        )
    if whole and split == "train":
        return list_samples(base, fmt.name, missing=missing, warn=warn), f"every image of {base}"
    if not fallback and split != "train":
        looked = ", ".join(f"{root / rel}/" for rel in _split_folders(dataset, split))
        raise LayoutError(
            f"there is no {split} split under {root} (looked for {looked}); found: {_found_splits(dataset, root, fmt)}. "
            "Leave out --split to evaluate the training images held out for validation (every 10th, or those "
            "--val-from-train held out), or pass --split train")
    train, held = holdout(list_samples(base, fmt.name, missing=missing, warn=warn))
    return (train if split == "train" else held), f"no {split} split under {root}: every 10th image of {base} held out"


# ----------------------------------------------------------------------------------------- datasets
#: Pillow modes whose pixels are 8-bit per channel (or fewer), converted by Pillow's own ``convert("RGB")``:
#: palettes, bilevel, grayscale, with alpha (dropped), CMYK, YCbCr, LAB, HSV. ``La`` (premultiplied
#: alpha) goes through ``LA`` first, which Pillow requires.
_EIGHT_BIT_MODES = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, TIFF, PGM): white is 65535


def _integer_white(im) -> int | None:
    """The white level of a 32-bit integer image when its file states it: a TIFF's BitsPerSample (tag 258)
    and SampleFormat (tag 339: 1 unsigned, 2 signed), as 2^bits - 1 or 2^(bits-1) - 1. None otherwise."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    bits, fmt = tags.get(258), tags.get(339, 1)
    if isinstance(bits, tuple):
        bits = bits[0] if bits and all(b == bits[0] for b in bits) else None
    if isinstance(fmt, tuple):
        fmt = fmt[0] if fmt else 1
    if not isinstance(bits, int) or not 1 <= bits <= 32 or fmt not in (1, 2):
        return None
    return 2**bits - 1 if fmt == 1 else 2 ** (bits - 1) - 1


def pil_to_rgb(im, source="image") -> torch.Tensor:
    """A Pillow image as float32 [3, H, W] RGB in [0, 1], by what its pixels mean, not by clipping them to
    8 bits (which turns a 16-bit image white and doubles a count):

    - 8-bit modes (``1 L P LA PA RGB RGBA RGBX CMYK YCbCr LAB HSV ...``): Pillow's ``convert("RGB")``, / 255;
      alpha is dropped (the colour is kept as stored);
    - 16-bit grayscale (``I;16``, ``I;16B``, ...; 16-bit PNGs and TIFFs): / 65535, repeated over RGB;
    - 32-bit integers (``I``): / the white level when the file states it (a TIFF's bit depth and sign), else
      refused;
    - 32-bit floats (``F``): used as they are when every value lies in [0, 1], else refused.

    Pillow reads 16-bit colour PNGs as 8-bit RGB(A) itself (the high byte of each sample), which is right.
    The image is shown upright first: its EXIF orientation is applied (:func:`upright`), so [3, H, W] is the
    upright size. Raises ImageError naming ``source`` for pixels whose white level is unknown.
    """
    white = _integer_white(im) if im.mode == "I" else None  # a TIFF's tags: the turned copy has none
    im = upright(im)
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        rgb = (im.convert("LA") if mode == "La" else im).convert("RGB")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div_(255.0)
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(im).astype(np.float32) / np.float32(65535.0)
    elif mode == "I":
        arr = np.asarray(im)
        if white is None:
            raise ImageError(source, "32-bit integer pixels (Pillow mode I) whose white level the file does not state; "
                                     "save the image as 8-bit or 16-bit")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > white:
            raise ImageError(source, f"integer pixels (Pillow mode I) with values in [{lo}, {hi}], outside [0, {white}]")
        gray = (arr.astype(np.float64) / float(white)).astype(np.float32)
    elif mode == "F":
        gray = np.array(im, dtype=np.float32)
        if not np.isfinite(gray).all():
            raise ImageError(source, "floating-point pixels (Pillow mode F) holding NaN or inf")
        lo, hi = float(gray.min()), float(gray.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(source, f"floating-point pixels (Pillow mode F) with values in [{lo:g}, {hi:g}]: expected "
                                     "[0, 1]; save the image as 8-bit or 16-bit")
    else:
        raise ImageError(source, f"Pillow image mode {mode!r} is not supported; save the image as 8-bit RGB or grayscale")
    return torch.from_numpy(np.ascontiguousarray(gray))[None].expand(3, -1, -1).contiguous()


def load_image(path) -> torch.Tensor:
    """float32 [3, H, W] RGB in [0, 1] of an image file (the first frame of a multi-frame file), shown upright
    (its EXIF orientation applied, as photo viewers do); every Pillow mode is read by what its pixels mean (:func:`pil_to_rgb`: 16-bit images are / 65535, grayscale is
    repeated over the channels). ImageError naming the file when it is missing, does not decode, or has
    pixels whose white level is unknown."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "image file not found")
    try:
        with open_image_file(path) as im:
            im.load()
            return pil_to_rgb(im, path)
    except UnidentifiedImageError:
        raise ImageError(path, "cannot decode the image (not a format Pillow can identify)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, ImageError):
            raise
        # the message names the file once, at its start: Pillow's own texts may repeat the path
        reason = str(exc).replace(repr(str(path)), "the file").replace(str(path), "the file")
        raise ImageError(path, f"cannot decode the image ({reason})") from None


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
    """:class:`crowdkernels.data.SyntheticCrowdDataset` as samples of the same form as
    :class:`CrowdDataset` (rendered on the fly from (seed, index), cached in each process)."""

    def __init__(self, num_images: int = 20, size=128, seed: int = 0, transform=None, **render_kwargs):
        from .synthetic import SyntheticCrowdDataset

        self.base = SyntheticCrowdDataset(num_images, size, seed, **render_kwargs)
        self.transform = transform
        self.skipped: dict = {}

    @property
    def counts(self) -> list[int]:
        return [self.base[i].count for i in range(len(self.base))]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        s = self.base[index]
        item = {"image": s.image_tensor(), "points": s.points_tensor(), "name": s.name, "index": index}
        return self.transform(item) if self.transform is not None else item
