"""The `crowdkernels` command line: ``info``, ``density``, ``train``, ``eval``, ``count``, ``demo``.

This module only parses arguments and calls the library, where the jobs live:
:func:`crowdkernels.data.density_job.run_density_job` (density), :class:`crowdkernels.engine.Trainer`
(train), :func:`crowdkernels.load` and :class:`crowdkernels.Counter` (eval, count),
:func:`crowdkernels.engine.demo.run_demo` (demo), :mod:`crowdkernels.viz` (pictures).

Each subcommand is one function registered with :func:`command`: it adds its arguments to an argparse
sub-parser and returns a handler ``(args) -> exit code``. ``main(argv)`` runs in-process and returns the
exit code (0 success, 1 some files failed, 2 bad usage, a wrong dataset layout or an unusable output
path), so tests and other programs can call it without a subprocess. Results go to stdout; progress,
warnings and errors to stderr (``--json`` output is the only thing on stdout).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {}


def command(name: str, help: str):
    """Registers a subcommand: the decorated function receives its sub-parser, adds the arguments, and
    returns the handler. New commands are one more decorated function."""

    def register(fn):
        _COMMANDS[name] = (help, fn)
        return fn

    return register


class _CliError(Exception):
    """An error reported as one line on stderr with exit code 2 (bad usage, wrong layout, ...)."""


# ----------------------------------------------------------------------------------------- argument types
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


def _float_where(ok, what: str):
    """An argparse type: a finite float for which ``ok(value)`` holds, with an error that says so (`what`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_float = _float_where(lambda v: v > 0, "a positive number")
_nonnegative_float = _float_where(lambda v: v >= 0, "a number >= 0")
_fraction = _float_where(lambda v: 0 < v < 1, "a fraction in (0, 1)")


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


#: what `--max-size none` and `--tile none` give: no cap, no tiles (overriding the checkpoint's own setting)
_NONE = "none"


def _max_size_or_none(text: str):
    """eval/count --max-size: a side, a box, or 'none' (no cap, whatever the checkpoint's training used)."""
    if text.strip().lower() == _NONE:
        return _NONE
    try:
        return _max_size_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels (2048), a box (1920x1080) or 'none', got {text!r}") from None


def _min_tile() -> int:
    from .inference import min_tile

    return min_tile()


def _tile_arg(text: str):
    """eval/count --tile: a side of at least min_tile() pixels, or 'none' (never tile)."""
    if text.strip().lower() == _NONE:
        return _NONE
    return _int_at_least(_min_tile(), f"a tile side of at least {_min_tile()} pixels (2 x the 64-pixel overlap + 16) "
                                      "or 'none'")(text)


def _input_setting_help(what: str) -> str:
    return f"{what}; default: the checkpoint's own (its training's setting), 'none' turns it off"


# ----------------------------------------------------------------------------------------- messages
def _warn(msg: str) -> None:
    print(f"crowdkernels: {msg}", file=sys.stderr)


def _report_skipped(skipped: dict) -> None:
    """Names every skipped file once: the readers' reasons already start with the file's path."""
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for name, reason in skipped.items():
            print(f"  {reason}" if str(name) in str(reason) else f"  {name}: {reason}", file=sys.stderr)


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
@command("density", "write the density maps of a dataset split (.npy per image + manifest.json)")
def _density_command(p: argparse.ArgumentParser):
    from .data.datasets import FORMATS

    p.description = (
        "Reads every image's head annotations in a dataset split, makes its density map with "
        "crowdkernels.density_map, and writes OUT/<image stem>.npy (float32 [ceil(H/s), ceil(W/s)]) and "
        "OUT/manifest.json. Files are written atomically; a rerun reuses a finished map only when its "
        "annotation file (SHA-256), image size and settings are the recorded ones. Layouts: "
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
    from ._io import output_dir
    from .data.density_job import DensitySettings, run_density_job

    output_dir(args.out, "--out")
    settings = DensitySettings(args.style, args.sigma, args.k, args.beta, args.truncate, args.kernel_size, args.stride)
    manifest = run_density_job(args.root, args.format, args.out, settings, device=args.device,
                               overwrite=args.overwrite, strict=args.strict)
    s, failures = manifest["summary"], manifest["failures"]
    outside = ""
    if s["points_outside"]:
        what = "clipped to the border (style matlab)" if settings.style == "matlab" else "dropped"
        outside = f"; {s['points_outside']} point(s) outside their images {what}"
    print(
        f"density: {s['done']}/{s['images']} images in {args.out} ({s['written']} written, {s['reused']} reused), "
        f"{s['heads']} heads, map sum {s['map_sum']:.2f}{outside}; {len(failures)} failed"
    )
    if failures:
        if args.strict:
            print("stopped at the first failure (--strict)", file=sys.stderr)
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for name, msg in failures.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------- train
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
        "validation MAE), OUT/log.jsonl. Ctrl-C saves and exits; --resume continues exactly; --time-limit and "
        "--max-steps stop a run within one step, saved and validated. Runs under "
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
    p.add_argument("--time-limit", type=_duration, default=S, metavar="TIME",
                   help="stop after this much wall-clock time of this process (900, 90s, 15m, 1.5h), within one "
                        "step: saves a resumable last.pt and validates the model it has")
    p.add_argument("--max-steps", type=_positive_int, default=S,
                   help="stop after this many optimizer steps in all (the same work on any machine); as --time-limit")
    p.add_argument("--workers", type=_nonnegative_int, default=S, help="DataLoader workers; default: 2")
    p.add_argument("--seed", type=_nonnegative_int, default=S)
    p.add_argument("--device", default=S, help="e.g. cuda, cuda:1, cpu; default: cuda:LOCAL_RANK when a GPU is visible")
    p.add_argument("--amp", action="store_true", default=S, help="bfloat16/float16 autocast (GPU only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings (an error "
                   "when --out holds no run: no last.pt)")
    p.add_argument("--strict", action="store_true", default=S, help="fail on the first bad file instead of skipping it")
    p.add_argument("--synthetic", type=_positive_int, nargs=3, metavar=("TRAIN", "VAL", "SIZE"), default=S,
                   help="synthetic set: images to train on, held out, side; default: 200 40 128")
    return _run_train


def _float_list(text: str) -> list:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _duration(text: str) -> float:
    """Seconds from "900", "90s", "15m" or "1.5h"."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 900, 90s, 15m or 1.5h, got {text!r}")
    return value


#: train options -> the TrainConfig setting they override
_TRAIN_OVERRIDES = {
    "model": "model", "pretrained": "pretrained", "init": "init", "epochs": "epochs", "batch_size": "batch_size",
    "optimizer": "optimizer", "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
    "lr_step": "lr_step", "crop": "crop", "flip": "flip", "max_size": "max_size", "target_style": "target.style",
    "sigma": "target.sigma", "kernel_size": "target.kernel_size", "target_scale": "target.scale",
    "loss_weights": "criterion_kwargs.weights", "rel": "criterion_kwargs.rel", "fold": "fold",
    "width": "model_kwargs.width", "val_start": "val_start", "val_every": "val_every",
    "val_from_train": "val_from_train", "time_limit": "max_seconds", "max_steps": "max_steps", "workers": "workers", "seed": "seed", "device": "device", "amp": "amp",
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


#: TrainConfig settings -> the train option that sets them (for errors about a setting)
_OPTION_OF = {key: "--" + opt.replace("_", "-") for opt, key in _TRAIN_OVERRIDES.items()}


def _train_config(args):
    from .engine.train import build_config, resume_config

    overrides = _train_overrides(args)
    if args.resume:
        if args.out is None:
            raise _CliError("--resume needs --out, the folder of the run to continue")
        if not (args.out / "last.pt").is_file():
            raise _CliError(f"--resume: there is no run to continue in {args.out} (no last.pt there); check --out, or "
                            "leave out --resume to start a new run")
    try:
        if args.resume:
            return resume_config(args.out, overrides)
        config = build_config(recipe=args.recipe, dataset=args.dataset, overrides=overrides)
    except ValueError as exc:  # an unknown or malformed setting, or a resume that would change the run
        option = _OPTION_OF.get(getattr(exc, "setting", None))
        raise _CliError(f"{option} ({exc.setting}): {exc}" if option else str(exc)) from None
    config.root = None if args.root is None else str(args.root)
    config.out = str(args.out) if args.out is not None else config.out
    config.resume = bool(args.resume)
    return config


def _run_train(args) -> int:
    import torch

    from ._io import output_dir
    from .data.datasets import AnnotationError, ImageError
    from .engine import distributed
    from .engine.train import Trainer, build_run

    if args.out is not None:
        output_dir(args.out, "--out")  # an existing file: one line and exit 2, before anything starts
    config = _train_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return EXIT_OK
    if args.out is None:
        raise _CliError("--out is required (the run folder)")
    if config.dataset != "synthetic" and config.root is None:
        raise _CliError(f"--root is required for --dataset {config.dataset}")
    _check_device(config.device)
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
def _check_device(device) -> None:
    """A usable ``--device`` (None: the default), or a _CliError naming the option."""
    from ._io import parse_device

    if device is not None:
        try:
            parse_device(device, "--device")
        except ValueError as exc:
            raise _CliError(str(exc)) from None


def _load_counter(args):
    """The Counter of ``--checkpoint`` on ``--device`` (``--model`` refuses another model's checkpoint), with the
    checkpoint's own input settings where ``--max-size`` and ``--tile`` are not given ('none': off)."""
    from . import inference

    _check_device(args.device)

    def setting(value):
        return inference.CHECKPOINT if value is None else (None if value == _NONE else value)

    try:
        return inference.load(args.checkpoint, args.device, model=args.model, tile=setting(args.tile), amp=args.amp,
                              max_size=setting(args.max_size))
    except ValueError as exc:  # e.g. a tile too small for the model (CheckpointError is reported by main)
        from .engine.checkpoint import CheckpointError

        if isinstance(exc, CheckpointError):
            raise
        raise _CliError(str(exc)) from None


def _same_dataset(trained: dict, args) -> bool:
    """Whether eval runs on the dataset (and root) the checkpoint was trained on."""
    if trained.get("dataset") != args.dataset:
        return False
    if args.dataset == "synthetic":
        return True
    if not trained.get("root") or args.root is None:
        return False
    return Path(trained["root"]).expanduser().resolve() == args.root.expanduser().resolve()


@command("eval", "evaluate a checkpoint on a dataset split: MAE, MSE (RMSE), NAE, GAME(0-3), per density level")
def _eval_command(p: argparse.ArgumentParser):
    from .data.datasets import DATASET_NAMES
    from .engine.train import MODEL_NAMES

    p.description = (
        "Full-image inference (tiled with overlap beyond --tile pixels) over a split. Images are fed as the "
        "checkpoint's training validated them (its max size, tiling, normalization, density scale; --max-size and "
        "--tile override), so on the training's own data it reproduces the validation MAE of its log.jsonl; the "
        "settings used are printed on stderr (and saved with --out). The dataset may differ "
        "from the training one (cross-dataset evaluation). Results are binned by true count into JHU's "
        "levels low 0-50, medium 51-500, high 501+. 'mse' is an RMSE, named as in the papers."
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", type=Path, help="the dataset folder")
    p.add_argument("--split", choices=("val", "test", "train"),
                   help="default: the images the checkpoint's training validated on (on its own dataset: those "
                        "--val-from-train held out; else the val split, the test split where there is no val, every "
                        "10th training image where there is neither). A val or test split the dataset does not have "
                        "is an error naming the folders found")
    p.add_argument("--fold", type=int, choices=range(1, 6), metavar="K", help="UCF_CC_50 fold 1-5; default: the training's")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    p.add_argument("--max-size", type=_max_size_or_none, metavar="SIZE",
                   help=_input_setting_help("shrink larger images first: a side (2048) or a box (1920x1080)"))
    p.add_argument("--tile", type=_tile_arg, metavar="PIXELS",
                   help=_input_setting_help(f"run images beyond this side in overlapping tiles (at least "
                                            f"{_min_tile()}: 2 x the 64-pixel overlap + 16)"))
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on a GPU (no effect on the CPU: a warning says so)")
    p.add_argument("--workers", type=_nonnegative_int, default=2, help="default: 2")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file")
    p.add_argument("--out", type=Path, help="write the metrics, the input settings used and the per-image counts as "
                                            "JSON here")
    p.add_argument("--save-dir", type=Path,
                   help="write DIR/predictions.csv (image, true count, predicted count, error), DIR/metrics.json, "
                        "DIR/scatter.png (predicted against true counts) and DIR/pictures/<image>.png")
    p.add_argument("--pictures", type=_nonnegative_int, help="with --save-dir: draw at most this many pictures; default: all")
    return _run_eval


def _run_eval(args) -> int:
    from ._io import output_dir, output_file, save_json
    from .data.datasets import DENSITY_LEVELS
    from .engine.evaluate import EvaluationWriter, evaluation_dataset
    from .engine.metrics import MSE_NOTE
    from .engine.train import TrainConfig

    out = None if args.out is None else output_file(args.out, "--out")
    save_dir = None if args.save_dir is None else output_dir(args.save_dir, "--save-dir")
    if args.dataset != "synthetic" and args.root is None:
        raise _CliError(f"--root is required for --dataset {args.dataset}")
    counter = _load_counter(args)
    trained = counter.info.get("config") or {}
    same = _same_dataset(trained, args)
    # on the training's own data, the default split is the training's validation set (its fold, its held-out images)
    fold = args.fold if args.fold is not None else (trained.get("fold") if same else None)
    held_out = trained.get("val_from_train") if same and args.split is None else None
    cfg = TrainConfig(dataset=args.dataset, root=None if args.root is None else str(args.root), fold=fold,
                      max_size=list(counter.max_size) if isinstance(counter.max_size, tuple) else counter.max_size,
                      strict=args.strict, seed=int(trained.get("seed", 0)), val_from_train=held_out,
                      synthetic=trained.get("synthetic") or TrainConfig().synthetic)
    split = args.split or "val"
    data, note = evaluation_dataset(cfg, args.split, warn=_warn, must_exist=args.split is not None)
    _warn(f"{split}: {len(data)} images ({note})")
    _warn(f"input settings: {counter.describe_settings()}")
    writer = None
    if save_dir is not None:
        paths = {s.name: str(s.image) for s in getattr(data, "samples", [])}
        writer = EvaluationWriter(save_dir, pictures=args.pictures, paths=paths)
    metrics, acc = counter.evaluate(data, levels=DENSITY_LEVELS, strict=args.strict, warn=_warn,
                                    workers=args.workers, on_image=writer)
    result = {
        "checkpoint": str(args.checkpoint),
        "model": counter.info.get("model"),
        "trained_on": trained.get("dataset"),
        "evaluated_on": args.dataset,
        "split": split,
        "settings": counter.settings(),
        **metrics,
        "note": MSE_NOTE,
        "per_image": acc.per_image,
    }
    cross = f" (trained on {result['trained_on']})" if result["trained_on"] not in (None, args.dataset) else ""
    if metrics["images"] == 0:
        raise _CliError("no image could be evaluated")
    print(f"eval {args.dataset}/{split}{cross}: {metrics['images']} images  MAE {metrics['mae']:.3f}  "
          f"MSE {metrics['mse']:.3f}  NAE {metrics['nae'] if metrics['nae'] is None else round(metrics['nae'], 4)}  "
          + "  ".join(f"GAME{lv} {metrics[f'game{lv}']:.3f}" for lv in range(4)))
    for name, m in metrics.get("levels", {}).items():
        if m["images"]:
            print(f"  {name:<6} {m['images']:5d} images  MAE {m['mae']:.3f}  MSE {m['mse']:.3f}")
    print(f"  ('MSE' is the root mean squared error, the papers' name); {metrics['skipped']} file(s) skipped")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_json(out, result)
    if writer is not None:
        writer.finish(metrics, result, title=f"{result['model']} ({args.checkpoint.name}) on {args.dataset}/{split}")
        print(f"  predictions.csv, scatter.png, metrics.json and {writer.drawn} picture(s) in {save_dir}")
    _report_skipped(getattr(data, "skipped", {}))
    return EXIT_OK


# ----------------------------------------------------------------------------------------- count
@command("count", "count the people in images, folders or glob patterns with a trained checkpoint")
def _count_command(p: argparse.ArgumentParser):
    from .engine.train import MODEL_NAMES

    p.description = (
        "Prints one line per image (path TAB count), or with --json one JSON list [{\"image\": PATH, \"count\": "
        "FLOAT}, ...] and nothing else on stdout. IMAGE may be a file, a folder (its images, sorted; video files "
        "in it are left out with a warning) or a glob pattern ('shots/*.jpg'); URLs are not read (download the "
        "image first). Images are fed as the checkpoint's training validated them (its max size, tiling, "
        "normalization, density scale; --max-size and --tile override); the settings used are printed on stderr. "
        "Images that fail are named on stderr and left out; the exit code is then 1."
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--json", action="store_true", help="print one JSON list on stdout (progress and logs on stderr)")
    p.add_argument("--save-dir", type=Path,
                   help="write DIR/<image stem>.png: the image beside its density map, the count in the title (and "
                        "the true count and map when a point file <image stem>.txt/.csv/.json lies beside it). Images "
                        "that share a stem (a/crowd.jpg, b/crowd.jpg) are named after their paths below the folder they "
                        "have in common, '/' written '__' (a__crowd.png, b__crowd.png; crowd.jpg.png and crowd.png.png "
                        "for two files of one folder), so that no picture overwrites another")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    p.add_argument("--points", action="store_true",
                   help="locate the heads (as many as the rounded count; see Counter.points): stdout becomes a CSV "
                        "'image,x,y,score' (pixels; score: people near the point), with --json each image gets "
                        "\"points\": [[x, y, score], ...]; --save-dir pictures mark them")
    p.add_argument("--max-size", type=_max_size_or_none, metavar="SIZE",
                   help=_input_setting_help("shrink larger images first: a side (2048) or a box (1920x1080)"))
    p.add_argument("--tile", type=_tile_arg, metavar="PIXELS",
                   help=_input_setting_help(f"run images beyond this side in overlapping tiles (at least "
                                            f"{_min_tile()}: 2 x the 64-pixel overlap + 16)"))
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images of one size run together; default: 1")
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on a GPU (no effect on the CPU: a warning says so)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image")
    return _run_count


def _picture_names(paths) -> dict:
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


def _count_picture(save_dir: Path, pred, name: str, heads=None) -> None:
    """The picture of one counted image; with the true map when a point file lies beside the image."""
    from .data.datasets import AnnotationError, image_points, point_file_beside, read_point_file
    from .viz import save_prediction

    points, ann = None, point_file_beside(pred.source)
    if ann is not None:
        try:
            points = image_points(read_point_file(ann), pred.source)  # turned with a photo's EXIF orientation
        except AnnotationError as exc:
            _warn(f"warning: no true map for {Path(pred.source).name}: {exc}")
    save_prediction(save_dir / name, pred, points=points, heads=heads)


def _print_heads(source: str, heads, header: bool) -> None:
    """CSV rows 'image,x,y,score' of one image's located heads on stdout (the header before the first)."""
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    if header:
        writer.writerow(["image", "x", "y", "score"])
    writer.writerows([source, f"{x:.2f}", f"{y:.2f}", f"{c:.4f}"] for x, y, c in heads.tolist())
    sys.stdout.flush()


def _run_count(args) -> int:
    from ._io import output_dir
    from .data.datasets import ImageError
    from .inference import image_paths

    save_dir = None if args.save_dir is None else output_dir(args.save_dir, "--save-dir")
    try:
        paths = image_paths(args.images)
    except ValueError as exc:
        raise _CliError(str(exc)) from None
    counter = _load_counter(args)
    _warn(f"input settings: {counter.describe_settings()}")
    pictures = {}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        pictures = _picture_names(paths)
    results, failed = [], {}
    try:
        for pred in counter.predictions(paths, args.batch_size, errors="raise" if args.strict else "skip"):
            if pred.error is not None:
                failed[pred.source] = pred.error
                _warn(f"skipping {pred.error}")
                continue
            results.append({"image": pred.source, "count": pred.count})
            heads = pred.points() if args.points else None
            if heads is not None and args.json:
                results[-1]["points"] = [[round(x, 2), round(y, 2), round(c, 4)] for x, y, c in heads.tolist()]
            elif heads is not None:
                _print_heads(pred.source, heads, header=len(results) == 1)
            elif not args.json:
                print(f"{pred.source}\t{pred.count:.2f}", flush=True)
            if save_dir is not None:
                _count_picture(save_dir, pred, pictures[pred.source], heads)
    except ImageError as exc:  # --strict
        raise _CliError(f"{exc} (--strict)") from None
    if args.json:
        print(json.dumps(results))
    if failed:
        _report_skipped(failed)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------- demo
@command("demo", "train a small model on synthetic crowds, evaluate it against the mean-count baseline, draw it")
def _demo_command(p: argparse.ArgumentParser):
    from .engine.demo import DEMO
    from .engine.train import MODEL_NAMES

    p.description = (
        "Renders a synthetic crowd set (train and held-out), makes its density maps with the kernel, trains a "
        "reduced-width model on the CPU (under a minute), and evaluates it on the held-out images against "
        "the mean-count baseline. Writes OUT/metrics.json, OUT/learning_curve.png, OUT/pictures/*.png "
        "(image | predicted | true density), OUT/density/*.npy, OUT/data/{train,val}/ (the images and their "
        "points, a 'folder' dataset), OUT/summary.json and the run in OUT/run/ (last.pt, best.pt)."
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
        from ._io import output_dir
        from .engine.demo import DEMO, FAST, run_demo

        output_dir(args.out, "--out")
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


# ----------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    import torch

    from . import __version__

    parser = argparse.ArgumentParser(
        prog="crowdkernels", description="Fast density maps and crowd-counting tools (L2SM, HMoDE + REL)."
    )
    parser.add_argument("--version", action="version", version=f"crowdkernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_handler=add(p))
    return parser


def _show_warning(command_name: str):
    """Python warnings raised by crowdkernels during a command, as one line each on stderr (not the
    file:line: Category: form); warnings of other packages keep their usual form."""
    import os

    package = os.path.dirname(os.path.abspath(__file__))
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package + os.sep) or filename.startswith("<"):
            print(f"crowdkernels {command_name}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (argparse's usage errors included, as 2)."""
    from ._io import OutputPathError
    from .data.datasets import AnnotationError, ImageError, LayoutError
    from .data.density_job import DensityJobError
    from .engine.checkpoint import CheckpointError
    from .engine.train import TrainError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2) end here, without leaving the process
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning(args.command)
        try:
            return args._handler(args)
        except (_CliError, LayoutError, CheckpointError, TrainError, OutputPathError, DensityJobError) as exc:
            print(f"crowdkernels {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (AnnotationError, ImageError) as exc:  # --strict: the first bad file stops the command
            print(f"crowdkernels {args.command}: error: {exc} (--strict)", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print(f"crowdkernels {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `crowdkernels count ... | head`: the reader has gone, which is no error of ours
            _silence_stdout()
            return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's final flush does not fail on the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
