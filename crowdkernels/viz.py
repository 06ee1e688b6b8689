"""Pictures of predictions: an image beside its predicted (and true) density map, the scatter plot of a
data set's predicted against true counts, and a training run's learning curve. PNG files, drawn on
matplotlib's Agg canvas directly (no display, no pyplot state), written atomically; and the file names that
keep the pictures of same-named images apart (:func:`picture_names`).

Picture layout (:func:`picture_layout`), in PNG pixels:

- panels side by side: the image (with the located heads as red rings when given), the predicted map, and
  the true map when there is an annotation;
  each panel is the image's size, shrunk to a longest side of :data:`PANEL_MAX` (1024) for huge images,
  or enlarged by a whole factor k = max(1, floor(:data:`PANEL_MIN` / longest side)) for small ones, so
  one image pixel is exactly k x k picture pixels;
- ``width = MARGIN + panels x (panel width + GAP) + COLORBAR + COLORBAR_LABELS`` and
  ``height = TITLE + panel height + MARGIN`` (10, 10, 14, 76 and 54 pixels);
- a colour bar at the right, shared by the maps so that they compare by colour: it spans
  [min, max] of the maps shown (people per pixel; see :meth:`crowdkernels.Counter.density`), from the
  colormap's first colour (:data:`CMAP`) to its last;
- a title with the image's name and the predicted count, the true count and the error when known. A
  negative predicted total is shown as it is and flagged ("NEGATIVE") in the title.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from .data.transforms import denormalize_image
from .ops.density import density_map
from .data import AnnotationError, image_points, point_file_beside, read_point_file
from ._io import atomic_write

__all__ = ["CMAP", "PANEL_MAX", "PANEL_MIN", "PictureLayout", "picture_layout", "panel_size", "picture_title",
           "save_picture", "save_prediction", "save_count_picture", "picture_names", "save_scatter",
           "save_learning_curve"]

CMAP = "viridis"
PANEL_MAX, PANEL_MIN = 1024, 384
MARGIN, GAP, TITLE, COLORBAR, COLORBAR_LABELS = 10, 10, 54, 14, 76
_DPI = 100


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) in picture pixels of a panel showing an (height, width) image (see the module docstring)."""
    longest = max(height, width)
    if longest > PANEL_MAX:
        f = PANEL_MAX / longest
        return max(1, round(height * f)), max(1, round(width * f))
    k = max(1, PANEL_MIN // longest)
    return height * k, width * k


@dataclass(frozen=True)
class PictureLayout:
    """Where things are in a picture, in PNG pixel coordinates ((x0, y0, x1, y1), x right, y down, ends
    excluded): ``size`` = (width, height), ``panels`` (image, predicted[, true]), ``colorbar``."""

    size: tuple[int, int]
    panels: tuple[tuple[int, int, int, int], ...]
    colorbar: tuple[int, int, int, int]


def picture_layout(image_size, panels: int) -> PictureLayout:
    """The layout of a picture of an (H, W) image with ``panels`` panels (2: image and predicted map; 3:
    and the true map)."""
    ph, pw = panel_size(*image_size)
    width = MARGIN + panels * (pw + GAP) + COLORBAR + COLORBAR_LABELS
    height = TITLE + ph + MARGIN
    boxes = tuple((MARGIN + k * (pw + GAP), TITLE, MARGIN + k * (pw + GAP) + pw, TITLE + ph) for k in range(panels))
    x0 = MARGIN + panels * (pw + GAP)
    # the bar spans the middle 80% of the panels' height (at least 40 px), so its ends are clear of the titles
    bar_h = max(40, min(ph, round(0.8 * ph)))
    y0 = TITLE + (ph - bar_h) // 2
    return PictureLayout((width, height), boxes, (x0, y0, x0 + COLORBAR, y0 + bar_h))


def _figure(width: int, height: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _axes(fig, box, size):
    """Axes covering exactly the pixel box (x0, y0, x1, y1) of a (width, height) figure."""
    (x0, y0, x1, y1), (W, H) = box, size
    ax = fig.add_axes((x0 / W, 1.0 - y1 / H, (x1 - x0) / W, (y1 - y0) / H))
    ax.set_axis_off()
    return ax


def _rgb_array(image, norm=None) -> np.ndarray:
    """uint8 [H, W, 3] of an RGB image: a [3, H, W] tensor in [0, 1] (normalized images are brought back
    with ``norm``, as :func:`crowdkernels.data.transforms.denormalize_image` does) or an [H, W, 3] array."""
    import torch

    if isinstance(image, torch.Tensor):
        t = denormalize_image(image.detach().float().cpu(), norm) if norm is not None else image.detach().float().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
        return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be an [H, W, 3] array or a [3, H, W] tensor, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255.0).round().astype(np.uint8)
    return arr


def _map_array(density, size, what: str) -> np.ndarray:
    import torch

    d = density.detach().cpu().double().numpy() if isinstance(density, torch.Tensor) else np.asarray(density, np.float64)
    d = np.squeeze(d)
    if d.shape != tuple(size):
        raise ValueError(f"{what} must be the image's size {tuple(size)} (people per pixel; see Counter.density), "
                         f"got {d.shape}")
    return d


def picture_title(name: str, predicted: float, true: float | None = None) -> str:
    """The title of a picture: name, predicted count (flagged when negative), true count and error."""
    text = f"{name}: predicted {predicted:.1f}"
    if predicted < 0:
        text += " (NEGATIVE total: the model's map sums below zero)"
    if true is not None:
        text += f", true {true:g} (error {predicted - true:+.1f})"
    return text


def save_picture(path, image, predicted, *, truth=None, name: str | None = None, count: float | None = None,
                 true_count: float | None = None, norm=None, heads=None) -> PictureLayout:
    """Writes the picture of one image (see the module docstring) to ``path`` (PNG); returns its layout.

    Args:
        image: RGB, a [3, H, W] tensor in [0, 1] or an [H, W, 3] array (uint8, or floats in [0, 1]); with
            ``norm`` (e.g. the model's ``input_norm``), a normalized tensor, de-normalized for the picture.
        predicted: [H, W] predicted people per pixel (:meth:`crowdkernels.Counter.density`).
        truth: [H, W] true density (e.g. ``crowdkernels.density_map(points, (H, W))``), or None.
        name: shown in the title (default: the file's stem).
        count: the predicted count (default: the sum of ``predicted``).
        true_count: the true count (default: the sum of ``truth``, when given).
        heads: [N, 2] or [N, 3] head locations (x, y[, score]) in image pixels (e.g.
            :meth:`crowdkernels.Counter.points`), marked with red rings on the image.
    """
    rgb = _rgb_array(image, norm)
    size = rgb.shape[:2]
    marks = None if heads is None else _head_array(heads)
    pred = _map_array(predicted, size, "predicted")
    maps = [pred] if truth is None else [pred, _map_array(truth, size, "truth")]
    count = float(np.sum(pred)) if count is None else float(count)
    if truth is not None and true_count is None:
        true_count = float(np.sum(maps[1]))
    layout = picture_layout(size, 1 + len(maps))
    W, H = layout.size
    fig = _figure(W, H)
    enlarged = layout.panels[0][2] - layout.panels[0][0] >= size[1]
    interp = "nearest" if enlarged else "antialiased"
    vmin = min(float(m.min()) for m in maps)
    vmax = max(float(m.max()) for m in maps)
    if not vmax > vmin:  # a flat map: any non-empty range, so the colour bar can be drawn
        vmax = vmin + max(1e-9, abs(vmin) * 1e-6)
    ax = _axes(fig, layout.panels[0], layout.size)
    ax.imshow(rgb, interpolation=interp, aspect="auto")
    ax.set_title("image", fontsize=9)
    if marks is not None:
        # imshow puts pixel (i, j)'s centre at (j, i); a head at (x, y) covers pixel (floor(y), floor(x))
        ax.scatter(marks[:, 0] - 0.5, marks[:, 1] - 0.5, s=30, facecolors="none", edgecolors="red", linewidths=1.2)
        ax.set_xlim(-0.5, size[1] - 0.5)
        ax.set_ylim(size[0] - 0.5, -0.5)
        ax.set_title(f"image: {len(marks)} heads located", fontsize=9)
    titles = ["predicted", "true"]
    artist = None
    for k, m in enumerate(maps):
        ax = _axes(fig, layout.panels[k + 1], layout.size)
        artist = ax.imshow(m, cmap=CMAP, vmin=vmin, vmax=vmax, interpolation=interp, aspect="auto")
        total = count if k == 0 else true_count
        ax.set_title(f"{titles[k]}: {total:.1f}", fontsize=9)
    x0, y0, x1, y1 = layout.colorbar
    cax = fig.add_axes((x0 / W, 1.0 - y1 / H, (x1 - x0) / W, (y1 - y0) / H))
    bar = fig.colorbar(artist, cax=cax)
    bar.set_label("people per pixel", fontsize=8)
    cax.tick_params(labelsize=7)
    fig.text(MARGIN / W, 1.0 - 8 / H, picture_title(name or Path(path).stem, count, true_count), fontsize=10,
             va="top", ha="left")
    _save(fig, path)
    return layout


def save_prediction(path, prediction, *, points=None, name: str | None = None, heads=None) -> PictureLayout:
    """The picture of a :class:`crowdkernels.Prediction` (from ``Counter.predict`` or
    ``Counter.predictions``); with the image's head points ([N, 2] (x, y) pixels), also the true map
    (``crowdkernels.density_map``, style exact) and the true count; with ``heads`` (e.g.
    ``prediction.points()``), the located heads marked on the image."""
    import torch


    truth = None
    if points is not None:
        pts = torch.as_tensor(np.asarray(points, dtype=np.float64)).reshape(-1, 2)
        truth = density_map(pts, prediction.size).float()
    return save_picture(path, prediction.image, prediction.density(), truth=truth,
                        name=name or Path(prediction.source).name, count=prediction.count,
                        true_count=None if truth is None else float(truth.sum(dtype=torch.float64)), heads=heads)


def save_count_picture(path, prediction, *, heads=None, warn=None) -> None:
    """:func:`save_prediction` of a counted image, with its true map when a point file (``<image stem>.txt``,
    ``.csv`` or ``.json``) lies beside the image; a point file that cannot be read is told to ``warn`` (one
    line) and the picture is drawn without it."""
    points, ann = None, point_file_beside(prediction.source)
    if ann is not None:
        try:
            points = image_points(read_point_file(ann), prediction.source)  # turned with a photo's EXIF orientation
        except AnnotationError as exc:
            if warn is not None:
                warn(f"warning: no true map for {Path(prediction.source).name}: {exc}")
    save_prediction(path, prediction, points=points, heads=heads)


def picture_names(paths) -> dict:
    """The file name of each image's picture (keys: the paths as str): ``<stem>.png``, or, for images that share
    a stem, their paths below the folder they have in common with '/' written '__' (``a/crowd.jpg`` and
    ``b/crowd.jpg``: ``a__crowd.png`` and ``b__crowd.png``), the suffix kept where only it differs
    (``crowd.jpg.png``, ``crowd.png.png``); a name still taken gets ``-2``, ``-3``, ... The same file given twice
    keeps one name."""
    import os

    files = list(dict.fromkeys(str(p) for p in paths))
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(Path(f).stem.lower(), []).append(f)
    names = {}
    for group in by_stem.values():
        if len(group) == 1:
            names[group[0]] = Path(group[0]).stem
            continue
        full = [os.path.abspath(f) for f in group]
        common = os.path.commonpath([os.path.dirname(f) for f in full])
        rel = [os.path.relpath(f, common) for f in full]
        stems = [str(Path(r).with_suffix("")).replace(os.sep, "__") for r in rel]
        unique = len({t.lower() for t in stems}) == len(stems)
        for f, r, t in zip(group, rel, stems):
            names[f] = t if unique else r.replace(os.sep, "__")
    taken, out = set(), {}
    for f in files:
        name, k = names[f], 1
        while (name if k == 1 else f"{name}-{k}").lower() in taken:
            k += 1
        name = name if k == 1 else f"{name}-{k}"
        taken.add(name.lower())
        out[f] = f"{name}.png"
    return out


def _head_array(heads) -> np.ndarray:
    import torch

    a = heads.detach().cpu().double().numpy() if isinstance(heads, torch.Tensor) else np.asarray(heads, np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise ValueError(f"heads must be [N, 2] (x, y) or [N, 3] (x, y, score), got shape {a.shape}")
    return a[:, :2]


def _save(fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1}))


