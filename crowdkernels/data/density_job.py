"""The density maps of a whole dataset split, as files: what ``crowdkernels density`` runs.

:func:`run_density_job` reads every image's head annotation in a split folder (:func:`list_samples`),
makes its map with :func:`crowdkernels.density_map`, and writes ``OUT/<image stem>.npy`` (float32
[ceil(H/s), ceil(W/s)]) and ``OUT/manifest.json``:

- ``settings`` (the density_map arguments) and ``format``; a rerun with other settings is refused
  (:class:`DensityJobError`) unless ``overwrite``;
- ``images``: per image the map file, image and annotation paths (relative to ROOT), image and map
  sizes, head count, heads inside the image, the map's sum, sigma min/median/max (:data:`SIGMA_RULE`) and
  ``annotation_sha256``, the SHA-256 of the annotation file the map was made from;
- ``failures``: per image, why it failed (a missing or corrupt annotation or image); ``summary``.

Every file is written atomically. A rerun reuses a map only when it provably came from the same
annotation and settings: the manifest has its record, the annotation file's SHA-256 and the image size
are the recorded ones, and the file loads as float32 of the recorded shape, finite, with the recorded
sum. Anything else is recomputed; a map whose annotation now fails is deleted, so no stale map stays
beside the manifest. The manifest is flushed every 10 s, so a killed run recomputes at most the maps of
its last 10 s. One bad file does not stop the job (unless ``strict``): it is reported and counted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .._io import clean_stale_temps, parse_device, save_json, save_npy
from .readers import AnnotationError, count_inside
from ..ops.density import density_map, knn_sigma
from .._progress import Progress
from .layouts import FORMATS, list_samples
from .._options import Option, positive_float, positive_int, sigma_arg

__all__ = ["SIGMA_RULE", "DENSITY_OPTIONS", "DensitySettings", "DensityJobError", "effective_sigmas", "file_sha256",
           "run_density_job", "summary_line"]

SIGMA_RULE = (
    "sigma min/median/max over the points the map was built from, by the same rule as the density API: "
    "style exact: knn_sigma (beta x mean distance to the k nearest) over the in-image points, a lone point "
    "getting mean(H, W)/4; csrnet: the same over the distinct integer head pixels (int(x), int(y)) of the "
    "in-image points; matlab: the fixed sigma (4.0 unless --sigma) for every point; a fixed --sigma: that "
    "value. null when the map has no points. Units: pixels of the full-resolution image."
)

MANIFEST_FLUSH_SECONDS = 10.0


class DensityJobError(ValueError):
    """The job cannot start: settings that contradict the maps already in OUT, a bad setting, a bad device."""


def _option(flag: str, order: int, **kw) -> dict:
    """A setting's metadata: the ``crowdkernels density`` option that sets it."""
    return {"option": Option(flag, order, **kw)}


