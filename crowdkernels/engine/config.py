"""The settings of a training run: :class:`TrainConfig`, made by :func:`build_config` (a recipe, or the quick
defaults, then explicit overrides), checked by :func:`check_model_options`, continued by :func:`resume_config`.

Each setting that ``crowdkernels train`` exposes declares its option beside its field
(``field(metadata=cli(Option(...)))``: the flag, help, type, choices, metavar, and the dotted setting it
sets); :func:`cli_options` lists them, and the command generates its arguments and its overrides from that
list, so that a new option is one declaration. The argument types (text -> value, raising
``argparse.ArgumentTypeError``) are here because the declarations name them.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from . import recipes
from .._options import (Option, duration, float_list, fraction, max_size_arg, nonnegative_float, nonnegative_int,
                        positive_float, positive_int, sigma_arg)
from .checkpoint import load_checkpoint
from ..data import DATASET_NAMES, DATASETS
from ..models import MODEL_NAMES
from ..models.registry import build_model
from ..data.transforms import IMAGENET_NORM, check_norm

__all__ = [
    "DEFAULT_TARGET",
    "EVAL_OPTIONS",
    "MODEL_DEFAULTS",
    "QUICK_SMALL_CROP",
    "RESUME_MAY_CHANGE",
    "TrainConfig",
    "TrainError",
    "build_config",
    "check_model_options",
    "cli_options",
    "evaluation_config",
    "quick_settings",
    "require_root",
    "resume_config",
    "run_config",
    "setting_arg",
    "start_warnings",
]

#: The ground truth when no recipe says otherwise: geometry-adaptive "exact" maps that sum to the count.
DEFAULT_TARGET = {"style": "exact", "sigma": "adaptive", "k": 3, "beta": 0.3, "truncate": 4.0, "kernel_size": 15,
                  "scale": 1.0}

#: The crop of the quick defaults (:data:`crowdkernels.engine.recipes.QUICK`, ``train --model NAME`` without a
#: recipe) on a dataset of small images (its :class:`~crowdkernels.data.specs.DatasetSpec` says ``small_crop``:
#: ShanghaiTech A), for the models that crop.
QUICK_SMALL_CROP = 128


class TrainError(ValueError):
    """A run that cannot start or go on (an existing run in --out without --resume, a NaN loss, ...)."""


def _zero_is_none(value: int):
    return None if value == 0 else value  # --crop 0: whole images; --lr-step 0: never


def _user_path(value: str) -> str:
    return str(Path(value).expanduser())


def _synthetic_set(value: list) -> dict:
    return {"train": value[0], "val": value[1], "size": value[2]}


def _model_names():
    return MODEL_NAMES


def cli(*opts: Option, override: bool = True) -> dict:
    """A field's metadata: the options that set it, overrides of the recipe's setting unless ``override=False``."""
    return {"options": tuple(replace(o, override=override) for o in opts)}


def cli_options() -> list[Option]:
    """Every option of the settings, with its ``key``, in ``--help`` order."""
    found = [replace(o, key=o.key or f.name) for f in fields(TrainConfig) for o in f.metadata.get("options", ())]
    return sorted(found, key=lambda o: o.order)


# ----------------------------------------------------------------------------------------- settings
@dataclass
class TrainConfig:
    """Settings of a run (all JSON-serializable; saved in every checkpoint). See :func:`build_config`."""

    out: str = field(default="runs/train", metadata=cli(
        Option("--out", 60, type=Path,
               help="run folder (checkpoints, log); required unless --print-config"), override=False))
    recipe: str | None = field(default=None, metadata=cli(  # the recipe the settings came from
        Option("--recipe", 10, choices=recipes.RECIPE_NAMES,
               help="a named training configuration (see the README's table)"), override=False))
    model: str = field(default="hmode", metadata=cli(
        Option("--model", 30, choices=_model_names, help="default: the recipe's, else hmode")))
    model_kwargs: dict = field(default_factory=dict, metadata=cli(
        Option("--width", 270, key="model_kwargs.width", type=positive_float,
               help="channel width multiplier of the model; default: 1")))
    criterion_kwargs: dict = field(default_factory=dict, metadata=cli(
        Option("--loss-weights", 230, key="criterion_kwargs.weights", type=float_list,
               help="HMoDE: one weight per density output, e.g. 1,1,1,2,2,2,4"),
        Option("--rel", 240, key="criterion_kwargs.rel", action=argparse.BooleanOptionalAction,
               help="add (or, with --no-rel, drop) the relative local counting loss (HMoDE eq. 2)")))
    encoder: str | None = None  # the ImageNet encoder the recipe starts from ("vgg16", "vgg16_bn")
    pretrained: str | None = field(default=None, metadata=cli(  # a local torchvision vgg16 / vgg16_bn file
        Option("--pretrained", 70, convert=_user_path, help="a local torchvision vgg16 / vgg16_bn weights file for "
               "the encoder (nothing is ever downloaded; see the README)")))
    init: str | None = field(default=None, metadata=cli(  # a crowdkernels checkpoint or a released HMoDE file
        Option("--init", 80, convert=_user_path, help="start from these weights: a crowdkernels checkpoint or the "
               "authors' released HMoDE file (a fresh run: optimizer and epochs start anew)")))
    # the layers outside the ImageNet encoder: "normal" N(0, 0.01), "he" (Kaiming), or "auto": N(0, 0.01) over
    # a --pretrained encoder, He over a random one (the models' `init` argument)
    weight_init: str = "auto"
    dataset: str = field(default="synthetic", metadata=cli(
        Option("--dataset", 40, choices=DATASET_NAMES, default="synthetic",
               help="default: synthetic"), override=False))
    root: str | None = field(default=None, metadata=cli(
        Option("--root", 50, type=Path,
               help="the dataset folder (e.g. ShanghaiTech/ holding part_A/train_data)"), override=False))
    fold: int | None = field(default=None, metadata=cli(
        Option("--fold", 260, type=int, choices=range(1, 6), metavar="K", help="UCF_CC_50 fold 1-5; default: 1")))
    epochs: int = field(default=200, metadata=cli(Option("--epochs", 90, type=positive_int)))
    batch_size: int = field(default=8, metadata=cli(
        Option("--batch-size", 100, type=positive_int, help="images per step and process")))
    optimizer: str = field(default="adam", metadata=cli(  # "adam" or "sgd"
        Option("--optimizer", 110, choices=("adam", "sgd"))))
    lr: float = field(default=2e-5, metadata=cli(Option("--lr", 120, type=positive_float)))
    momentum: float = field(default=0.0, metadata=cli(  # SGD only
        Option("--momentum", 130, type=nonnegative_float, help="SGD momentum")))
    # the lr is multiplied by lr_gamma after this many epochs (None: constant)
    lr_step: int | None = field(default=100, metadata=cli(
        Option("--lr-step", 150, type=nonnegative_int, convert=_zero_is_none,
               help="halve the lr after this many epochs (0: never)")))
    lr_gamma: float = 0.5
    weight_decay: float = field(default=0.0, metadata=cli(
        Option("--weight-decay", 140, type=nonnegative_float)))
    # the ground truth: crowdkernels.density_maps settings, made after the crop and flip; maps are
    # multiplied by "scale" in the loss and the model predicts in those units (model.density_scale)
    target: dict = field(default_factory=lambda: dict(DEFAULT_TARGET), metadata=cli(
        Option("--target-style", 190, key="target.style", choices=("exact", "csrnet", "matlab"),
               help="ground-truth density style (see the README's density styles)"),
        Option("--sigma", 200, key="target.sigma", type=sigma_arg, help="ground-truth sigma: 'adaptive' or pixels"),
        Option("--kernel-size", 210, key="target.kernel_size", type=positive_int,
               help="window of style matlab (odd)"),
        Option("--target-scale", 220, key="target.scale", type=positive_float,
               help="multiply the ground-truth maps by this (the released HMoDE code: 100); counts are divided back")))
    crop: int | None = field(default=256, metadata=cli(
        Option("--crop", 160, type=nonnegative_int, convert=_zero_is_none, help="random crop side (0: whole images)")))
    max_size: object = field(default=None, metadata=cli(  # int or [a, b] box (e.g. [1920, 1080] for UCF-QNRF)
        Option("--max-size", 180, type=max_size_arg, help="cap images: a longest side or a box (1920x1080)")))
    multiple: int = 16  # the batch is zero-padded to a multiple of this
    flip: bool = field(default=True, metadata=cli(
        Option("--flip", 170, action=argparse.BooleanOptionalAction, help="random horizontal flips")))
    tiles: int = 1  # each image cut into tiles x tiles parts, batched together (L2SM on UCF-QNRF: 2)
    patches: str | None = None  # "csrnet9": CSRNet's nine quarter-size patches, mirrored, per image
    repeat: int = 1  # each training image (or patch set) this many times an epoch, each a new random draw
    shuffle: bool = True
    val_start: int = field(default=1, metadata=cli(  # the first epoch that is validated
        Option("--val-start", 280, type=positive_int, help="first epoch to validate")))
    val_every: int = field(default=1, metadata=cli(
        Option("--val-every", 290, type=positive_int, help="validate every E epochs")))
    val_from_train: float | None = field(default=None, metadata=cli(  # a fraction of the training images held out
        Option("--val-from-train", 300, type=fraction,
               help="hold this fraction of the training images out (seeded) for model selection, instead of the "
                    "dataset's val/test split")))
    fit_levels: bool = False  # L2SM: fit the G density levels over the training set before training
    workers: int = field(default=2, metadata=cli(
        Option("--workers", 330, type=nonnegative_int, help="DataLoader workers; default: 2")))
    seed: int = field(default=0, metadata=cli(Option("--seed", 340, type=nonnegative_int)))
    amp: bool = field(default=False, metadata=cli(
        Option("--amp", 360, action="store_true", help="bfloat16/float16 autocast (GPU only)")))
    device: str | None = field(default=None, metadata=cli(
        Option("--device", 350, help="e.g. cuda, cuda:1, cpu; default: cuda:LOCAL_RANK when a GPU is visible")))
    strict: bool = field(default=False, metadata=cli(
        Option("--strict", 380, action="store_true", help="fail on the first bad file instead of skipping it")))
    resume: bool = field(default=False, metadata=cli(
        Option("--resume", 370, action="store_true", help="continue the run in --out with its own "
               "settings (an error when --out holds no run: no last.pt)"), override=False))
    tile: int | None = 2048  # validation: tile images larger than this (pixels)
    # budgets, checked after every step: this process's wall-clock seconds (--time-limit) and the run's
    # optimizer steps in all (--max-steps, the same work on any machine). A run that reaches one saves a
    # resumable last.pt, validates the model it has and stops with status "time limit" / "step limit".
    max_seconds: float | None = field(default=None, metadata=cli(
        Option("--time-limit", 310, type=duration, metavar="TIME",
               help="stop after this much wall-clock time of this process (900, 90s, 15m, 1.5h), within one step: "
                    "saves a resumable last.pt and validates the model it has")))
    max_steps: int | None = field(default=None, metadata=cli(
        Option("--max-steps", 320, type=positive_int,
               help="stop after this many optimizer steps in all (the same work on any machine); as --time-limit")))
    synthetic: dict = field(default_factory=lambda: {"train": 200, "val": 40, "size": 128}, metadata=cli(
        Option("--synthetic", 390, type=positive_int, nargs=3, metavar=("TRAIN", "VAL", "SIZE"),
               convert=_synthetic_set, help="synthetic set: images to train on, held out, side; default: 200 40 128")))
    quiet: bool = False
    # the model's input convention (crowdkernels.data.transforms.normalize_image): ImageNet mean/std, or
    # None for raw RGB in [0, 1]; every image of the run goes through it, and checkpoints keep it
    input_norm: dict | None = field(default_factory=lambda: dict(IMAGENET_NORM))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------------------- building
def _set_dotted(d: dict, key: str, value) -> None:
    """d["a"]["b"] = value for key "a.b" (one level of nesting: target.*, model_kwargs.*, criterion_kwargs.*)."""
    head, _, rest = key.partition(".")
    if rest:
        if not isinstance(d.get(head), dict):
            raise ValueError(f"setting {key!r}: {head!r} is not a group of settings")
        d[head] = dict(d[head])
        d[head][rest] = value
    else:
        d[head] = value


def quick_settings(model: str, dataset: str | None = None) -> dict:
    """The flat settings of ``train --model MODEL`` without a recipe on ``dataset``: the model's quick defaults
    (:data:`crowdkernels.engine.recipes.QUICK`) with what the dataset's spec says: a smaller crop on small
    images (:data:`QUICK_SMALL_CROP`), a cap on large ones (``DatasetSpec.max_size``)."""
    flat = recipes.quick(model)
    spec = DATASETS.get(dataset)
    if flat["crop"] is not None and spec is not None and spec.small_crop:
        flat["crop"] = QUICK_SMALL_CROP
    flat["max_size"] = list(spec.max_size) if spec is not None and spec.max_size else None
    return flat


#: Each model's quick defaults as one read-only table (derived from :func:`quick_settings`; "crop_sha": the
#: crop on ShanghaiTech A).
MODEL_DEFAULTS = MappingProxyType({
    name: {"lr": q["lr"], "epochs": q["epochs"], "lr_step": q["lr_step"], "crop": q["crop"],
           "crop_sha": quick_settings(name, "shanghaitech-a")["crop"], "batch_size": q["batch_size"]}
    for name, q in ((name, quick_settings(name)) for name in recipes.QUICK)
})
PAPER_DEFAULTS = MODEL_DEFAULTS  # its first name, exported by crowdkernels.engine


def build_config(*, recipe: str | None = None, model: str | None = None, dataset: str = "synthetic",
                 overrides: dict | None = None) -> TrainConfig:
    """The settings of a run: recipe ``recipe`` resolved for ``dataset`` (:mod:`crowdkernels.engine.recipes`),
    or, without one, ``model``'s quick defaults (:func:`quick_settings`: crops of 128 on ShanghaiTech A, 256
    elsewhere); crops are clamped to the synthetic image size; then ``overrides``, a dict of settings whose keys
    are :class:`TrainConfig` fields or dotted keys into its groups ("target.sigma", "criterion_kwargs.rel",
    "model_kwargs.width"). Unknown keys raise a ValueError naming them."""
    fields_ = TrainConfig.__dataclass_fields__
    overrides = dict(overrides or {})
    d = TrainConfig(dataset=dataset).to_dict()
    d["synthetic"] = overrides.get("synthetic", d["synthetic"])
    if recipe is not None:
        flat = recipes.resolve(recipe, dataset)
        d["recipe"] = recipe
        d["criterion_kwargs"] = {}
    else:
        flat = quick_settings(overrides.get("model", model or d["model"]), dataset)
    for key, value in flat.items():
        _set_dotted(d, key, check_norm(value) if key == "input_norm" else value)
    if dataset == "synthetic" and d["crop"] is not None:
        d["crop"] = min(d["crop"], int(d["synthetic"]["size"]))
    if model is not None:
        d["model"] = model
    for key, value in overrides.items():
        if key.partition(".")[0] not in fields_:
            raise ValueError(f"unknown setting {key!r} (settings: {', '.join(sorted(fields_))})")
        _set_dotted(d, key, value)
    if d["model"] not in _model_names():
        raise ValueError(f"model must be one of {sorted(_model_names())}, got {d['model']!r}")
    config = TrainConfig(**d)
    check_model_options(config)
    return config


def _setting_error(message: str, setting: str | None) -> TrainError:
    """A TrainError whose ``setting`` names the dotted setting at fault (the CLI names its option)."""
    exc = TrainError(message)
    exc.setting = setting
    return exc


def check_model_options(config: TrainConfig) -> None:
    """What :func:`build_run` would refuse in ``config``'s model and loss settings, refused now, before a run
    starts (and by ``train --print-config``): the model is built with ``config.model_kwargs`` and its
    criterion with ``config.criterion_kwargs`` on the meta device (no memory, no weights, milliseconds).
    Raises a TrainError (a ValueError) naming the setting; its ``setting`` attribute holds the dotted key
    (e.g. "criterion_kwargs.weights") when one is to blame."""
    import inspect
    import re

    def unexpected(exc):
        found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        return found.group(1) if found else None

    try:
        with torch.device("meta"):
            model = build_model(config.model, **config.model_kwargs)
    except TypeError as exc:
        key = unexpected(exc)
        if key is None:
            raise _setting_error(f"the {config.model!r} model: {exc}", None) from None
        raise _setting_error(f"the {config.model!r} model has no option {key!r}", f"model_kwargs.{key}") from None
    except ValueError as exc:
        first = str(exc).split()[0] if str(exc) else ""
        raise _setting_error(f"the {config.model!r} model: {exc}",
                             f"model_kwargs.{first}" if first in config.model_kwargs else None) from None
    except (RuntimeError, NotImplementedError):  # a model that cannot be built on the meta device: build_run checks
        return
    model.density_scale = float((config.target or {}).get("scale", 1.0))
    kwargs = dict(config.criterion_kwargs)
    try:
        with torch.device("meta"):
            model.criterion(**kwargs)
    except TypeError as exc:
        key = unexpected(exc)
        if key is None:
            raise _setting_error(f"the {config.model!r} loss: {exc}", None) from None
        params = [n for n, p in inspect.signature(model.criterion).parameters.items()
                  if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        hint = " (per-output loss weights are for the hmode models)" if key == "weights" else ""
        options = f"; its options: {', '.join(params)}" if params else ""
        raise _setting_error(f"the {config.model!r} loss has no option {key!r}{hint}{options}",
                             f"criterion_kwargs.{key}") from None
    except ValueError as exc:
        first = str(exc).split()[0] if str(exc) else ""
        raise _setting_error(f"the {config.model!r} loss: {exc}",
                             f"criterion_kwargs.{first}" if first in kwargs else None) from None
    except (RuntimeError, NotImplementedError):
        return


#: What ``--resume`` may change in a run: how long it runs and how it is run, not what it learns.
RESUME_MAY_CHANGE = ("epochs", "workers", "device", "strict", "amp", "val_every", "val_start", "max_seconds", "max_steps", "quiet",
                     "tile")


def resume_config(out, overrides: dict | None = None) -> TrainConfig:
    """The settings of the run in ``out`` (its last.pt), for ``--resume``, with those of ``overrides`` that a
    resumed run may change (:data:`RESUME_MAY_CHANGE`). Any other override that differs from the run's own
    value raises a TrainError naming each one: a resumed run continues the same training, so silently
    applying (or silently ignoring) a new lr, batch or crop would both be wrong. No last.pt in ``out``: a
    TrainError."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise TrainError(f"--resume: there is no run to continue in {out} (no last.pt there); check --out, or leave "
                         "out --resume to start a new run")
    ckpt = load_checkpoint(last)
    saved = dict(ckpt.get("config") or {})
    fields_ = TrainConfig.__dataclass_fields__
    base = TrainConfig().to_dict()
    d = {k: saved.get(k, base[k]) for k in fields_}
    differ = []
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head not in fields_:
            raise ValueError(f"unknown setting {key!r}")
        now = d[head].get(rest) if rest and isinstance(d[head], dict) else d[head]
        if json.loads(json.dumps(value)) == json.loads(json.dumps(now)):
            continue
        if head in RESUME_MAY_CHANGE:
            _set_dotted(d, key, value)
        else:
            differ.append(f"{key} {json.dumps(value)} (the run's: {json.dumps(now)})")
    if differ:
        raise TrainError(f"--resume continues the run in {out} with its own settings, but these options differ from "
                         f"them: {'; '.join(differ)}. Drop them, or start a new run in another --out")
    # budgets belong to the command that gives them (--time-limit is this process's clock): a resumed run
    # takes only its own, so that "continue with --resume" continues
    for budget in ("max_seconds", "max_steps"):
        if budget not in (overrides or {}):
            d[budget] = None
    d.update(out=str(out), resume=True)
    return TrainConfig(**d)