def save_scatter(path, true_counts, pred_counts, *, mae: float | None = None, mse: float | None = None,
                 title: str = "") -> None:
    """Predicted against true counts, one dot per image, with the line y = x, and the MAE and MSE (an
    RMSE, the papers' name) in the title (computed here when not given). 640 x 640 PNG."""
    t = np.asarray(true_counts, dtype=np.float64)
    p = np.asarray(pred_counts, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"true_counts and pred_counts must be two lists of one length, got {t.shape} and {p.shape}")
    if mae is None:
        mae = float(np.mean(np.abs(p - t))) if t.size else math.nan
    if mse is None:
        mse = float(np.sqrt(np.mean((p - t) ** 2))) if t.size else math.nan
    fig = _figure(640, 640)
    ax = fig.add_axes((0.13, 0.1, 0.82, 0.78))
    hi = max(1.0, float(np.max(t, initial=0.0)), float(np.max(p, initial=0.0)))
    lo = min(0.0, float(np.min(p, initial=0.0)))
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", linewidth=1, label="predicted = true")
    ax.scatter(t, p, s=14, color="tab:blue", alpha=0.8, label=f"{t.size} images")
    ax.set_xlim(lo, hi * 1.03)
    ax.set_ylim(lo, hi * 1.03)
    ax.set_xlabel("true count")
    ax.set_ylabel("predicted count")
    ax.legend(loc="best", fontsize=8)
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}MAE {mae:.2f}, MSE {mse:.2f} (an RMSE, as the papers name it)", fontsize=10)
    _save(fig, path)


