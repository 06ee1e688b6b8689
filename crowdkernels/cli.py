"""The `crowdkernels` command line: ``info``, ``density``, ``demo``.

Each subcommand is one function registered with :func:`command`: it adds its arguments to an argparse
sub-parser and returns a handler ``(args) -> exit code``. ``main(argv)`` runs in-process and returns the
exit code (0 success, 1 some files failed, 2 bad usage or a wrong dataset layout), so tests and other
programs can call it without a subprocess.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .engine.checkpoint import atomic_write as _atomic_write  # temp file, fsync, rename

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {}


def command(name: str, help: str):
    """Registers a subcommand: the decorated function receives its sub-parser, adds the arguments, and
    returns the handler. New commands (train, eval, count) are one more decorated function."""

    def register(fn):
        _COMMANDS[name] = (help, fn)
        return fn

    return register


class _CliError(Exception):
    """An error reported as one line on stderr with exit code 2 (bad usage, wrong layout, ...)."""


# ----------------------------------------------------------------------------------------- file helpers
def _save_npy(path: Path, array) -> None:
    import numpy as np

    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _save_json(path: Path, data) -> None:
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text), mode="w")


def _clean_stale_temps(folder: Path) -> None:
    """Removes the temp files a killed run may have left (".<name>.<random>.tmp")."""
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------------------- info
def _yes_no(flag) -> str:
    return "yes" if flag else "no"


@command("info", "what this installation can run: compiled backends, CUDA archs, Triton, threads")
def _info_command(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args) -> int:
        import crowdkernels

        info = {"crowdkernels": crowdkernels.__version__, **crowdkernels.backends()}
        if args.json:
            print(json.dumps(info, indent=1))
            return EXIT_OK
        fallback = "" if info["cpu"] else " (the plain-PyTorch reference runs instead: slower, same results)"
        rows = [
            ("crowdkernels", info["crowdkernels"]),
            ("torch", info["torch"]),
            ("C++ kernels (cpu)", _yes_no(info["cpu"]) + fallback),
            ("OpenMP", info["openmp"] or "no"),
            ("CUDA kernels", _yes_no(info["cuda"])),
            ("CUDA archs", ", ".join(info["cuda_archs"]) or "-"),
            ("GPU visible", _yes_no(info["cuda_device"])),
            (
                "Triton",
                f"{info['triton']} (runs here: {_yes_no(info['triton_runs'])})" if info["triton"] else "not installed",
            ),
            ("threads", info["threads"]),
        ]
        if "load_error" in info:
            rows.append(("load error", info["load_error"]))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        return EXIT_OK

    return run


# ----------------------------------------------------------------------------------------- density
SIGMA_RULE = (
    "sigma min/median/max over the points the map was built from, by the same rule as the density API: "
    "style exact: knn_sigma (beta x mean distance to the k nearest) over the in-image points, a lone point "
    "getting mean(H, W)/4; csrnet: the same over the distinct integer head pixels (int(x), int(y)) of the "
    "in-image points; matlab: the fixed sigma (4.0 unless --sigma) for every point; a fixed --sigma: that "
    "value. null when the map has no points. Units: pixels of the full-resolution image."
)


@dataclass(frozen=True)
class DensitySettings:
    """The density_map arguments of a run; recorded in the manifest so a rerun only reuses maps made
    with the same settings."""

    style: str = "exact"
    sigma: object = "adaptive"  # "adaptive" or a float
    k: int = 3
    beta: float = 0.3
    truncate: float = 4.0
    kernel_size: int = 15
    stride: int = 1

    def api_kwargs(self) -> dict:
        return asdict(self)


def _effective_sigmas(points, size, settings: DensitySettings):
    """The sigmas density_map gives the points it keeps (see SIGMA_RULE), float64 NumPy [M]."""
    import numpy as np
    import torch

    from .ops.density import knn_sigma

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
    import numpy as np

    if len(sigmas) == 0:
        return None
    return {"min": float(np.min(sigmas)), "median": float(np.median(sigmas)), "max": float(np.max(sigmas))}


def _map_shape(size, stride: int) -> tuple[int, int]:
    return -(-size[0] // stride), -(-size[1] // stride)


def _entry(sample, root: Path, size, points, density, settings: DensitySettings) -> dict:
    import numpy as np

    from .data.datasets import count_inside, relative_to_root

    return {
        "file": f"{sample.name}.npy",
        "image": relative_to_root(sample.image, root),
        "annotation": relative_to_root(sample.annotation, root),
        "size": [int(size[0]), int(size[1])],
        "map_size": [int(density.shape[0]), int(density.shape[1])],
        "style": settings.style,
        "head_count": int(points.shape[0]),
        "in_image": count_inside(points, size),
        # the sum of the float32 array on disk, accumulated in float64: what a reader of the file gets
        "map_sum": float(np.sum(density, dtype=np.float64)),
        "sigma": _sigma_stats(_effective_sigmas(points, size, settings)),
    }


def _load_valid_map(path: Path, shape, entry: dict | None):
    """The array at `path` when it is a finished, valid map: loads, float32, the expected shape, finite,
    and (when the manifest has an entry) the recorded shape and sum. None otherwise."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # truncated, not an .npy, ...: recompute
        return None
    if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape) or not np.isfinite(arr).all():
        return None
    if entry is not None:
        total = float(np.sum(arr, dtype=np.float64))
        recorded = entry.get("map_sum")
        if list(entry.get("map_size", [])) != list(shape) or not isinstance(recorded, (int, float)):
            return None
        if abs(total - recorded) > 1e-6 * max(1.0, abs(recorded)):
            return None
    return arr


