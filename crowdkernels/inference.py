"""Counting people with a trained model, in one line.

    >>> import crowdkernels as ck
    >>> counter = ck.load("runs/b/best.pt")              # any checkpoint `crowdkernels train` writes
    >>> counter.count("crowd.jpg")                       # people in the image: a float
    >>> counter.density("crowd.jpg")                     # [H, W] people per pixel; sums to the count
    >>> counter.points("crowd.jpg")                      # [N, 3] (x, y, score) of the heads, N = round(count)
    >>> counter.count_many(["a.jpg", "b.jpg"], batch_size=4)   # [float, float], in order
    >>> [(p.source, p.count) for p in counter.predictions("shots/")]   # each count with its file

An image is a path, a Pillow image, a NumPy array ([H, W, 3] or [H, W]; uint8, uint16, or floats in
[0, 1]) or a tensor ([3, H, W] or [1, 3, H, W]; uint8 or floats in [0, 1]): RGB, not normalized. A file or
a Pillow image is turned upright by its EXIF orientation first, as photo viewers show it (a phone photo
stored sideways is counted, mapped and drawn upright); arrays and tensors are taken as they are. The
counter feeds it to the model as the model's training validated it: shrunk to the checkpoint's
``max_size`` when the training had one, normalized with the checkpoint's ``input_norm``
(:func:`crowdkernels.data.transforms.normalize_image`), padded to the model's multiple, the whole image
run (tiled with overlap beyond the checkpoint's ``tile`` pixels, as ``crowdkernels eval`` does, so memory
stays bounded) through :func:`crowdkernels.engine.predict.predict_density`, and the map summed (divided by the
checkpoint's density scale). :meth:`Counter.settings` says which settings were used.

Units. A model of output stride s (CSRNet 8; HMoDE, SPN and L2SM 4; the released HMoDE 1) predicts a map of
ceil(H/s) x ceil(W/s) cells, each holding the people in its s x s block of pixels; the count is its sum
(:attr:`Prediction.cells`). :meth:`Counter.density` returns the map *at image resolution*: each cell's
people spread evenly over the image pixels it covers (s x s, fewer in the last row and column when H or
W is not a multiple of s), so it is people per pixel, it aligns with the image pixel for pixel, and its
sum is the count. With ``max_size`` the model sees a shrunk image; the map is spread back over the
original pixels the same way.
"""
from __future__ import annotations

import argparse
import glob
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .engine.checkpoint import CheckpointError, model_from_checkpoint
from .engine.export import OnnxModel
from .engine.evaluate import evaluate
from .engine.predict import cell_stride, predict_density, spread_cells
from .models.conventions import conventions_of
from .data.layouts import IMAGE_EXTENSIONS, natural_key
from .data.readers import ImageError, load_image, pil_to_rgb
from .data.points import density_to_points
from .data.transforms import IMAGENET_NORM, check_norm, normalize_image, shrink_image
from ._progress import Progress
from .data.targets import CrowdCollate
from ._io import parse_device
from ._options import Option, int_at_least, max_size_arg, positive_int
from .models import MODEL_NAMES

__all__ = ["Counter", "Prediction", "load", "image_paths", "as_rgb", "CHECKPOINT", "VIDEO_EXTENSIONS", "min_tile",
           "NONE", "COUNTER_OPTIONS", "COUNT_OPTIONS", "max_size_or_none", "tile_arg"]

_GLOB_CHARS = set("*?[")

#: :func:`load`'s default for ``max_size`` and ``tile``: the setting the checkpoint's training used
#: (its ``config``), so that the model sees images as its validation did.
CHECKPOINT = "checkpoint"

#: Video files: named as such when given (crowdkernels reads still images), and left out of folders with a warning.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".mpg", ".mpeg", ".3gp", ".ts")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FRAMES_HINT = "extract frames first (e.g. ffmpeg -i clip.mp4 -vf fps=1 frames/%04d.png) and count those"


def _is_url(item) -> bool:
    return isinstance(item, str) and bool(_URL.match(item))