def save_learning_curve(path, history: list, baseline_mae: float | None = None, *, title: str = "learning curve") -> None:
    """Training loss and validation MAE per epoch (``history``: the entries of a run's log.jsonl), with a
    mean-count baseline and half of it (the demo's target) when given. 640 x 400 PNG."""
    fig = _figure(640, 400)
    ax = fig.add_axes((0.1, 0.12, 0.78, 0.78))
    # epoch lines carry the training loss; a budget's stop adds a validation at a fractional epoch
    trained = [h for h in history if "loss" in h]
    ax.plot([h["epoch"] for h in trained], [h["loss"].get("total", float("nan")) for h in trained], "o-",
            color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    val = [(h.get("at_epoch", h["epoch"]), h["val"]["mae"]) for h in history if h.get("val") and h["val"].get("mae") is not None]
    if val:
        ax2.plot(*zip(*val), "s-", color="tab:red", label="held-out MAE")
    if baseline_mae is not None:
        ax2.axhline(baseline_mae, color="gray", linestyle="--", label=f"mean-count baseline MAE {baseline_mae:.2f}")
        ax2.axhline(baseline_mae / 2, color="gray", linestyle=":", label="half the baseline (target)")
    ax2.set_ylabel("held-out MAE (heads)", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    ax.set_title(title)
    _save(fig, path)
