"""Readers of image and annotation files: what one file holds, checked.

Annotation readers return the head points of one image as a float64 NumPy array of shape [N, 2] in (x, y)
pixel coordinates (pixel (i, j) covers [j, j+1) x [i, i+1), as the density API expects), exactly as
annotated: points outside the image are kept (UCF_CC_50 has a few), dropping them is the density
op's job. A file that is missing, unreadable, or holds anything but finite [N, 2] points raises
:class:`AnnotationError`, whose message names the file.

=====================  ===========================================================================
reader                 file
=====================  ===========================================================================
read_shanghaitech_mat  ShanghaiTech ``GT_IMG_N.mat`` (``image_info[0, 0][0, 0]["location"]``)
read_ucf_mat           UCF_CC_50 ``N_ann.mat``, UCF-QNRF ``img_XXXX_ann.mat`` (``annPoints``)
read_jhu_txt           JHU-CROWD++ ``gt/XXXX.txt`` (one head per line: ``x y w h o b``)
read_nwpu_json         NWPU-Crowd ``jsons/XXXX.json`` (``{"points": [[x, y], ...]}``)
read_point_file        generic point files: NAME.txt | .csv | .json
=====================  ===========================================================================

Images are read as float32 [3, H, W] RGB in [0, 1] by what their pixels mean (:func:`pil_to_rgb`), shown
upright: a photo's EXIF orientation turns its pixels (:func:`load_image`), its header size
(:func:`image_size`) and its annotated points (:func:`image_points`) alike. Pillow opens every raster format
it reads, never EPS (:func:`open_image_file`). A bad image raises :class:`ImageError` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "AnnotationError",
    "ImageError",
    "read_shanghaitech_mat",
    "read_ucf_mat",
    "read_jhu_txt",
    "read_nwpu_json",
    "POINT_EXTENSIONS",
    "read_point_file",
    "EXIF_ORIENTATION_TAG",
    "exif_orientation",
    "upright",
    "oriented_size",
    "orient_points",
    "open_image_file",
    "image_size",
    "image_orientation",
    "image_points",
    "count_inside",
    "pil_to_rgb",
    "load_image",
]

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


# ----------------------------------------------------------------------------------------- annotations
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


#: the generic point files' extensions, in the order :func:`crowdkernels.data.layouts.point_file_beside` tries them
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


def count_inside(points: np.ndarray, size: tuple[int, int]) -> int:
    """How many points lie inside an (H, W) image, [0, W) x [0, H): the ones the density op keeps."""
    h, w = size
    if points.shape[0] == 0:
        return 0
    x, y = points[:, 0], points[:, 1]
    return int(np.count_nonzero((x >= 0) & (x < w) & (y >= 0) & (y < h)))


# ----------------------------------------------------------------------------------------- pixels
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
