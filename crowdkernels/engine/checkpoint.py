"""Checkpoints: written atomically, checked against the model they are loaded into, and a model loaded from
one (or from the authors' released HMoDE weights).

A checkpoint (``torch.save`` of a dict) holds ``format``, ``model_name`` (e.g. "hmode-official"),
``config`` (the run's settings, the model's constructor arguments among them), ``model`` (state dict),
``optimizer``, ``scheduler``, ``scaler``, ``rng`` (torch CPU/CUDA, NumPy and Python states), ``epoch``
and ``step`` (where training resumes), ``best`` (the best validation MAE and its epoch) and ``history``:
tensors and plain data only, so that it is read with ``torch.load(weights_only=True)``, as every file
crowdkernels opens is (:mod:`crowdkernels._safe_load`).

It is written to a temp file in the same folder, flushed to disk, then renamed over the old one
(:func:`crowdkernels._io.atomic_write`; ``os.replace`` is atomic on POSIX and Windows): a SIGKILL at any
moment leaves the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from .._safe_load import CheckpointError, load_torch_file
from ..data.transforms import check_norm
from ..models.hmode import RELEASED_CONFIG, HMoDE, released_state_dict, released_weights_for
from ..models.registry import build_model

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_model",
           "read_weights_file", "rng_state", "set_rng_state", "load_initial_weights", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "crowdkernels-checkpoint-1"


def save_checkpoint(path, state: dict) -> None:
    """Writes ``state`` (a dict; ``format`` is added) to ``path`` atomically (:func:`atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def _read(path, map_location="cpu"):
    """What ``torch.load(weights_only=True)`` finds in the file at ``path``
    (:func:`crowdkernels._safe_load.load_torch_file`: nothing in the file is run); CheckpointError naming the
    file when it is missing, unreadable, or refused (it needs more than tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return load_torch_file(path, map_location)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at ``path``; CheckpointError naming the file when it is missing, unreadable
    or not a crowdkernels checkpoint."""
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a crowdkernels training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def read_weights_file(path) -> tuple[str, dict]:
    """("crowdkernels", checkpoint dict) or ("released", the authors' HMoDE state_dict) for the file at
    ``path``; CheckpointError naming the file when it is neither."""
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and "model" in obj:
        return "crowdkernels", obj
    released = released_state_dict(obj)
    if released is not None:
        return "released", released
    raise CheckpointError(f"{path}: neither a crowdkernels training checkpoint (format {CHECKPOINT_FORMAT}) nor "
                          "one of the authors' released HMoDE files")


def describe(ckpt_or_config: dict) -> str:
    """'hmode-official (width 0.25)' for error messages."""
    cfg = ckpt_or_config.get("config", ckpt_or_config)
    name = ckpt_or_config.get("model_name", cfg.get("model"))
    extra = ", ".join(f"{k} {v}" for k, v in sorted((cfg.get("model_kwargs") or {}).items()))
    return f"'{name}'" + (f" ({extra})" if extra else "")


def check_model(ckpt: dict, path, model_name: str, model_kwargs: dict | None = None) -> None:
    """CheckpointError naming both when ``ckpt`` was made for another model or variant than
    ``model_name`` with ``model_kwargs``."""
    mine = {"model_name": model_name, "config": {"model": model_name, "model_kwargs": model_kwargs or {}}}
    theirs_name = ckpt.get("model_name")
    theirs_kwargs = (ckpt.get("config") or {}).get("model_kwargs") or {}
    if theirs_name != model_name or (model_kwargs is not None and theirs_kwargs != model_kwargs):
        raise CheckpointError(
            f"{path} holds a {describe(ckpt)} model, but a {describe(mine)} model was asked for; "
            "pass the checkpoint's model settings or another checkpoint"
        )


def rng_state() -> dict:
    """The torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain types only (what
    ``torch.load(weights_only=True)`` rebuilds): NumPy's MT19937 key as an int64 tensor."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Puts back the states of :func:`rng_state`, or of a checkpoint of crowdkernels 0.1.0 (whose NumPy
    state is ``np.random.get_state()``'s tuple, its key a uint32 array)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"]
        key = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key, dtype=np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_initial_weights(model, path) -> str:
    """Loads ``path`` into ``model`` (a fresh run's starting point, nothing else of the file): a crowdkernels
    checkpoint (its "model"), or one of the authors' released HMoDE files (a plain state_dict, or their
    training checkpoint ``{"model": state_dict with "module." keys, ...}``), detected by their key names and
    mapped with :func:`crowdkernels.models.hmode.official_key_map` (HMoDE models, K = 3, N = 2). Returns
    "crowdkernels" or "released". CheckpointError naming the file when it does not fit."""
    kind, state = read_weights_file(path)
    if kind == "released":
        state = released_weights_for(model, state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: its weights do not fit the {type(model).__name__} model of this run "
                              f"({first[0] if first else exc}{'; ' + first[1].strip() if len(first) > 1 else ''})") from None
    return kind


def model_from_checkpoint(path, device="cpu", *, model: str | None = None, model_kwargs: dict | None = None):
    """(model in eval mode on ``device``, checkpoint dict) from a checkpoint of
    :class:`crowdkernels.engine.trainer.Trainer`, or from one of the authors' released HMoDE files (a plain
    state_dict, or ``{"model": ...}``; the model is then the official variant fed as the released test.py
    feeds it: ImageNet normalization, unpadded, counts = sum / 100; the dict returned has ``"released":
    True``). With ``model`` (and ``model_kwargs``) given, a checkpoint of another model or variant is refused
    with an error naming both. ``model.input_norm`` and ``model.density_scale`` are the checkpoint's
    conventions."""
    kind, payload = read_weights_file(path)
    if kind == "released":
        ckpt = {"model_name": "hmode-official", "released": True, "config": copy.deepcopy(RELEASED_CONFIG)}
        if model is not None:
            check_model(ckpt, path, model, model_kwargs)
        try:
            net = HMoDE.from_official(payload)  # its declared conventions are the released test.py's
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a complete released HMoDE state_dict ({exc})") from None
        return net.to(device).eval(), ckpt
    ckpt = payload
    if model is not None:
        check_model(ckpt, path, model, model_kwargs)
    cfg = ckpt.get("config") or {}
    name = ckpt.get("model_name")
    net = build_model(name, **(cfg.get("model_kwargs") or {}))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit a {name!r} model ({exc})") from None
    # fed as it was trained: checkpoints from before the convention was saved were trained on raw [0, 1]
    net.input_norm = check_norm(cfg.get("input_norm")) if "input_norm" in cfg else None
    if isinstance(cfg.get("target"), dict) and "scale" in cfg["target"]:
        net.density_scale = float(cfg["target"]["scale"])
    return net.to(device).eval(), ckpt