# ----------------------------------------------------------------------------------------- the command's run
def setting_arg(text: str) -> tuple[str, Any]:
    """``--set KEY=JSON`` -> (KEY, the JSON value), or a TrainError that says what is wrong."""
    key, eq, value = text.partition("=")
    if not eq:
        raise TrainError(f"--set expects KEY=JSON, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        raise TrainError(f"--set {key.strip()}: the value must be JSON (e.g. 1e-4, \"sum\", [1, 2], null), "
                         f"got {value!r}") from None


def run_config(*, recipe: str | None = None, dataset: str = "synthetic", root=None, out=None, resume: bool = False,
               overrides: dict | None = None) -> TrainConfig:
    """The settings of a run as ``crowdkernels train`` makes them: with ``resume``, those of the run in ``out``
    (:func:`resume_config`); else :func:`build_config` with the dataset's ``root`` folder and the run folder
    ``out`` (default: the field's). A setting at fault raises a TrainError that names its option."""
    try:
        if resume:
            if out is None:
                raise TrainError("--resume needs --out, the folder of the run to continue")
            return resume_config(out, overrides)
        config = build_config(recipe=recipe, dataset=dataset, overrides=overrides)
    except ValueError as exc:  # an unknown or malformed setting, no run to resume, or a resume that would change it
        flag = {o.key: o.flag for o in cli_options() if o.override}.get(getattr(exc, "setting", None))
        raise TrainError(f"{flag} ({exc.setting}): {exc}" if flag else str(exc)) from None
    # the absolute folder: `eval` recognises the training's own data (and its held-out images) from any
    # working directory
    config.root = None if root is None else str(Path(root).expanduser().resolve())
    config.out = config.out if out is None else str(out)
    config.resume = False  # a new run, whatever --set says
    return config


def require_root(dataset: str, root) -> None:
    """A TrainError unless ``root`` names the folder of ``dataset`` (the synthetic set needs none)."""
    if dataset != "synthetic" and root is None:
        raise TrainError(f"--root is required for --dataset {dataset}")


def start_warnings(config: TrainConfig, device_type: str) -> list[str]:
    """What a run of ``config`` on a ``device_type`` device ("cuda", "cpu", ...) is warned about before it starts:
    --amp where autocast is not used; a recipe's ImageNet encoder that starts random."""
    said = []
    if config.amp and device_type != "cuda":
        said.append(f"warning: --amp has no effect on the {device_type} (autocast is used on CUDA GPUs only)")
    if config.encoder and not config.pretrained and not config.init and not config.resume:
        said.append(f"warning: the {config.recipe} recipe starts from ImageNet {config.encoder} weights, but no "
                    f"--pretrained file was given: the encoder starts random, and the paper's numbers are out of reach")
    return said


#: ``crowdkernels eval``'s options of the evaluation data (:func:`evaluation_config`, ``Counter.evaluate``);
#: with those of the Counter (:data:`crowdkernels.inference.COUNTER_OPTIONS`), in ``--help`` order
EVAL_OPTIONS = (
    Option("--dataset", 20, required=True, choices=DATASET_NAMES),
    Option("--root", 30, type=Path, help="the dataset folder"),
    Option("--split", 40, choices=("val", "test", "train"),
           help="default: the images the checkpoint's training validated on (on its own dataset: those "
                "--val-from-train held out; else the val split, the test split where there is no val, every "
                "10th training image where there is neither). A val or test split the dataset does not have "
                "is an error naming the folders found"),
    Option("--fold", 50, type=int, choices=range(1, 6), metavar="K", help="UCF_CC_50 fold 1-5; default: the training's"),
    Option("--workers", 100, type=nonnegative_int, default=2, help="default: 2"),
    Option("--strict", 110, action="store_true", help="fail on the first bad file"),
    Option("--out", 120, type=Path, help="write the metrics, the input settings used and the per-image counts as JSON "
                                         "here"),
    Option("--save-dir", 130, type=Path,
           help="write DIR/predictions.csv (image, true count, predicted count, error), DIR/metrics.json, "
                "DIR/scatter.png (predicted against true counts) and DIR/pictures/<image>.png"),
    Option("--pictures", 140, type=nonnegative_int, help="with --save-dir: draw at most this many pictures; default: all"),
)


def evaluation_config(trained: dict, dataset: str, root=None, *, split: str | None = None, fold: int | None = None,
                      max_size=None, strict: bool = False) -> TrainConfig:
    """The settings with which ``crowdkernels eval`` makes its data (``evaluation_dataset``) for a checkpoint trained
    with the settings ``trained`` (its config dict; {} for none): ``max_size`` the images' cap (a side, an (a, b)
    box or None). On the training's own data (the same dataset, and the same root folder unless synthetic) the
    default is the training's validation set: its fold and, when ``split`` is None, its held-out images
    (``val_from_train``); an explicit ``fold`` wins."""
    same = trained.get("dataset") == dataset and (
        dataset == "synthetic" or (bool(trained.get("root")) and root is not None
                                   and Path(trained["root"]).expanduser().resolve() == Path(root).expanduser().resolve()))
    return TrainConfig(
        dataset=dataset, root=None if root is None else str(root),
        fold=fold if fold is not None else (trained.get("fold") if same else None),
        max_size=list(max_size) if isinstance(max_size, tuple) else max_size,
        strict=strict, seed=int(trained.get("seed", 0)),
        val_from_train=trained.get("val_from_train") if same and split is None else None,
        synthetic=trained.get("synthetic") or TrainConfig().synthetic)
