"""The `crowdkernels` command line: ``info``, ``density``, ``train``, ``eval``, ``count``, ``demo``.

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


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= `minimum`, with an error that says so (`what`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


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


# ----------------------------------------------------------------------------------------- train
def _max_size_arg(text: str):
    """'1920x1080' -> [1920, 1080]; '2048' -> 2048."""
    try:
        if "x" in text.lower():
            a, b = (int(t) for t in text.lower().split("x"))
            if a > 0 and b > 0:
                return [a, b]
        elif int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a side in pixels (2048) or a box (1920x1080), got {text!r}")


def _warn(msg: str) -> None:
    print(f"crowdkernels: {msg}", file=sys.stderr)


def _report_skipped(skipped: dict) -> None:
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for name, reason in skipped.items():
            print(f"  {name}: {reason}", file=sys.stderr)


@command("train", "train a counting model (HMoDE, L2SM, SPN, CSRNet), with a paper's recipe or your settings")
def _train_command(p: argparse.ArgumentParser):
    from .data.datasets import DATASET_NAMES
    from .engine.recipes import RECIPE_NAMES, SUMMARIES
    from .engine.train import MODEL_NAMES

    p.description = (
        "Trains a model. --recipe NAME sets every training choice of a paper (or of the authors' released "
        "code) at once: " + "; ".join(f"{n}: {SUMMARIES[n]}" for n in RECIPE_NAMES) + ". Explicit options "
        "override single values; --print-config shows the result as JSON. Without a recipe, --model's defaults "
        "are used (ours, for quick runs). Writes OUT/last.pt every epoch (atomically), OUT/best.pt (lowest "
        "validation MAE), OUT/log.jsonl. Ctrl-C saves and exits; --resume continues exactly. Runs under "
        "torchrun for DDP (--batch-size per process)."
    )
    S = argparse.SUPPRESS  # only the options given become overrides of the recipe (or of the run, on --resume)
    p.add_argument("--recipe", choices=RECIPE_NAMES, help="a named training configuration (see the README's table)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.add_argument("--model", default=S, choices=MODEL_NAMES, help="default: the recipe's, else hmode")
    p.add_argument("--dataset", default="synthetic", choices=DATASET_NAMES, help="default: synthetic")
    p.add_argument("--root", type=Path, help="the dataset folder (e.g. ShanghaiTech/ holding part_A/train_data)")
    p.add_argument("--out", type=Path, help="run folder (checkpoints, log); required unless --print-config")
    p.add_argument("--pretrained", default=S, help="a local torchvision vgg16 / vgg16_bn weights file for the "
                   "encoder (nothing is ever downloaded; see the README)")
    p.add_argument("--init", default=S, help="start from these weights: a crowdkernels checkpoint or the authors' "
                   "released HMoDE file (a fresh run: optimizer and epochs start anew)")
    p.add_argument("--epochs", type=_positive_int, default=S)
    p.add_argument("--batch-size", type=_positive_int, default=S, help="images per step and process")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=S)
    p.add_argument("--lr", type=_positive_float, default=S)
    p.add_argument("--momentum", type=_nonnegative_float, default=S, help="SGD momentum")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=S)
    p.add_argument("--lr-step", type=_nonnegative_int, default=S, help="halve the lr after this many epochs (0: never)")
    p.add_argument("--crop", type=_nonnegative_int, default=S, help="random crop side (0: whole images)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=S, help="random horizontal flips")
    p.add_argument("--max-size", type=_max_size_arg, default=S, help="cap images: a longest side or a box (1920x1080)")
    p.add_argument("--target-style", choices=("exact", "csrnet", "matlab"), default=S,
                   help="ground-truth density style (see the README's density styles)")
    p.add_argument("--sigma", type=_sigma_arg, default=S, help="ground-truth sigma: 'adaptive' or pixels")
    p.add_argument("--kernel-size", type=_positive_int, default=S, help="window of style matlab (odd)")
    p.add_argument("--target-scale", type=_positive_float, default=S,
                   help="multiply the ground-truth maps by this (the released HMoDE code: 100); counts are divided back")
    p.add_argument("--loss-weights", type=_float_list, default=S, help="HMoDE: one weight per density output, e.g. 1,1,1,2,2,2,4")
    p.add_argument("--rel", action=argparse.BooleanOptionalAction, default=S,
                   help="add (or, with --no-rel, drop) the relative local counting loss (HMoDE eq. 2)")
    p.add_argument("--set", action="append", default=S, metavar="KEY=JSON", dest="settings",
                   help="override any setting, e.g. --set criterion_kwargs.reduction='\"sum\"' (repeatable)")
    p.add_argument("--fold", type=int, choices=range(1, 6), metavar="K", default=S, help="UCF_CC_50 fold 1-5; default: 1")
    p.add_argument("--width", type=_positive_float, default=S, help="channel width multiplier of the model; default: 1")
    p.add_argument("--val-start", type=_positive_int, default=S, help="first epoch to validate")
    p.add_argument("--val-every", type=_positive_int, default=S, help="validate every E epochs")
    p.add_argument("--val-from-train", type=_fraction, default=S,
                   help="hold this fraction of the training images out (seeded) for model selection, instead of "
                        "the dataset's val/test split")
    p.add_argument("--workers", type=_nonnegative_int, default=S, help="DataLoader workers; default: 2")
    p.add_argument("--seed", type=_nonnegative_int, default=S)
    p.add_argument("--device", default=S, help="e.g. cuda, cuda:1, cpu; default: cuda:LOCAL_RANK when a GPU is visible")
    p.add_argument("--amp", action="store_true", default=S, help="bfloat16/float16 autocast (GPU only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings")
    p.add_argument("--strict", action="store_true", default=S, help="fail on the first bad file instead of skipping it")
    p.add_argument("--synthetic", type=_positive_int, nargs=3, metavar=("TRAIN", "VAL", "SIZE"), default=S,
                   help="synthetic set: images to train on, held out, side; default: 200 40 128")
    return _run_train


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _float_list(text: str) -> list:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


#: train options -> the TrainConfig setting they override
_TRAIN_OVERRIDES = {
    "model": "model", "pretrained": "pretrained", "init": "init", "epochs": "epochs", "batch_size": "batch_size",
    "optimizer": "optimizer", "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
    "lr_step": "lr_step", "crop": "crop", "flip": "flip", "max_size": "max_size", "target_style": "target.style",
    "sigma": "target.sigma", "kernel_size": "target.kernel_size", "target_scale": "target.scale",
    "loss_weights": "criterion_kwargs.weights", "rel": "criterion_kwargs.rel", "fold": "fold",
    "width": "model_kwargs.width", "val_start": "val_start", "val_every": "val_every",
    "val_from_train": "val_from_train", "workers": "workers", "seed": "seed", "device": "device", "amp": "amp",
    "strict": "strict",
}


def _train_overrides(args) -> dict:
    """The settings the command line gave explicitly (argparse.SUPPRESS leaves the others out of args)."""
    out = {}
    for opt, key in _TRAIN_OVERRIDES.items():
        if hasattr(args, opt):
            value = getattr(args, opt)
            if opt in ("crop", "lr_step") and value == 0:
                value = None  # 0: whole images / never
            if opt in ("pretrained", "init"):
                value = str(Path(value).expanduser())
            out[key] = value
    if hasattr(args, "synthetic"):
        out["synthetic"] = {"train": args.synthetic[0], "val": args.synthetic[1], "size": args.synthetic[2]}
    for item in getattr(args, "settings", []) or []:
        key, eq, text = item.partition("=")
        if not eq:
            raise _CliError(f"--set expects KEY=JSON, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            raise _CliError(f"--set {key.strip()}: the value must be JSON (e.g. 1e-4, \"sum\", [1, 2], null), got {text!r}") from None
    return out


def _train_config(args):
    from .engine.train import build_config, resume_config

    overrides = _train_overrides(args)
    if args.resume and args.out is not None and (args.out / "last.pt").is_file():
        return resume_config(args.out, overrides)
    try:
        config = build_config(recipe=args.recipe, dataset=args.dataset, overrides=overrides)
    except ValueError as exc:
        raise _CliError(str(exc)) from None
    config.dataset = args.dataset
    config.root = None if args.root is None else str(args.root)
    config.out = str(args.out) if args.out is not None else config.out
    config.resume = bool(args.resume)
    return config


def _run_train(args) -> int:
    import torch

    from .data.datasets import AnnotationError, ImageError
    from .engine import distributed
    from .engine.train import Trainer, build_run

    config = _train_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return EXIT_OK
    if args.out is None:
        raise _CliError("--out is required (the run folder)")
    if args.out.exists() and not args.out.is_dir():
        raise _CliError(f"--out {args.out} is a file, not a folder")
    if config.dataset != "synthetic" and config.root is None:
        raise _CliError(f"--root is required for --dataset {config.dataset}")
    if config.device and torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise _CliError(f"--device {config.device}: no CUDA GPU is visible to torch {torch.__version__}")
    distributed.init_from_env(torch.device(config.device).type if config.device else None)
    main = distributed.is_main()  # read before cleanup(): afterwards every process would say rank 0
    warn = _warn if main else (lambda msg: None)
    device_type = distributed.local_device(config.device).type
    if config.amp and device_type != "cuda":
        warn(f"warning: --amp has no effect on the {device_type} (autocast is used on CUDA GPUs only)")
    if config.encoder and not config.pretrained and not config.init and not config.resume:
        warn(f"warning: the {config.recipe} recipe starts from ImageNet {config.encoder} weights, but no --pretrained "
             f"file was given: the encoder starts random, and the paper's numbers are out of reach")
    try:
        torch.manual_seed(config.seed)
        model, criterion, train_set, val_set = build_run(config, warn=warn)
        if len(train_set) == 0:
            raise _CliError(f"no usable training images in {args.root}")
        trainer = Trainer(model, criterion, train_set, val_set, config)
        summary = trainer.run()
    except (AnnotationError, ImageError) as exc:  # only raised with --strict; otherwise skipped and counted
        print(f"crowdkernels train: error: {exc} (--strict)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        distributed.cleanup()
    if main:
        best = summary["best"]
        where = f"best val MAE {best['mae']:.3f} at epoch {best['epoch']} ({args.out / 'best.pt'})" if best.get("mae") is not None else "no validation yet"
        print(f"train: {summary['status']} after {summary['epoch']} epoch(s); {where}; {len(summary['skipped'])} file(s) skipped")
        _report_skipped(summary["skipped"])
    return 130 if summary["status"] == "interrupted" else EXIT_OK


# ----------------------------------------------------------------------------------------- eval
def _load_model(args):
    import torch

    from .engine.train import model_from_checkpoint

    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise _CliError(f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = None if getattr(args, "width", None) is None else {"width": args.width}
    model, ckpt = model_from_checkpoint(args.checkpoint, device, model=getattr(args, "model", None), model_kwargs=kwargs)
    return model, ckpt, device


@command("eval", "evaluate a checkpoint on a dataset split: MAE, MSE (RMSE), NAE, GAME(0-3), per density level")
def _eval_command(p: argparse.ArgumentParser):
    from .data.datasets import DATASET_NAMES
    from .engine.train import MODEL_NAMES

    p.description = (
        "Full-image inference (tiled with overlap beyond --tile pixels) over a split. The dataset may differ "
        "from the training one (cross-dataset evaluation). Results are binned by true count into JHU's "
        "levels low 0-50, medium 51-500, high 501+. 'mse' is an RMSE, named as in the papers."
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", type=Path, help="the dataset folder")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="default: val (the test split where there is no val)")
    p.add_argument("--fold", type=int, choices=range(1, 6), metavar="K", help="UCF_CC_50 fold 1-5")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    p.add_argument("--max-size", type=_max_size_arg, help="cap images (e.g. 1920x1080); default: none")
    p.add_argument("--tile", type=_positive_int, default=2048, help="tile images beyond this side; default: 2048")
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on GPU")
    p.add_argument("--workers", type=_nonnegative_int, default=2, help="default: 2")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file")
    p.add_argument("--out", type=Path, help="write the metrics (and per-image counts) as JSON here")
    return _run_eval


def _run_eval(args) -> int:
    import torch

    from .data.datasets import DENSITY_LEVELS
    from .data.targets import CrowdCollate
    from .engine.evaluate import evaluate
    from .engine.metrics import MSE_NOTE
    from .engine.train import TrainConfig, build_datasets

    model, ckpt, device = _load_model(args)
    trained = ckpt.get("config") or {}
    cfg = TrainConfig(dataset=args.dataset, root=None if args.root is None else str(args.root), fold=args.fold,
                      max_size=args.max_size, strict=args.strict, seed=int(trained.get("seed", 0)),
                      input_norm=model.input_norm,
                      synthetic=trained.get("synthetic") or TrainConfig().synthetic)
    if args.dataset != "synthetic" and args.root is None:
        raise _CliError(f"--root is required for --dataset {args.dataset}")
    _, data = build_datasets(cfg, split=args.split, warn=_warn)
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=args.workers, collate_fn=CrowdCollate(target=None))
    metrics, acc = evaluate(model, loader, device, tile=args.tile, amp=args.amp, levels=DENSITY_LEVELS, strict=args.strict, warn=_warn)
    result = {
        "checkpoint": str(args.checkpoint),
        "model": ckpt.get("model_name"),
        "trained_on": trained.get("dataset"),
        "evaluated_on": args.dataset,
        "split": args.split,
        **metrics,
        "note": MSE_NOTE,
        "per_image": acc.per_image,
    }
    cross = f" (trained on {result['trained_on']})" if result["trained_on"] not in (None, args.dataset) else ""
    if metrics["images"] == 0:
        raise _CliError("no image could be evaluated")
    print(f"eval {args.dataset}/{args.split}{cross}: {metrics['images']} images  MAE {metrics['mae']:.3f}  "
          f"MSE {metrics['mse']:.3f}  NAE {metrics['nae'] if metrics['nae'] is None else round(metrics['nae'], 4)}  "
          + "  ".join(f"GAME{lv} {metrics[f'game{lv}']:.3f}" for lv in range(4)))
    for name, m in metrics.get("levels", {}).items():
        if m["images"]:
            print(f"  {name:<6} {m['images']:5d} images  MAE {m['mae']:.3f}  MSE {m['mse']:.3f}")
    print(f"  ('MSE' is the root mean squared error, the papers' name); {metrics['skipped']} file(s) skipped")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _save_json(args.out, result)
    _report_skipped(getattr(data, "skipped", {}))
    return EXIT_OK


# ----------------------------------------------------------------------------------------- count
class _OverlayWriter:
    """An image with its predicted density laid over it and the count in the title, as PNG (Agg canvas,
    no pyplot state)."""

    def save(self, path: Path, image, density, title: str) -> None:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h, w = image.shape[:2]
        fig = Figure(figsize=(6.4, 0.4 + 6.4 * h / w), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))
        ax.imshow(image)
        d = np.asarray(density, dtype=np.float32)
        # the map covers the image (its last row/column may reach past a side that is not a multiple of s)
        s_y, s_x = h / d.shape[0], w / d.shape[1]
        s = max(1.0, round(min(s_y, s_x)))
        masked = np.ma.masked_less_equal(d, float(d.max()) * 0.05 if d.max() > 0 else 0.0)
        ax.imshow(masked, cmap="jet", alpha=0.5, extent=(-0.5, d.shape[1] * s - 0.5, d.shape[0] * s - 0.5, -0.5),
                  interpolation="bilinear")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
        _atomic_write(path, lambda f: fig.savefig(f, format="png", pil_kwargs={"compress_level": 1}))


@command("count", "count the people in images with a trained checkpoint (optionally PNG overlays)")
def _count_command(p: argparse.ArgumentParser):
    from .engine.train import MODEL_NAMES

    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--save-dir", type=Path, help="write <image stem>.png: the density over the image, with the count")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    p.add_argument("--max-size", type=_max_size_arg, help="shrink larger images first (e.g. 1920x1080)")
    p.add_argument("--tile", type=_positive_int, default=2048, help="tile images beyond this side; default: 2048")
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image")
    return _run_count


def _run_count(args) -> int:
    import torch

    from .data.datasets import load_image
    from .data.transforms import Resize, normalize_image
    from .engine.evaluate import predict_density

    model, _, device = _load_model(args)
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    resize = Resize(max_size=tuple(args.max_size) if isinstance(args.max_size, list) else args.max_size) if args.max_size else None
    overlay = _OverlayWriter()
    failed = {}
    for path in args.images:
        try:
            image = load_image(path)
            if resize is not None:
                image = resize({"image": image, "points": torch.zeros(0, 2)})["image"]
            density = predict_density(model, normalize_image(image, model.input_norm).to(device), tile=args.tile)
            count = float(density.sum(dtype=torch.float64))
        except (ValueError, OSError) as exc:
            if args.strict:
                raise _CliError(str(exc)) from None
            failed[str(path)] = str(exc)
            _warn(f"skipping {exc}")
            continue
        print(f"{path}\t{count:.2f}")
        if args.save_dir is not None:
            rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            overlay.save(args.save_dir / f"{path.stem}.png", rgb, density[0, 0].cpu().numpy(), f"{path.name}: {count:.1f} people")
    if failed:
        _report_skipped(failed)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------- demo
@command("demo", "train a small model on synthetic crowds, evaluate it against the mean-count baseline, draw it")
def _demo_command(p: argparse.ArgumentParser):
    from .engine.train import MODEL_NAMES

    p.description = (
        "Renders a synthetic crowd set (train and held-out), makes its density maps with the kernel, trains a "
        "reduced-width model on the CPU for a few minutes, and evaluates it on the held-out images against "
        "the mean-count baseline. Writes OUT/metrics.json, OUT/learning_curve.png, OUT/pictures/*.png "
        "(image | predicted | true density), OUT/density/*.npy, OUT/summary.json and the run in OUT/run/."
    )
    p.add_argument("--out", type=Path, default=Path("crowdkernels-demo"), help="default: ./crowdkernels-demo")
    p.add_argument("--num-images", type=_positive_int, help=f"training images; default: {DEMO['train']}")
    p.add_argument("--val-images", type=_positive_int, help=f"held-out images; default: {DEMO['val']}")
    p.add_argument("--size", type=_positive_int, help=f"image side in pixels (>= 16); default: {DEMO['size']}")
    p.add_argument("--epochs", type=_positive_int, help=f"default: {DEMO['epochs']}")
    p.add_argument("--minutes", type=_positive_float, default=DEMO["minutes"],
                   help=f"training time budget (stops after the epoch that passes it); default: {DEMO['minutes']}")
    p.add_argument("--model", choices=MODEL_NAMES, default=DEMO["model"], help=f"default: {DEMO['model']}")
    p.add_argument("--width", type=_positive_float, default=DEMO["width"], help=f"model width multiplier; default: {DEMO['width']}")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--fast", action="store_true", help="a seconds-long smoke run (few small images, one epoch)")

    def run(args) -> int:
        size = args.size or (FAST["size"] if args.fast else DEMO["size"])
        if size < 16:
            raise _CliError(f"--size must be >= 16, got {size}")
        if args.seed < 0:
            raise _CliError(f"--seed must be >= 0, got {args.seed}")
        base = FAST if args.fast else DEMO
        summary = run_demo(
            args.out, num_images=args.num_images or base["train"], val_images=args.val_images or base["val"],
            size=size, seed=args.seed, epochs=args.epochs or base["epochs"], minutes=args.minutes,
            model=args.model, width=args.width, lr=base["lr"], batch_size=base["batch_size"],
        )
        ok = summary["ok"] and (args.fast or summary["metrics"]["ok"])
        return EXIT_OK if ok else EXIT_FAILED

    return run


#: The demo's settings: a width-reduced model from scratch on the CPU; its held-out MAE must reach half
#: the mean-count baseline's within the time budget.
DEMO = {"train": 160, "val": 40, "size": 96, "epochs": 30, "minutes": 7.0, "model": "csrnet", "width": 0.125, "lr": 1e-3,
        "batch_size": 8}
FAST = {"train": 8, "val": 4, "size": 64, "epochs": 1, "lr": 3e-3, "batch_size": 4}


def _demo_targets(samples):
    """[B, 1, H, W] float32 maps of the samples in one batched call (adaptive sigma, style exact)."""
    from .data.targets import DensityTarget

    return DensityTarget()([s.points_tensor() for s in samples], samples[0].size)


class _PictureWriter:
    """The rendering beside its true density map (and, with ``predicted=True``, the model's map), titled
    with the head count and the map sums, as PNG.

    One figure is laid out once and only its data are swapped per image (laying out a figure costs
    more than drawing it). Uses the Agg canvas directly, not pyplot: no display needed, and
    matplotlib's global state is left alone."""

    def __init__(self, size, predicted: bool = False):
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h, w = size
        panels = 3 if predicted else 2
        # fixed axes (no layout engine, which would draw every figure twice): panels of the image's
        # aspect ratio side by side, a colour bar at the right
        self.fig = Figure(figsize=(3.2 * panels, 0.6 + 2.75 * h / w), dpi=100)
        FigureCanvasAgg(self.fig)
        top = 1.0 - 0.3 / self.fig.get_figheight()
        pw = 0.9 / panels
        axes = [self.fig.add_axes((0.02 + k * (pw + 0.005), 0.02, pw - 0.01, top - 0.02)) for k in range(panels)]
        cax = self.fig.add_axes((0.935, 0.1, 0.015, top - 0.2))
        self.image = axes[0].imshow(np.zeros((h, w, 3), dtype=np.uint8), interpolation="nearest")
        (self.marks,) = axes[0].plot([], [], "r+", markersize=3, markeredgewidth=0.6)
        self.maps = [ax.imshow(np.zeros((h, w)), cmap="jet", interpolation="nearest", vmin=0, vmax=1) for ax in axes[1:]]
        self.fig.colorbar(self.maps[0], cax=cax)
        cax.tick_params(labelsize=6)
        self.titles = [ax.set_title("", fontsize=9) for ax in axes]
        for ax in axes:
            ax.set_axis_off()

    def save(self, path: Path, sample, density, predicted=None) -> None:
        import numpy as np

        self.image.set_data(sample.image)
        # pixel (i, j) is drawn centred on (j, i); a point (x, y) lies in pixel (floor(y), floor(x))
        self.marks.set_data(sample.points[:, 0] - 0.5, sample.points[:, 1] - 0.5)
        self.titles[0].set_text(f"{sample.name}: {sample.count} heads")
        maps = [density] if predicted is None else [predicted, density]
        names = ["density map"] if predicted is None else ["predicted", "true"]
        h, w = sample.size
        # shown per image pixel (a map at 1/s resolution divided by s^2) and on one colour scale, so
        # the predicted and the true map compare by colour
        shown = [np.asarray(m, dtype=np.float64) * (m.size / (h * w)) for m in maps]
        vmax = max(max(float(m.max()) for m in shown), 1e-6)
        for artist, title, m, view, name in zip(self.maps, self.titles[1:], maps, shown, names):
            artist.set_data(view)
            artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
            artist.set_clim(0.0, vmax)
            title.set_text(f"{name}, sum {float(np.sum(m, dtype=np.float64)):.2f}")
        _atomic_write(path, lambda f: self.fig.savefig(f, format="png", pil_kwargs={"compress_level": 1}))


def _learning_curve(path: Path, history: list, baseline_mae: float) -> None:
    """Training loss and held-out MAE per epoch, with the mean-count baseline, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"].get("total", float("nan")) for h in history], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    val = [(h["epoch"], h["val"]["mae"]) for h in history if h.get("val") and h["val"].get("mae") is not None]
    if val:
        ax2.plot(*zip(*val), "s-", color="tab:red", label="held-out MAE")
    ax2.axhline(baseline_mae, color="gray", linestyle="--", label=f"mean-count baseline MAE {baseline_mae:.2f}")
    ax2.axhline(baseline_mae / 2, color="gray", linestyle=":", label="half the baseline (target)")
    ax2.set_ylabel("held-out MAE (heads)", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    ax.set_title("crowdkernels demo: learning curve")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))


def run_demo(out, *, num_images: int = 160, val_images: int = 40, size: int = 128, seed: int = 0, epochs: int = 40,
             minutes: float = 7.0, model: str = "csrnet", width: float = 0.125, lr: float = 1e-3, batch_size: int = 8,
             pictures: int = 8, stream=None) -> dict:
    """The demo, end to end:

    1. render ``num_images`` synthetic crowds to train on and ``val_images`` held out (another seed);
    2. make their density maps with the kernel (OUT/density/<name>.npy, float32; each sums to its
       head count, checked: ``ok``);
    3. train a ``width``-reduced ``model`` from scratch (flips, Adam at ``lr``) for ``epochs`` or until
       ``minutes`` are spent (OUT/run/: checkpoints and log.jsonl);
    4. evaluate the final model on the held-out images against the mean-count baseline (always the
       training set's mean count): OUT/metrics.json with mae, mse (an RMSE, the papers' name), nae,
       game0-3, baseline_mae, baseline_mse and ``ok`` (mae <= baseline_mae / 2);
    5. draw OUT/learning_curve.png and OUT/pictures/<name>.png (image | predicted | true density) for
       the first ``pictures`` held-out images.

    Returns the summary also written to OUT/summary.json (``metrics`` holds metrics.json).
    """
    import shutil

    import numpy as np
    import torch

    from .data.datasets import SyntheticCrowds
    from .data.targets import CrowdCollate
    from .data.transforms import IMAGENET_NORM, Compose, Normalize, RandomHorizontalFlip, normalize_image
    from .engine.evaluate import evaluate, predict_density
    from .engine.metrics import MSE_NOTE
    from .engine.train import TrainConfig, Trainer, build_model

    stream = sys.stdout if stream is None else stream
    out = Path(out)
    for sub in ("density", "pictures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own previous run: each demo trains afresh
    t0 = time.perf_counter()

    # 1-2. data and targets (the datasets cache their renderings, so training reuses these)
    train_set = SyntheticCrowds(num_images, size, seed, transform=Compose([RandomHorizontalFlip(), Normalize(IMAGENET_NORM)]))
    val_set = SyntheticCrowds(val_images, size, seed + 1000, transform=Normalize(IMAGENET_NORM))
    train_samples = [train_set.base[i] for i in range(len(train_set))]
    val_samples = [val_set.base[i] for i in range(len(val_set))]
    samples = train_samples + val_samples
    t1 = time.perf_counter()
    maps = _demo_targets(samples)[:, 0].numpy()
    t2 = time.perf_counter()
    rows = []
    for i, (sample, density) in enumerate(zip(samples, maps)):
        prefix = "" if i < len(train_samples) else "heldout_"  # the two sets number their images alike
        _save_npy(out / "density" / f"{prefix}{sample.name}.npy", density)
        rows.append({"name": prefix + sample.name, "heads": sample.count, "map_sum": float(np.sum(density, dtype=np.float64))})
    worst = max(abs(r["map_sum"] - r["heads"]) / max(1, r["heads"]) for r in rows)
    heads = sum(r["heads"] for r in rows)
    print(f"demo: {len(train_samples)} + {len(val_samples)} held-out synthetic images {size}x{size}, {heads} heads, "
          f"density maps in {t2 - t1:.2f} s (worst relative sum error {worst:.1e})", file=stream)

    # 3. training
    torch.manual_seed(seed)
    config = TrainConfig(
        out=str(out / "run"), model=model, model_kwargs={"width": width}, dataset="synthetic", epochs=epochs,
        batch_size=batch_size, lr=lr, lr_step=None, crop=None, flip=True, val_every=1, workers=0, seed=seed, tile=None,
        max_seconds=minutes * 60.0, synthetic={"train": num_images, "val": val_images, "size": size},
    )
    net = build_model(model, width=width)
    # REL off: its hinge on predicted window counts is exactly zero for a flat map, and from scratch it
    # outweighs the per-pixel density loss and pulls a small untrained model to one (it predicts the mean
    # count; measured). On top of a pretrained backbone, as in the papers, it refines an informative map.
    criterion = net.criterion(rel=False) if model in ("csrnet", "hmode", "hmode-official") else net.criterion()
    trainer = Trainer(net, criterion, train_set, val_set, config, log=lambda msg: print(msg, file=stream))
    summary_run = trainer.run()
    t3 = time.perf_counter()

    # 4. held-out evaluation of the final model, against the mean-count baseline
    device = trainer.device
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, collate_fn=CrowdCollate(target=None))
    metrics, acc = evaluate(net, loader, device, tile=None)
    mean_count = float(np.mean([s.count for s in train_samples]))
    truth = np.array([s.count for s in val_samples], dtype=np.float64)
    result = {
        "mae": metrics["mae"],
        "mse": metrics["mse"],
        "nae": metrics["nae"],
        **{f"game{lv}": metrics[f"game{lv}"] for lv in range(4)},
        "baseline_mae": float(np.mean(np.abs(truth - mean_count))),
        "baseline_mse": float(np.sqrt(np.mean((truth - mean_count) ** 2))),
        "baseline_count": mean_count,
        "held_out_images": len(val_samples),
        "train_images": len(train_samples),
        "epochs": summary_run["epoch"],
        "stopped_by": summary_run["status"],
        "model": model,
        "width": width,
        "seconds_training": t3 - t2,
        "note": MSE_NOTE,
        "per_image": acc.per_image,
    }
    result["ok"] = result["mae"] <= result["baseline_mae"] / 2

    # 5. pictures and learning curve
    net.eval()
    writer = _PictureWriter(val_samples[0].size, predicted=True)
    truth_maps = maps[len(train_samples):]
    for sample, density in list(zip(val_samples, truth_maps))[:pictures]:
        image = normalize_image(sample.image_tensor(), net.input_norm)
        pred = predict_density(net, image.to(device), tile=None)[0, 0].float().cpu().numpy()
        writer.save(out / "pictures" / f"heldout_{sample.name}.png", sample, density, predicted=pred)
    _learning_curve(out / "learning_curve.png", summary_run["history"], result["baseline_mae"])
    _save_json(out / "metrics.json", result)

    summary = {
        "images": len(rows),
        "size": [size, size],
        "seed": seed,
        "heads": heads,
        "map_sum": float(sum(r["map_sum"] for r in rows)),
        "max_relative_error": worst,
        "ok": worst <= 1e-4,
        "seconds": {"render": t1 - t0, "density": t2 - t1, "training": t3 - t2, "total": time.perf_counter() - t0},
        "per_image": rows,
        "metrics": {k: v for k, v in result.items() if k != "per_image"},
    }
    _save_json(out / "summary.json", summary)
    verdict = "met" if result["ok"] else "NOT met"
    print(
        f"demo: held-out MAE {result['mae']:.2f}, MSE {result['mse']:.2f} vs mean-count baseline MAE "
        f"{result['baseline_mae']:.2f} (target mae <= baseline/2: {verdict}); {summary_run['epoch']} epochs of "
        f"{model} (width {width}) in {t3 - t2:.0f} s; total {summary['seconds']['total']:.0f} s; outputs in {out}",
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
    from .engine.checkpoint import CheckpointError
    from .engine.train import TrainError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2) end here, without leaving the process
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return args._handler(args)
    except (_CliError, LayoutError, CheckpointError, TrainError) as exc:
        print(f"crowdkernels {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"crowdkernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