def _sigma_arg(text: str):
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


@command("density", "write the density maps of a dataset split (.npy per image + manifest.json)")
def _density_command(p: argparse.ArgumentParser):
    from .data.datasets import FORMATS

    p.description = (
        "Reads every image's head annotations in a dataset split, makes its density map with "
        "crowdkernels.density_map, and writes OUT/<image stem>.npy (float32 [ceil(H/s), ceil(W/s)]) and "
        "OUT/manifest.json. Files are written atomically; a rerun reuses finished maps. Layouts: "
        + "; ".join(f"{f.name}: {f.layout}" for f in FORMATS.values())
    )
    p.add_argument("root", type=Path, help="the split folder (e.g. ShanghaiTech/part_A/train_data)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="the dataset's layout")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    p.add_argument("--style", default="exact", choices=("exact", "csrnet", "matlab"), help="default: exact")
    p.add_argument("--sigma", default="adaptive", type=_sigma_arg,
                   help="'adaptive' (kNN geometry-adaptive; matlab: 4.0) or a fixed sigma in pixels; default: adaptive")
    p.add_argument("--stride", default=1, type=_positive_int, help="maps at 1/stride resolution, count kept; default: 1")
    p.add_argument("--k", default=3, type=_positive_int, help="neighbours of the adaptive sigma; default: 3")
    p.add_argument("--beta", default=0.3, type=_positive_float, help="adaptive sigma = beta x mean kNN distance; default: 0.3")
    p.add_argument("--truncate", default=4.0, type=_positive_float, help="Gaussian radius in sigmas; default: 4.0")
    p.add_argument("--kernel-size", default=15, type=_positive_int, help="window of style matlab (odd); default: 15")
    p.add_argument("--device", default="cpu", help="torch device for the kernels, e.g. cuda; default: cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute every map, even finished ones")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    return _run_density


def _run_density(args) -> int:
    import torch
    from tqdm import tqdm

    import crowdkernels

    from .data.datasets import list_samples
    from .ops.density import density_map

    settings = DensitySettings(args.style, args.sigma, args.k, args.beta, args.truncate, args.kernel_size, args.stride)
    if settings.style == "matlab" and settings.kernel_size % 2 == 0:
        raise _CliError(f"--kernel-size must be odd for style matlab, got {settings.kernel_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise _CliError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _CliError(f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__}")

    root = args.root
    samples = list_samples(root, args.format, missing="keep")  # LayoutError -> exit 2, said by main()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    manifest_path = out / "manifest.json"

    old_entries: dict = {}
    manifest_found = manifest_path.is_file()
    if manifest_found and not args.overwrite:
        try:
            old = json.loads(manifest_path.read_text())
            old_settings, old_format = old["settings"], old["format"]
            old_entries = dict(old.get("images", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # an unreadable manifest (it is only ever replaced atomically, so someone edited it): the
            # maps are checked one by one instead
            manifest_found, old_entries = False, {}
        else:
            now = {"format": args.format, **json.loads(json.dumps(asdict(settings)))}
            before = {"format": old_format, **(old_settings if isinstance(old_settings, dict) else {})}
            changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
            if changed:
                raise _CliError(
                    f"{out} holds maps made with other settings ({', '.join(changed)}): pass --overwrite "
                    "to replace them, or choose another --out"
                )

    manifest = {
        "crowdkernels": crowdkernels.__version__,
        "format": args.format,
        "root": str(Path(root).resolve()),
        "settings": asdict(settings),
        "sigma_rule": SIGMA_RULE,
        "images": {},
        "failures": {},
    }
    images, failures = manifest["images"], manifest["failures"]
    _save_json(manifest_path, manifest)  # the settings are on disk before the first map is

    written = reused = 0
    last_flush = time.monotonic()
    bar = tqdm(samples, unit="img", desc="density", file=sys.stderr, dynamic_ncols=True)
    stopped = False
    try:
        for sample in bar:
            npy = out / f"{sample.name}.npy"
            try:
                size = sample.size()
                shape = _map_shape(size, settings.stride)
                entry = old_entries.get(sample.name)
                arr = None if args.overwrite else _load_valid_map(npy, shape, entry)
                if arr is not None and entry is not None:
                    images[sample.name] = entry
                    reused += 1
                    continue
                points = sample.points()
                if arr is None:
                    dm = density_map(torch.from_numpy(points).to(device), size, **settings.api_kwargs())
                    arr = dm.to(torch.float32).cpu().numpy()
                    _save_npy(npy, arr)
                    written += 1
                else:  # a valid map without a manifest record (killed between manifest flushes)
                    reused += 1
                images[sample.name] = _entry(sample, root, size, points, arr, settings)
            except Exception as exc:  # one bad file must not stop the run; it is reported and counted
                # the readers' errors (AnnotationError, ImageError) already name their file; others get the image's
                failures[sample.name] = (
                    str(exc) if isinstance(exc, ValueError) else f"{sample.image}: {type(exc).__name__}: {exc}"
                )
                tqdm.write(f"crowdkernels density: error: {failures[sample.name]}", file=sys.stderr)
                if args.strict:
                    stopped = True
                    break
            if time.monotonic() - last_flush > 10.0:
                _save_json(manifest_path, manifest)
                last_flush = time.monotonic()
    finally:
        bar.close()
        n_out = sum(e["head_count"] - e["in_image"] for e in images.values())
        manifest["summary"] = {
            "images": len(samples),
            "done": len(images),
            "written": written,
            "reused": reused,
            "failed": len(failures),
            "heads": sum(e["head_count"] for e in images.values()),
            "points_outside": n_out,
            "map_sum": float(sum(e["map_sum"] for e in images.values())),
        }
        _save_json(manifest_path, manifest)

    s = manifest["summary"]
    if not manifest_found and reused:
        print(f"note: {reused} finished map(s) reused without a manifest record; pass --overwrite to recompute them")
    outside = ""
    if n_out:
        what = "clipped to the border (style matlab)" if settings.style == "matlab" else "dropped"
        outside = f"; {n_out} point(s) outside their images {what}"
    print(
        f"density: {s['done']}/{s['images']} images in {out} ({written} written, {reused} reused), "
        f"{s['heads']} heads, map sum {s['map_sum']:.2f}{outside}; {len(failures)} failed"
    )
    if failures:
        if stopped:
            print("stopped at the first failure (--strict)", file=sys.stderr)
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for name, msg in failures.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------- demo
@command("demo", "synthetic crowds -> density maps with the kernel -> PNG pictures, with counts")
def _demo_command(p: argparse.ArgumentParser):
    p.add_argument("--out", type=Path, default=Path("crowdkernels-demo"), help="default: ./crowdkernels-demo")
    p.add_argument("--num-images", type=_positive_int, default=20, help="default: 20")
    p.add_argument("--size", type=_positive_int, default=128, help="image side in pixels (>= 16); default: 128")
    p.add_argument("--seed", type=int, default=0, help="default: 0")

    def run(args) -> int:
        if args.size < 16:
            raise _CliError(f"--size must be >= 16, got {args.size}")
        if args.seed < 0:
            raise _CliError(f"--seed must be >= 0, got {args.seed}")
        summary = run_demo(args.out, num_images=args.num_images, size=args.size, seed=args.seed)
        return EXIT_OK if summary["ok"] else EXIT_FAILED

    return run


def _demo_data(num_images: int, size: int, seed: int):
    from .data.synthetic import synthetic_dataset

    return synthetic_dataset(num_images, size, seed)


def _demo_targets(samples):
    """[B, 1, H, W] float32 maps of the samples in one batched call (adaptive sigma, style exact)."""
    from .ops.density import density_maps

    return density_maps([s.points_tensor() for s in samples], samples[0].size)


class _PictureWriter:
    """The rendering beside its density map, titled with the head count and the map sum, as PNG.

    One figure is laid out once and only its data are swapped per image (laying out a figure costs
    more than drawing it). Uses the Agg canvas directly, not pyplot: no display needed, and
    matplotlib's global state is left alone."""

    def __init__(self, size):
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h, w = size
        # fixed axes (no layout engine, which would draw every figure twice): two panels of the image's
        # aspect ratio side by side, a colour bar at the right
        self.fig = Figure(figsize=(6.4, 0.6 + 2.75 * h / w), dpi=100)
        FigureCanvasAgg(self.fig)
        top = 1.0 - 0.3 / self.fig.get_figheight()
        ax1 = self.fig.add_axes((0.02, 0.02, 0.44, top - 0.02))
        ax2 = self.fig.add_axes((0.48, 0.02, 0.44, top - 0.02))
        cax = self.fig.add_axes((0.935, 0.1, 0.015, top - 0.2))
        self.image = ax1.imshow(np.zeros((h, w, 3), dtype=np.uint8), interpolation="nearest")
        (self.marks,) = ax1.plot([], [], "r+", markersize=3, markeredgewidth=0.6)
        self.density = ax2.imshow(np.zeros((h, w)), cmap="jet", interpolation="nearest", vmin=0, vmax=1)
        self.fig.colorbar(self.density, cax=cax)
        cax.tick_params(labelsize=6)
        self.titles = (ax1.set_title("", fontsize=9), ax2.set_title("", fontsize=9))
        for ax in (ax1, ax2):
            ax.set_axis_off()

    def save(self, path: Path, sample, density) -> None:
        self.image.set_data(sample.image)
        # pixel (i, j) is drawn centred on (j, i); a point (x, y) lies in pixel (floor(y), floor(x))
        self.marks.set_data(sample.points[:, 0] - 0.5, sample.points[:, 1] - 0.5)
        self.density.set_data(density)
        self.density.set_clim(0.0, max(float(density.max()), 1e-6))
        self.titles[0].set_text(f"{sample.name}: {sample.count} heads")
        self.titles[1].set_text(f"density map, sum {float(density.sum(dtype='float64')):.2f}")
        _atomic_write(path, lambda f: self.fig.savefig(f, format="png", pil_kwargs={"compress_level": 1}))


def run_demo(out, *, num_images: int = 20, size: int = 128, seed: int = 0, stream=None) -> dict:
    """The demo: render a synthetic crowd set, make its density maps with the kernel, save them
    (OUT/density/<name>.npy, float32) with PNG pictures (OUT/pictures/<name>.png: image beside map), and
    print per image the head count and the map sum. Returns the summary written to OUT/summary.json;
    ``ok`` says whether every map sums to its head count (to 1e-4 relative)."""
    import numpy as np

    stream = sys.stdout if stream is None else stream
    out = Path(out)
    (out / "density").mkdir(parents=True, exist_ok=True)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    samples = _demo_data(num_images, size, seed)
    t1 = time.perf_counter()
    maps = _demo_targets(samples)[:, 0].numpy()
    t2 = time.perf_counter()
    pictures = _PictureWriter(samples[0].size)
    rows = []
    for sample, density in zip(samples, maps):
        _save_npy(out / "density" / f"{sample.name}.npy", density)
        pictures.save(out / "pictures" / f"{sample.name}.png", sample, density)
        total = float(np.sum(density, dtype=np.float64))
        rows.append({"name": sample.name, "heads": sample.count, "map_sum": total})
        print(f"{sample.name}  heads {sample.count:4d}  map sum {total:9.4f}", file=stream)
    heads = sum(r["heads"] for r in rows)
    worst = max(abs(r["map_sum"] - r["heads"]) / max(1, r["heads"]) for r in rows)
    summary = {
        "images": len(rows),
        "size": [int(samples[0].size[0]), int(samples[0].size[1])],
        "seed": seed,
        "heads": heads,
        "map_sum": float(sum(r["map_sum"] for r in rows)),
        "max_relative_error": worst,
        "ok": worst <= 1e-4,
        "seconds": {"render": t1 - t0, "density": t2 - t1, "total": time.perf_counter() - t0},
        "per_image": rows,
    }
    _save_json(out / "summary.json", summary)
    print(
        f"demo: {len(rows)} synthetic images {summary['size'][0]}x{summary['size'][1]}, {heads} heads, "
        f"map sum {summary['map_sum']:.3f} (worst relative error {worst:.1e}); density maps in "
        f"{summary['seconds']['density']:.2f} s; pictures in {out / 'pictures'}",
        file=stream,
    )
    return summary


# ----------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdkernels", description="Fast density maps and crowd-counting tools (L2SM, HMoDE + REL)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_handler=add(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (argparse's usage errors included, as 2)."""
    from .data.datasets import LayoutError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2) end here, without leaving the process
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return args._handler(args)
    except (_CliError, LayoutError) as exc:
        print(f"crowdkernels {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"crowdkernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
