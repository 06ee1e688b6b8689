"""The settings of a training run: :class:`TrainConfig`, made by :func:`build_config` from a named recipe
(:mod:`crowdkernels.engine.recipes`: the papers' and the released code's settings) or from a model's
defaults, plus explicit overrides, and read back from a run's last.pt for ``--resume`` (:func:`resume_config`).
:func:`crowdkernels.engine.trainer.build_run` turns them into the model, its criterion and the datasets;
:class:`crowdkernels.engine.trainer.Trainer` trains it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from ..data.transforms import IMAGENET_NORM
from ..models.registry import MODEL_BUILDERS, build_model

__all__ = [
    "MODEL_DEFAULTS",
    "TrainConfig",
    "TrainError",
    "build_config",
    "check_model_options",
    "resume_config",
]


#: Each model's settings when no recipe is named (``train --model NAME`` alone): ours, for quick runs. The
#: papers' and the released code's complete settings are the recipes (:mod:`crowdkernels.engine.recipes`).
MODEL_DEFAULTS = {
    "hmode": {"lr": 2e-5, "epochs": 200, "lr_step": 100, "crop": 256, "crop_sha": 128, "batch_size": 8},
    "hmode-official": {"lr": 2e-5, "epochs": 200, "lr_step": 100, "crop": 256, "crop_sha": 128, "batch_size": 8},
    "l2sm": {"lr": 1e-4, "epochs": 200, "lr_step": None, "crop": None, "crop_sha": None, "batch_size": 1},
    "spn": {"lr": 1e-4, "epochs": 200, "lr_step": None, "crop": None, "crop_sha": None, "batch_size": 1},
    "csrnet": {"lr": 1e-5, "epochs": 200, "lr_step": None, "crop": 256, "crop_sha": 128, "batch_size": 8},
}
PAPER_DEFAULTS = MODEL_DEFAULTS  # the old name (they were never all the papers' settings)

#: The ground truth when no recipe says otherwise: geometry-adaptive "exact" maps that sum to the count.
DEFAULT_TARGET = {"style": "exact", "sigma": "adaptive", "k": 3, "beta": 0.3, "truncate": 4.0, "kernel_size": 15,
                  "scale": 1.0}


class TrainError(ValueError):
    """A run that cannot start or go on (an existing run in --out without --resume, a NaN loss, ...)."""


@dataclass
class TrainConfig:
    """Settings of a run (all JSON-serializable; saved in every checkpoint). See :func:`build_config`."""

    out: str = "runs/train"
    recipe: str | None = None  # the recipe the settings came from (crowdkernels.engine.recipes)
    model: str = "hmode"
    model_kwargs: dict = field(default_factory=dict)
    criterion_kwargs: dict = field(default_factory=dict)
    encoder: str | None = None  # the ImageNet encoder the recipe starts from ("vgg16", "vgg16_bn")
    pretrained: str | None = None  # a local torchvision vgg16 / vgg16_bn file for the encoder
    init: str | None = None  # initial weights: a crowdkernels checkpoint or a released HMoDE file
    # the layers outside the ImageNet encoder: "normal" N(0, 0.01), "he" (Kaiming), or "auto": N(0, 0.01) over
    # a --pretrained encoder, He over a random one (the models' `init` argument)
    weight_init: str = "auto"
    dataset: str = "synthetic"
    root: str | None = None
    fold: int | None = None
    epochs: int = 200
    batch_size: int = 8
    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 2e-5
    momentum: float = 0.0  # SGD only
    lr_step: int | None = 100  # the lr is multiplied by lr_gamma after this many epochs (None: constant)
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    # the ground truth: crowdkernels.density_maps settings, made after the crop and flip; maps are
    # multiplied by "scale" in the loss and the model predicts in those units (model.density_scale)
    target: dict = field(default_factory=lambda: dict(DEFAULT_TARGET))
    crop: int | None = 256
    max_size: object = None  # int or [a, b] box (e.g. [1920, 1080] for UCF-QNRF)
    multiple: int = 16  # the batch is zero-padded to a multiple of this
    flip: bool = True
    tiles: int = 1  # each image cut into tiles x tiles parts, batched together (L2SM on UCF-QNRF: 2)
    patches: str | None = None  # "csrnet9": CSRNet's nine quarter-size patches, mirrored, per image
    repeat: int = 1  # each training image (or patch set) this many times an epoch, each a new random draw
    shuffle: bool = True
    val_start: int = 1  # the first epoch that is validated
    val_every: int = 1
    val_from_train: float | None = None  # hold this fraction of the training images out for validation
    fit_levels: bool = False  # L2SM: fit the G density levels over the training set before training
    workers: int = 2
    seed: int = 0
    amp: bool = False
    device: str | None = None
    strict: bool = False
    resume: bool = False
    tile: int | None = 2048  # validation: tile images larger than this (pixels)
    # budgets, checked after every step: this process's wall-clock seconds (--time-limit) and the run's
    # optimizer steps in all (--max-steps, the same work on any machine). A run that reaches one saves a
    # resumable last.pt, validates the model it has and stops with status "time limit" / "step limit".
    max_seconds: float | None = None
    max_steps: int | None = None
    synthetic: dict = field(default_factory=lambda: {"train": 200, "val": 40, "size": 128})
    quiet: bool = False
    # the model's input convention (crowdkernels.data.transforms.normalize_image): ImageNet mean/std, or
    # None for raw RGB in [0, 1]; every image of the run goes through it, and checkpoints keep it
    input_norm: dict | None = field(default_factory=lambda: dict(IMAGENET_NORM))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------------------- config
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


def build_config(*, recipe: str | None = None, model: str | None = None, dataset: str = "synthetic",
                 overrides: dict | None = None) -> TrainConfig:
    """The settings of a run: recipe ``recipe`` resolved for ``dataset`` (:mod:`crowdkernels.engine.recipes`),
    or, without one, ``model``'s defaults (:data:`MODEL_DEFAULTS`: crops of 128 on ShanghaiTech A, 256
    elsewhere, clamped to the synthetic image size); then ``overrides``, a dict of settings whose keys are
    :class:`TrainConfig` fields or dotted keys into its groups ("target.sigma", "criterion_kwargs.rel",
    "model_kwargs.width"). Unknown keys raise a ValueError naming them."""
    from ..data.transforms import check_norm
    from . import recipes as recipes_mod

    fields = TrainConfig.__dataclass_fields__
    overrides = dict(overrides or {})
    d = TrainConfig(dataset=dataset).to_dict()
    d["synthetic"] = overrides.get("synthetic", d["synthetic"])
    if recipe is not None:
        flat = recipes_mod.resolve(recipe, dataset)
        d["recipe"] = recipe
        d["criterion_kwargs"] = {}
        for key, value in flat.items():
            _set_dotted(d, key, check_norm(value) if key == "input_norm" else value)
        if dataset == "synthetic" and d["crop"] is not None:
            d["crop"] = min(d["crop"], int(d["synthetic"]["size"]))
    else:
        name = overrides.get("model", model or d["model"])
        if name not in MODEL_DEFAULTS:
            raise ValueError(f"model must be one of {sorted(MODEL_DEFAULTS)}, got {name!r}")
        m = MODEL_DEFAULTS[name]
        crop = m["crop_sha"] if dataset == "shanghaitech-a" else m["crop"]
        if dataset == "synthetic" and crop is not None:
            crop = min(crop, int(d["synthetic"]["size"]))
        d.update(model=name, lr=m["lr"], epochs=m["epochs"], lr_step=m["lr_step"], crop=crop,
                 batch_size=m["batch_size"] if crop else 1,
                 max_size=[1920, 1080] if dataset == "ucf-qnrf" else None)
    if model is not None:
        d["model"] = model
    for key, value in overrides.items():
        if key.partition(".")[0] not in fields:
            raise ValueError(f"unknown setting {key!r} (settings: {', '.join(sorted(fields))})")
        _set_dotted(d, key, value)
    if d["model"] not in MODEL_BUILDERS:
        raise ValueError(f"model must be one of {sorted(MODEL_BUILDERS)}, got {d['model']!r}")
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
    applying (or silently ignoring) a new lr, batch or crop would both be wrong."""
    last = Path(out) / "last.pt"
    ckpt = load_checkpoint(last)
    saved = dict(ckpt.get("config") or {})
    fields = TrainConfig.__dataclass_fields__
    base = TrainConfig().to_dict()
    d = {k: saved.get(k, base[k]) for k in fields}
    differ = []
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head not in fields:
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