def _left_out_videos(where: str, videos: list) -> None:
    """A warning naming the video files a folder or a pattern held, which are not counted."""
    if videos:
        shown = ", ".join(str(v) for v in videos[:5]) + (f" and {len(videos) - 5} more" if len(videos) > 5 else "")
        warnings.warn(f"{where}: {len(videos)} video file(s) left out ({shown}): crowdkernels counts still images; "
                      f"{_FRAMES_HINT}", UserWarning, stacklevel=3)


def min_tile(overlap: int = 64, align: int = 16) -> int:
    """The smallest ``tile`` that leaves each tile a core after ``overlap`` pixels of context on each side, for a
    model padded to a multiple of ``align``: 2 x overlap + align (144 with the defaults)."""
    return 2 * overlap + align


def image_paths(items) -> list:
    """Image files from a mix of files, folders (their images, in natural order; not recursive) and glob
    patterns (``"shots/*.jpg"``, ``"**/*.png"``; matches in natural order), as Paths. Files are kept as
    given, even missing ones (they fail per file later, with their name); a URL is kept as its string (it
    fails per file too, saying that URLs are not read). Video files in a folder or matched by a pattern are
    left out with a warning naming them. A folder without images or a pattern that matches nothing raises
    ValueError naming it."""
    if isinstance(items, (str, Path)):
        items = [items]
    out: list = []
    for item in items:
        if _is_url(item):  # Path() would fold its "//" into "/"
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted((q for q in p.iterdir() if q.is_file()), key=lambda q: natural_key(q.name))
            found = [q for q in files if q.suffix.lower() in IMAGE_EXTENSIONS]
            videos = [q.name for q in files if q.suffix.lower() in VIDEO_EXTENSIONS]
            if not found:
                raise ValueError(f"{p} is a folder without images ({', '.join(IMAGE_EXTENSIONS)})" + (
                    f"; its {len(videos)} video file(s) are not read: {_FRAMES_HINT}" if videos else ""))
            _left_out_videos(str(p), videos)
            out += found
        elif not p.exists() and _GLOB_CHARS & set(str(item)):
            matched = sorted((Path(q) for q in glob.glob(str(item), recursive=True) if Path(q).is_file()),
                             key=lambda q: natural_key(str(q)))
            found = [q for q in matched if q.suffix.lower() in IMAGE_EXTENSIONS]
            videos = [str(q) for q in matched if q.suffix.lower() in VIDEO_EXTENSIONS]
            if not found:
                raise ValueError(f"no image matches the pattern {str(item)!r}" + (
                    f" (it matches {len(videos)} video file(s), which are not read: {_FRAMES_HINT})" if videos else ""))
            _left_out_videos(f"the pattern {str(item)!r}", videos)
            out += found
        else:
            out.append(p)
    return out


def _check_image_path(image) -> None:
    """ImageError naming ``image`` (as given) when it is a URL, a folder or a video: what it is, and what to do."""
    if _is_url(image):
        raise ImageError(image, "a URL: crowdkernels reads local image files only; download the image first "
                                "(e.g. curl -O URL) and pass the file")
    p = Path(image)
    if p.is_dir():
        raise ImageError(image, "a folder, not an image: count the images in it with counter.count_many(folder) "
                                "(or `crowdkernels count FOLDER`)")
    if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
        raise ImageError(image, f"a video: crowdkernels counts still images; {_FRAMES_HINT}")


def _source_name(image) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"<{type(image).__module__}.{type(image).__name__}>"