@dataclass(frozen=True)
class DensitySettings:
    """The density_map arguments of a run; recorded in the manifest so a rerun only reuses maps made
    with the same settings."""

    style: str = field(default="exact", metadata=_option(
        "--style", 40, default="exact", choices=("exact", "csrnet", "matlab"), help="default: exact"))
    sigma: object = field(default="adaptive", metadata=_option(  # "adaptive" or a float
        "--sigma", 50, default="adaptive", type=sigma_arg,
        help="'adaptive' (kNN geometry-adaptive; matlab: 4.0) or a fixed sigma in pixels; default: adaptive"))
    k: int = field(default=3, metadata=_option(
        "--k", 70, default=3, type=positive_int, help="neighbours of the adaptive sigma; default: 3"))
    beta: float = field(default=0.3, metadata=_option(
        "--beta", 80, default=0.3, type=positive_float, help="adaptive sigma = beta x mean kNN distance; default: 0.3"))
    truncate: float = field(default=4.0, metadata=_option(
        "--truncate", 90, default=4.0, type=positive_float, help="Gaussian radius in sigmas; default: 4.0"))
    kernel_size: int = field(default=15, metadata=_option(
        "--kernel-size", 100, default=15, type=positive_int, help="window of style matlab (odd); default: 15"))
    stride: int = field(default=1, metadata=_option(
        "--stride", 60, default=1, type=positive_int, help="maps at 1/stride resolution, count kept; default: 1"))

    def api_kwargs(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.style not in ("exact", "csrnet", "matlab"):
            raise DensityJobError(f"style must be 'exact', 'csrnet' or 'matlab', got {self.style!r}")
        if self.style == "matlab" and self.kernel_size % 2 == 0:
            raise DensityJobError(f"--kernel-size must be odd for style matlab, got {self.kernel_size}")
        if self.sigma != "adaptive" and not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise DensityJobError(f"sigma must be 'adaptive' or a positive number, got {self.sigma!r}")


#: ``crowdkernels density``'s options, in ``--help`` order: the job's arguments and the settings' fields
DENSITY_OPTIONS = tuple(sorted((
    Option("root", 10, type=Path, help="the split folder (e.g. ShanghaiTech/part_A/train_data)"),
    Option("--format", 20, required=True, choices=lambda: sorted(FORMATS), help="the dataset's layout"),
    Option("--out", 30, required=True, type=Path, help="output folder (created if needed)"),
    *(f.metadata["option"] for f in fields(DensitySettings)),
    Option("--device", 110, default="cpu", help="torch device for the kernels, e.g. cuda; default: cpu"),
    Option("--overwrite", 120, action="store_true", help="recompute every map, even finished ones"),
    Option("--strict", 130, action="store_true", help="stop at the first bad file instead of skipping it"),
), key=lambda o: o.order))


def effective_sigmas(points, size, settings: DensitySettings) -> np.ndarray:
    """The sigmas density_map gives the points it keeps (see :data:`SIGMA_RULE`), float64 NumPy [M]."""
    h, w = size
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if settings.style in ("exact", "csrnet"):
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
        pts = pts[inside]
    if settings.style == "csrnet":
        pts = np.unique(np.floor(pts), axis=0)
    if settings.sigma != "adaptive":
        return np.full(pts.shape[0], float(settings.sigma))
    if settings.style == "matlab":
        return np.full(pts.shape[0], 4.0)
    if pts.shape[0] == 0:
        return np.zeros(0)
    sig = knn_sigma(torch.from_numpy(pts), k=settings.k, beta=settings.beta, lone=(h + w) / 8.0)
    return sig.numpy()


def _sigma_stats(sigmas) -> dict | None:
    if len(sigmas) == 0:
        return None
    return {"min": float(np.min(sigmas)), "median": float(np.median(sigmas)), "max": float(np.max(sigmas))}


def _map_shape(size, stride: int) -> tuple[int, int]:
    return -(-size[0] // stride), -(-size[1] // stride)


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, hex (AnnotationError naming it when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise AnnotationError(path, "annotation file not found") from None
    except OSError as exc:
        raise AnnotationError(path, f"cannot read the file ({exc})") from None
    return digest.hexdigest()


def relative_to_root(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it (for manifests that stay valid when a tree moves)."""
    try:
        return os.path.relpath(path, root) if Path(path).resolve().is_relative_to(Path(root).resolve()) else str(path)
    except (ValueError, OSError):
        return str(path)


def _entry(sample, root: Path, size, points, density, settings: DensitySettings, sha: str, orientation: int) -> dict:
    return {
        "file": f"{sample.name}.npy",
        "image": relative_to_root(sample.image, root),
        "annotation": relative_to_root(sample.annotation, root),
        "annotation_sha256": sha,
        "size": [int(size[0]), int(size[1])],
        "orientation": int(orientation),  # the image's EXIF orientation: the map is of the image shown upright
        "map_size": [int(density.shape[0]), int(density.shape[1])],
        "style": settings.style,
        "head_count": int(points.shape[0]),
        "in_image": count_inside(points, size),
        # the sum of the float32 array on disk, accumulated in float64: what a reader of the file gets
        "map_sum": float(np.sum(density, dtype=np.float64)),
        "sigma": _sigma_stats(effective_sigmas(points, size, settings)),
    }


def _reusable(path: Path, entry, size, shape, sha: str, orientation: int) -> bool:
    """Whether the map at ``path`` provably came from this annotation (``sha``) and image ``size`` and EXIF
    ``orientation`` with the run's settings: its manifest record says so, and the file is that record's
    finished map."""
    if not isinstance(entry, dict) or entry.get("annotation_sha256") != sha or list(entry.get("size", [])) != list(size):
        return False
    if entry.get("orientation", 1) != orientation:  # records written before orientations were applied lack it
        return False
    if list(entry.get("map_size", [])) != list(shape) or not isinstance(entry.get("map_sum"), (int, float)):
        return False
    if not path.is_file():
        return False
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # truncated, not an .npy, ...: recompute
        return False
    if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape) or not np.isfinite(arr).all():
        return False
    total, recorded = float(np.sum(arr, dtype=np.float64)), float(entry["map_sum"])
    return abs(total - recorded) <= 1e-6 * max(1.0, abs(recorded))


def _old_entries(manifest_path: Path, fmt: str, settings: DensitySettings, out: Path) -> dict:
    """The image records of an existing manifest made with the same settings; DensityJobError when its
    settings differ (the maps in OUT would mix two recipes)."""
    if not manifest_path.is_file():
        return {}
    try:
        old = json.loads(manifest_path.read_text())
        old_settings, old_format = old["settings"], old["format"]
        entries = dict(old.get("images", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # unreadable (it is only ever replaced atomically, so someone edited it): nothing is provably reusable
        return {}
    now = {"format": fmt, **json.loads(json.dumps(asdict(settings)))}
    before = {"format": old_format, **(old_settings if isinstance(old_settings, dict) else {})}
    changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
    if changed:
        raise DensityJobError(
            f"{out} holds maps made with other settings ({', '.join(changed)}): pass --overwrite to replace "
            "them, or choose another --out"
        )
    return entries


def _version() -> str:
    """The installed crowdkernels' version, as the manifest records it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crowdkernels")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown"


def run_density_job(root, format: str, out, settings: DensitySettings = DensitySettings(), *, device="cpu",
                    overwrite: bool = False, strict: bool = False, progress=None, warn=None) -> dict:
    """Writes the maps of one split folder and its manifest (see the module docstring); returns the manifest.

    Args:
        root: the split folder (e.g. ShanghaiTech/part_A/train_data); ``format``: one of
            :data:`crowdkernels.data.FORMATS`.
        out: the output folder (created if needed).
        settings: the density_map arguments.
        device: torch device of the kernels ("cuda" for the GPU kernels).
        overwrite: recompute every map (and accept other settings than the manifest's).
        strict: stop at the first bad file (its failure is then the manifest's only one).
        progress: True, False, or None (a bar when stderr is a terminal, else a line at the end).
        warn: called with each per-file error and each note (default: stderr, above the bar).
    Raises:
        LayoutError (ROOT has not the format's layout), DensityJobError (bad settings or device, or OUT
        holds maps of other settings without ``overwrite``).
    """
    settings.check()
    try:
        dev = parse_device(device, "--device")
    except ValueError as exc:
        raise DensityJobError(str(exc)) from None

    root, out = Path(root), Path(out)
    notes = []
    samples = list_samples(root, format, missing="keep", warn=notes.append)  # LayoutError: the caller says it
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    manifest_path = out / "manifest.json"
    old_entries = {} if overwrite else _old_entries(manifest_path, format, settings, out)

    manifest = {
        "crowdkernels": _version(),
        "format": format,
        "root": str(root.resolve()),
        "settings": asdict(settings),
        "sigma_rule": SIGMA_RULE,
        "images": {},
        "failures": {},
    }
    images, failures = manifest["images"], manifest["failures"]
    save_json(manifest_path, manifest)  # the settings are on disk before the first map is

    written = reused = 0
    last_flush = time.monotonic()
    with Progress(len(samples), "density", bar=progress, lines=progress is not False, skip_word="failed") as bar:
        say = warn or bar.write
        for note in notes:
            say(f"crowdkernels density: warning: {note}")
        try:
            for sample in samples:
                npy = out / f"{sample.name}.npy"
                try:
                    size, orientation = sample.size(), sample.orientation()
                    shape = _map_shape(size, settings.stride)
                    sha = file_sha256(sample.annotation)
                    entry = old_entries.get(sample.name)
                    if not overwrite and _reusable(npy, entry, size, shape, sha, orientation):
                        images[sample.name] = entry
                        reused += 1
                    else:
                        points = sample.points()
                        dm = density_map(torch.from_numpy(points).to(dev), size, **settings.api_kwargs())
                        arr = dm.to(torch.float32).cpu().numpy()
                        save_npy(npy, arr)
                        written += 1
                        images[sample.name] = _entry(sample, root, size, points, arr, settings, sha, orientation)
                except Exception as exc:  # one bad file must not stop the run; it is reported and counted
                    # the readers' errors (AnnotationError, ImageError) already name their file; others get the image's
                    failures[sample.name] = (
                        str(exc) if isinstance(exc, ValueError) else f"{sample.image}: {type(exc).__name__}: {exc}"
                    )
                    if npy.exists():  # made from an annotation or image that is no longer valid
                        npy.unlink()
                    say(f"crowdkernels density: error: {failures[sample.name]}")
                    if strict:
                        break
                finally:
                    bar.update(1, skipped=int(sample.name in failures))
                if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
                    save_json(manifest_path, manifest)
                    last_flush = time.monotonic()
        finally:
            manifest["summary"] = {
                "images": len(samples),
                "done": len(images),
                "written": written,
                "reused": reused,
                "failed": len(failures),
                "heads": sum(e["head_count"] for e in images.values()),
                "points_outside": sum(e["head_count"] - e["in_image"] for e in images.values()),
                "map_sum": float(sum(e["map_sum"] for e in images.values())),
            }
            save_json(manifest_path, manifest)
    return manifest


def summary_line(manifest: dict, out) -> str:
    """One line on a finished job: its images (written, reused), heads, map sum, points outside, failures."""
    s, style = manifest["summary"], manifest["settings"]["style"]
    outside = ""
    if s["points_outside"]:
        what = "clipped to the border (style matlab)" if style == "matlab" else "dropped"
        outside = f"; {s['points_outside']} point(s) outside their images {what}"
    return (f"density: {s['done']}/{s['images']} images in {out} ({s['written']} written, {s['reused']} reused), "
            f"{s['heads']} heads, map sum {s['map_sum']:.2f}{outside}; {len(manifest['failures'])} failed")
