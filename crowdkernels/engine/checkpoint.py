"""Training checkpoints: written atomically, checked against the model they are loaded into.

A checkpoint (``torch.save`` of a dict) holds ``format``, ``model_name`` (e.g. "hmode-official"),
``config`` (the run's settings, the model's constructor arguments among them), ``model`` (state dict),
``optimizer``, ``scheduler``, ``scaler``, ``rng`` (torch CPU/CUDA, NumPy and Python states), ``epoch``
and ``step`` (where training resumes), ``best`` (the best validation MAE and its epoch) and ``history``:
tensors and plain data only, so that it is read with ``torch.load(weights_only=True)``, as every file
crowdkernels opens is (:mod:`crowdkernels._safe_load`).

It is written to a temp file in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX and Windows): a SIGKILL at any moment leaves the previous checkpoint
or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .._safe_load import CheckpointError, load_torch_file

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "check_model",
           "read_weights_file", "released_state_dict", "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = "crowdkernels-checkpoint-1"


def _umask() -> int:
    """The process's file mode creation mask. Read from /proc where there is one: setting and restoring it
    with os.umask would, for a moment, let another thread create files under mask 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, mode: str = "wb") -> None:
    """Writes through ``write(fileobj)`` into a temp file in the same folder, flushes it to disk, then
    renames it over ``path``: a reader (or a rerun after a crash) sees the old file or the new one,
    never a half-written one. The file gets the mode ``open()`` would give it (0o666 less the umask, so
    0o644 under the usual umask 0o022), not the temp file's private 0o600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


#: the top-level modules of the authors' released HMoDE.py (their state_dict's first name components)
_RELEASED_MODULES = {"features1", "features2", "features3", "features4", "features5", "de_pred1", "de_pred2",
                     "de_pred3", "head1", "head2", "head3", "gating1", "gating2", "mask"}


def released_state_dict(obj) -> dict | None:
    """The state_dict in ``obj`` when it is one of the authors' released HMoDE files: their plain state_dict
    (test.py loads it as is), ``{"model": state_dict}`` (their best_model.pth), or their training checkpoint
    ``{"model": state_dict with "module." keys, "optimizer", "epoch", ...}`` (latestmodel.pth). None
    otherwise."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "format" not in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    heads = {(k[len("module."):] if k.startswith("module.") else k).split(".")[0] for k in obj}
    if heads <= _RELEASED_MODULES and {"features1", "gating1", "mask"} <= heads:
        return obj
    return None


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