def as_rgb(image) -> torch.Tensor:
    """Any accepted image (see the module docstring) as float32 [3, H, W] RGB in [0, 1] on the CPU.
    ValueError/TypeError naming ``image`` and what was received; ImageError for a file that cannot be read."""
    from PIL import Image


    if isinstance(image, (str, Path)):
        _check_image_path(image)
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, "image")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise ValueError(f"image: a NumPy array must be [H, W, 3] or [H, W] (RGB or gray), got shape {image.shape}")
        # a copy when NumPy marks the array read-only (np.asarray of a Pillow image): torch wants writable memory
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
        t = torch.from_numpy(arr).permute(2, 0, 1)
        # NumPy images come as [H, W, C]; uint16 is a 16-bit image (white 65535)
        if arr.dtype == np.uint16:
            t = (t.to(torch.float64) / 65535.0).float()
        return _tensor_rgb(t, "a NumPy array")
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"image: a tensor must be [3, H, W] or [1, 3, H, W] (RGB), got shape {tuple(image.shape)}")
        return _tensor_rgb(t.cpu(), "a tensor")
    raise TypeError(f"image must be a path, a PIL image, a NumPy array or a tensor, got {type(image).__name__}")


def _tensor_rgb(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.shape[-2] < 1 or t.shape[-1] < 1:
        raise ValueError(f"image: {what} of an empty size {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    elif t.dtype.is_floating_point:
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"image: {what} holding NaN or inf")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"image: {what} of floats must be RGB in [0, 1], got values in [{lo:g}, {hi:g}] (uint8 images are "
                "divided by 255 here; do not normalize: the counter applies the model's own normalization)")
    else:
        raise TypeError(f"image: {what} must be uint8, uint16 (NumPy) or floating point in [0, 1], got {t.dtype}")
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()


@dataclass
class Prediction:
    """One image's result. ``cells``: float32 [h, w] people per output cell of the model (its grid at
    stride s of the image the model saw); ``count``: their sum (float64 accumulation); ``image``: the image
    as RGB [3, H, W] in [0, 1] (CPU), at its own size; ``input_size``: (H', W') the model saw (smaller
    than (H, W) only with ``max_size``); ``error``: why the image failed (then the rest is None)."""

    source: str
    count: float | None = None
    cells: torch.Tensor | None = None
    image: torch.Tensor | None = None
    input_size: tuple | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.image is None else (int(self.image.shape[-2]), int(self.image.shape[-1]))

    def density(self) -> torch.Tensor:
        """float32 [H, W] people per pixel at the image's resolution (see the module docstring,
        :func:`crowdkernels.engine.predict.spread_cells`); sums to ``count``."""
        if self.cells is None:
            raise ValueError(f"{self.source}: no prediction ({self.error})")
        return spread_cells(self.cells, self.size, self.input_size)

    def points(self, radius: float | None = None) -> torch.Tensor:
        """Head locations: float32 [N, 3] (x, y, score), N = the rounded count, x and y in pixels of the image
        (pixel (i, j) covers [j, j+1) x [i, i+1)), highest peaks first. Found on the model's own cells
        (:func:`crowdkernels.data.points.density_to_points`: local maxima, non-maximum suppression at each
        peak's local sigma, count-preserving), then placed in the image; score: the people of the map within
        the point's radius. ``radius``: a fixed suppression radius in image pixels instead."""
        if self.cells is None:
            raise ValueError(f"{self.source}: no prediction ({self.error})")
        (H, W), (Hs, Ws) = self.size, self.input_size
        s = cell_stride(self.cells.shape[-2:], (Hs, Ws))
        fy, fx = s * H / Hs, s * W / Ws  # image pixels per cell
        if radius is not None:
            if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
                raise ValueError(f"radius must be a positive number of pixels (or None), got {radius!r}")
            radius = radius / min(fx, fy)
        pts = density_to_points(self.cells, self.count, radius)
        # inside the image: a partial last row or column of cells reaches past its border
        below = torch.nextafter(torch.tensor([float(W), float(H)]), torch.zeros(2))
        pts[:, :2] = torch.minimum((pts[:, :2] * torch.tensor([fx, fy])).clamp_min(0.0), below)
        return pts


class _Sources(torch.utils.data.Dataset):
    """Images decoded in DataLoader workers: (index, source name, RGB tensor or None, error or None), the
    error as (exception class name, message): exceptions with their own constructor arguments do not
    cross process boundaries."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        try:
            return i, _source_name(image), as_rgb(image), None
        except ImageError as exc:
            return i, _source_name(image), None, ("ImageError", exc.reason, str(exc))
        except (ValueError, TypeError, OSError) as exc:
            return i, _source_name(image), None, (type(exc).__name__, str(exc), f"{_source_name(image)}: {exc}")


def _raise(name: str, err) -> None:
    kind, reason, _ = err
    if kind == "ImageError":
        raise ImageError(name, reason)
    raise {"TypeError": TypeError, "OSError": OSError}.get(kind, ValueError)(reason)


def _as_list(batch):
    return batch


class Counter:
    """A trained counting model with its input convention, ready for images of any size.

    Args:
        model: a model whose forward returns ``.final`` [B, 1, h, w] (the models of
            :mod:`crowdkernels.models`); put in eval mode and moved to ``device``.
        device: torch device (default: CUDA when visible, else the CPU).
        input_norm: the model's input normalization (default: ``model.input_norm``, which every model of
            this library and :func:`load` set; None feeds raw RGB in [0, 1]).
        tile: images whose padded side exceeds it run in overlapping tiles (pixels; None: never); at least
            :func:`min_tile` (2 x ``overlap`` + the model's padding multiple: 144 for most models).
        overlap: context around each tile, pixels (a multiple of 16).
        amp: bfloat16/float16 autocast on a GPU; on the CPU it has no effect and a warning says so.
        max_size: shrink larger images first: a longest side (int) or a box (a, b), e.g. (1920, 1080).
        info: what :func:`load` read from the checkpoint (``path``, ``model``, ``config``, and ``sources``:
            where each input setting came from, for :meth:`settings`).

    Images are zero-padded to a multiple of the model's ``input_multiple`` (16; 1 for the released HMoDE)
    and the map is divided by the model's ``density_scale``, as training validated them.
    """

    def __init__(self, model, device=None, *, input_norm="model", tile: int | None = 2048, overlap: int = 64,
                 amp: bool = False, max_size=None, info: dict | None = None):
        self.device = _device(device)
        if input_norm == "model":
            if not hasattr(model, "input_norm"):
                raise TypeError(
                    f"input_norm: {type(model).__name__} has no input_norm attribute; pass input_norm='imagenet', "
                    "None (raw RGB in [0, 1]) or {'mean': [...], 'std': [...]}, as the model was trained")
            input_norm = conventions_of(model).input_norm
        self.input_norm = check_norm(input_norm)
        if amp and self.device.type != "cuda":
            warnings.warn(f"amp: autocast runs on GPUs only; on {self.device} the model runs in float32", UserWarning,
                          stacklevel=2)
            amp = False
        #: the padding multiple of the model's input (what predict_density pads to, in training's validation too)
        self.align = int(conventions_of(model).input_multiple)
        if tile is not None:
            if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
                raise ValueError(f"tile must be a positive int or None, got {tile!r}")
            if tile < min_tile(overlap, self.align):
                raise ValueError(f"tile must be at least {min_tile(overlap, self.align)} pixels (2 x the overlap of "
                                 f"{overlap} + the padding multiple {self.align}), or None (never tile); got {tile}")
        if isinstance(max_size, list):
            max_size = tuple(max_size)
        self.model = model.to(self.device).eval()
        #: channels-last on the CPU: oneDNN's convolutions then read and write NHWC directly instead of reordering
        #: every layer's input, 1.1-1.2x faster for the same counts (benchmarks/bench_inference.py, "counter")
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.tile, self.overlap, self.amp, self.max_size = tile, overlap, amp, max_size
        self.info = dict(info or {})

    def __repr__(self) -> str:
        name = self.info.get("model") or type(self.model).__name__
        return f"Counter({name}, device={self.device}, tile={self.tile}, max_size={self.max_size})"

    def settings(self) -> dict:
        """The input settings images are counted with, and where each came from (``sources``: "checkpoint"
        (the training's own, from its ``config``), "override" (an argument of :func:`load` that replaced the
        checkpoint's), "default" (a checkpoint without that setting), "argument" (of a Counter made directly),
        or "model" (an attribute of the model)): ``max_size``, ``tile``, ``overlap``, ``pad_multiple``,
        ``input_norm``, ``density_scale``. ``crowdkernels eval`` and ``count`` report them."""
        given = dict(self.info.get("sources") or {})
        sources = {k: given.get(k, "argument") for k in ("max_size", "tile")}
        sources.update({"overlap": "default", "pad_multiple": "model"})
        sources.update({k: given.get(k, "model") for k in ("input_norm", "density_scale")})
        return {
            "max_size": list(self.max_size) if isinstance(self.max_size, tuple) else self.max_size,
            "tile": self.tile,
            "overlap": self.overlap,
            "pad_multiple": self.align,
            "input_norm": self.input_norm,
            "density_scale": float(conventions_of(self.model).density_scale),
            "sources": sources,
        }

    def describe_settings(self) -> str:
        """:meth:`settings` in one line, e.g. "max size 384 (checkpoint), tiles beyond 2048 px (checkpoint), ..."."""
        s, src = self.settings(), self.settings()["sources"]
        box = s["max_size"]
        size = "none" if box is None else (f"{box[0]}x{box[1]}" if isinstance(box, list) else str(box))
        norm = s["input_norm"]
        if norm is None:
            norm_text = "none (raw RGB in [0, 1])"
        elif norm == check_norm(IMAGENET_NORM):
            norm_text = "ImageNet mean/std"
        else:
            norm_text = f"mean {list(norm['mean'])} std {list(norm['std'])}"
        tile = "never" if s["tile"] is None else f"beyond {s['tile']} px"
        return (f"max size {size} ({src['max_size']}), tiles {tile} ({src['tile']}), padding to a multiple of "
                f"{s['pad_multiple']} ({src['pad_multiple']}), normalization {norm_text} ({src['input_norm']}), "
                f"density scale {s['density_scale']:g} ({src['density_scale']})")

    # ----------------------------------------------------------------------------------- one image
    def _model_input(self, rgb: torch.Tensor) -> torch.Tensor:
        """The RGB image as the model sees it: shrunk to ``max_size`` if set (antialiased bilinear)."""
        return shrink_image(rgb, self.max_size)

    @torch.no_grad()
    def predict_cells(self, rgb: torch.Tensor) -> torch.Tensor:
        """The model's map of a batch of RGB images in [0, 1] of one size ([B, 3, H, W] or [3, H, W]), as
        the model is fed them (normalized on its device): [B, 1, h, w] people per cell, on the CPU."""
        x = rgb.to(self.device, torch.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1e-6 and hi <= 1.0 + 1e-6):  # NaN fails too
            # an image normalized already (a dataset ending in Normalize) would be normalized twice here
            raise ValueError(f"images must be RGB in [0, 1], got values in [{lo:g}, {hi:g}]: leave out the Normalize "
                             "step, the counter applies the model's normalization itself")
        x = normalize_image(x, self.input_norm)
        x = (x if x.dim() == 4 else x[None]).contiguous(memory_format=self.memory_format)
        out = predict_density(self.model, x, tile=self.tile, overlap=self.overlap, align=self.align, amp=self.amp)
        return out.float().cpu()

    def predict(self, image) -> Prediction:
        """A :class:`Prediction` of one image (see :func:`as_rgb` for what ``image`` may be)."""
        rgb = as_rgb(image)
        x = self._model_input(rgb)
        cells = self.predict_cells(x)[0, 0]
        return Prediction(_source_name(image), float(cells.sum(dtype=torch.float64)), cells, rgb, tuple(x.shape[-2:]))

    def count(self, image) -> float:
        """The number of people in ``image`` (the sum of the predicted map)."""
        return self.predict(image).count

    def density(self, image) -> torch.Tensor:
        """float32 [H, W], people per pixel at the image's resolution: each output cell's people spread over
        the pixels it covers (see the module docstring); sums to :meth:`count`."""
        return self.predict(image).density()

    def points(self, image, radius: float | None = None) -> torch.Tensor:
        """Where the heads are: float32 [N, 3] (x, y, score) in pixels of ``image``, as many as the rounded
        :meth:`count` (see :meth:`Prediction.points`)."""
        return self.predict(image).points(radius)

    # ----------------------------------------------------------------------------------- many images
    def predictions(self, images, batch_size: int = 1, *, workers: int = 0, errors: str = "raise", progress=None):
        """Yields a :class:`Prediction` per image, in order. ``images``: a list of images (paths, arrays, ...)
        or a folder / glob pattern (see :func:`image_paths`). Images are decoded by ``workers`` DataLoader
        processes (0: here); up to ``batch_size`` consecutive images of one size run as one batch.
        ``errors``: "raise" (an unreadable image raises ImageError naming it) or "skip" (its Prediction
        holds ``error``). ``progress``: True, False, or None (a bar when stderr is a terminal, else a line
        at the end)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        if isinstance(images, (str, Path)):
            images = image_paths(images)
        # checked above, now; the images are read as the caller iterates
        return self._predictions(list(images), batch_size, workers, errors, progress)

    def _predictions(self, images, batch_size, workers, errors, progress):
        loader = torch.utils.data.DataLoader(_Sources(images), batch_size=batch_size, num_workers=workers,
                                             collate_fn=_as_list)
        with Progress(len(images), "count", bar=progress, lines=progress is not False, done_word="counted") as bar:
            for batch in loader:
                results: list[Prediction | None] = [None] * len(batch)
                good = []
                for k, (_, name, rgb, err) in enumerate(batch):
                    if err is not None:
                        if errors == "raise":
                            _raise(name, err)
                        results[k] = Prediction(name, error=err[2])
                    else:
                        good.append((k, name, rgb, self._model_input(rgb)))
                # consecutive images of one size share a forward pass
                start = 0
                while start < len(good):
                    stop = start + 1
                    while stop < len(good) and good[stop][3].shape == good[start][3].shape:
                        stop += 1
                    chunk = good[start:stop]
                    cells = self.predict_cells(torch.stack([g[3] for g in chunk]))
                    for (k, name, rgb, x), c in zip(chunk, cells):
                        results[k] = Prediction(name, float(c[0].sum(dtype=torch.float64)), c[0], rgb, tuple(x.shape[-2:]))
                    start = stop
                for r in results:
                    bar.update(1, skipped=int(r.error is not None))
                    yield r

    def count_many(self, images, batch_size: int = 1, *, workers: int = 0, errors: str = "raise", progress=None) -> list[float]:
        """The counts of many images, in order, as bare floats (see :meth:`predictions` for the arguments);
        with ``errors="skip"`` an unreadable image counts NaN and a warning names it. A folder or a pattern
        is expanded here, so to know which file each count belongs to, iterate :meth:`predictions` instead:
        each :class:`Prediction` has ``.source`` (the path as given or found), ``.count`` and ``.error``::

            for p in counter.predictions("shots/", errors="skip"):
                print(p.source, p.count if p.error is None else p.error)
        """
        counts = []
        for p in self.predictions(images, batch_size, workers=workers, errors=errors, progress=progress):
            if p.error is not None:
                warnings.warn(f"skipping {p.error}", UserWarning, stacklevel=2)
                counts.append(math.nan)
            else:
                counts.append(p.count)
        return counts

    # ----------------------------------------------------------------------------------- data sets
    def evaluate(self, dataset, *, levels=None, game_levels: int = 3, strict: bool = False, warn=None, workers: int = 0,
                 progress=None, on_image=None):
        """Metrics of an annotated data set (samples of :class:`crowdkernels.data.CrowdDataset` or
        :class:`~crowdkernels.data.SyntheticCrowds` as RGB in [0, 1], *without* the ``Normalize`` step: the
        counter normalizes), as :func:`crowdkernels.engine.evaluate` returns them: ``(metrics, accumulator)``.
        The dataset's own transform sizes the images (the points must match them), so ``max_size`` is not
        applied here: :func:`crowdkernels.engine.evaluation_dataset` with ``config.max_size = counter.max_size``
        gives the images as ``crowdkernels eval`` feeds them.
        ``on_image(name, rgb [3, H, W], cells [1, 1, h, w], points [N, 2])`` is called per image."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=CrowdCollate(target=None))
        with Progress(len(dataset), "eval", bar=progress, lines=progress is not False, done_word="evaluated") as bar:
            return evaluate(self.model, loader, self.device, levels=levels, game_levels=game_levels, strict=strict,
                            warn=warn if warn is not None else bar.write, predict=self.predict_cells,
                            on_image=on_image, progress=bar)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device, "device")


def load(checkpoint, device=None, *, model: str | None = None, model_kwargs: dict | None = None,
         tile=CHECKPOINT, amp: bool = False, max_size=CHECKPOINT) -> Counter:
    """A :class:`Counter` for a checkpoint: any ``last.pt``/``best.pt`` that ``crowdkernels train`` writes
    (and whatever else :func:`crowdkernels.engine.checkpoint.model_from_checkpoint` loads). The model is built
    from the checkpoint's own settings and fed as its training validated it: the checkpoint's ``max_size``
    (images shrunk as in training), ``tile``, normalization (``input_norm``) and density scale, the model's
    padding multiple. :meth:`Counter.settings` says which were used and where each came from.

    Args:
        checkpoint: path of the checkpoint file.
        device: e.g. "cuda", "cpu" (default: CUDA when visible, else the CPU).
        model, model_kwargs: refuse a checkpoint of another model (e.g. ``model="hmode"``), with an error
            naming both.
        tile, max_size: :data:`CHECKPOINT` (default): the training's own (its ``config``; 2048 and None for
            files without them, such as the released HMoDE weights); or a value that overrides it (None: never
            tile / never shrink). See :class:`Counter`.
        amp: see :class:`Counter`.
    An ONNX file that :func:`crowdkernels.engine.export.export` wrote (``*.onnx``) gives the same Counter, run by
    ONNX Runtime's CPU provider (``device`` must then be None or "cpu"): its graph normalizes, pads and scales
    itself, and it runs whole images (``tile`` must be :data:`CHECKPOINT` or None: tiles cut outside the graph
    would be padded before its normalization, not after); ``max_size`` defaults to the one in its metadata.

    Raises:
        CheckpointError naming the file when it is missing, unreadable, or of another model; ImportError in
        one line when an ONNX file is given without onnx and onnxruntime installed.
    """
    if str(checkpoint).lower().endswith(".onnx"):
        return _load_onnx(checkpoint, device, model, tile, max_size)
    dev = _device(device)
    net, ckpt = model_from_checkpoint(checkpoint, dev, model=model, model_kwargs=model_kwargs)
    cfg = ckpt.get("config") or {}
    sources = {"input_norm": "checkpoint" if "input_norm" in cfg else "default",
               "density_scale": "checkpoint" if "scale" in (cfg.get("target") or {}) else "default"}
    if ckpt.get("released"):  # the released test.py's conventions, not a config of ours
        sources.update(input_norm="released test.py", density_scale="released test.py")
    settings = {}
    for name, value, default in (("tile", tile, 2048), ("max_size", max_size, None)):
        if isinstance(value, str) and value == CHECKPOINT:
            settings[name] = cfg.get(name, default)
            sources[name] = "checkpoint" if name in cfg else "default"
        else:
            settings[name], sources[name] = value, "override"
    info = {"path": str(checkpoint), "model": ckpt.get("model_name"), "config": cfg, "sources": sources}
    return Counter(net, dev, tile=settings["tile"], amp=amp, max_size=settings["max_size"], info=info)


def _load_onnx(path, device, model, tile, max_size) -> Counter:
    """:func:`load` of an exported ONNX file (see there)."""
    if device is not None and parse_device(device, "device").type != "cpu":
        raise ValueError(f"device={device!r}: an ONNX counter runs on the CPU (ONNX Runtime's CPU provider)")
    if not isinstance(tile, str) and tile is not None:
        raise ValueError(f"tile={tile!r}: an ONNX counter runs whole images (its graph pads after normalizing, "
                         "tiles cut outside it would not be); leave tile at its default or None")
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    net = OnnxModel(path)
    meta = net.metadata
    name = meta.get("model")
    if model is not None and name != model:
        raise CheckpointError(f"{path}: an exported {name!r} model, not {model!r}")
    sources = {"input_norm": "onnx graph", "density_scale": "onnx graph", "tile": "onnx: whole images"}
    if isinstance(max_size, str) and max_size == CHECKPOINT:
        max_size, sources["max_size"] = meta.get("max_size"), "onnx metadata"
    else:
        sources["max_size"] = "override"
    info = {"path": str(path), "model": name, "config": {}, "sources": sources}
    return Counter(net, "cpu", tile=None, max_size=max_size, info=info)


# ----------------------------------------------------------------------------------------- command-line options
#: what ``--max-size none`` and ``--tile none`` give: no cap, no tiles (overriding the checkpoint's own setting)
NONE = "none"


def max_size_or_none(text: str):
    """eval/count --max-size: a side, a box, or 'none' (no cap, whatever the checkpoint's training used)."""
    if text.strip().lower() == NONE:
        return NONE
    try:
        return max_size_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels (2048), a box (1920x1080) or 'none', got {text!r}") from None


def tile_arg(text: str):
    """eval/count --tile: a side of at least min_tile() pixels, or 'none' (never tile)."""
    if text.strip().lower() == NONE:
        return NONE
    return int_at_least(min_tile(), f"a tile side of at least {min_tile()} pixels (2 x the 64-pixel overlap + 16) or "
                                    "'none'")(text)


def _checkpoint_default(text: str) -> str:
    return f"{text}; default: the checkpoint's own (its training's setting), 'none' turns it off"


#: the options of the Counter that ``crowdkernels eval`` and ``count`` load (:func:`load`'s arguments; --max-size
#: and --tile: the checkpoint's own when not given, ``NONE``: off), placed among each command's by their order
COUNTER_OPTIONS = (
    Option("--checkpoint", 10, required=True, type=Path, help="a .pt from crowdkernels train"),
    Option("--model", 60, choices=MODEL_NAMES, help="refuse a checkpoint of another model"),
    Option("--max-size", 70, type=max_size_or_none, metavar="SIZE",
           help=_checkpoint_default("shrink larger images first: a side (2048) or a box (1920x1080)")),
    Option("--tile", 71, type=tile_arg, metavar="PIXELS",
           help=_checkpoint_default(f"run images beyond this side in overlapping tiles (at least {min_tile()}: 2 x "
                                    "the 64-pixel overlap + 16)")),
    Option("--device", 80, help="default: cuda when visible, else cpu"),
    Option("--amp", 90, action="store_true", help="autocast on a GPU (no effect on the CPU: a warning says so)"),
)

#: ``crowdkernels count``'s own options (:func:`image_paths`, :meth:`Counter.predictions`, pictures, points)
COUNT_OPTIONS = (
    Option("images", 0, nargs="+", metavar="IMAGE", help="image files, folders or glob patterns"),
    Option("--json", 20, action="store_true", help="print one JSON list on stdout (progress and logs on stderr)"),
    Option("--save-dir", 30, type=Path,
           help="write DIR/<image stem>.png: the image beside its density map, the count in the title (and the true "
                "count and map when a point file <image stem>.txt/.csv/.json lies beside it). Images that share a "
                "stem (a/crowd.jpg, b/crowd.jpg) are named after their paths below the folder they have in common, "
                "'/' written '__' (a__crowd.png, b__crowd.png; crowd.jpg.png and crowd.png.png for two files of one "
                "folder), so that no picture overwrites another"),
    Option("--points", 65, action="store_true",
           help="locate the heads (as many as the rounded count; see Counter.points): stdout becomes a CSV "
                "'image,x,y,score' (pixels; score: people near the point), with --json each image gets "
                "\"points\": [[x, y, score], ...]; --save-dir pictures mark them"),
    Option("--batch-size", 75, type=positive_int, default=1, help="images of one size run together; default: 1"),
    Option("--strict", 110, action="store_true", help="stop at the first bad image"),
)
