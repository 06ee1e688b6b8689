"""Small file helpers shared by the jobs (training, density job, demo, eval, count): atomic writes, the
clean-up of temp files a killed run left, and the checks of output paths and devices given on the command line.

Every writer goes through :func:`atomic_write` (a temp file beside the target, fsync, rename), so a file is
either the old one or the complete new one, never half written.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["OutputPathError", "atomic_write", "save_json", "save_npy", "clean_stale_temps", "output_dir", "output_file",
           "parse_device"]


class OutputPathError(ValueError):
    """An output path that cannot be used: an existing file where a folder is needed, or the reverse."""


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


def save_npy(path: Path, array) -> None:
    import numpy as np

    atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False))


def save_json(path: Path, data) -> None:
    """Writes ``data`` as indented JSON (NaN and inf refused: they are not JSON)."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda f: f.write(text), mode="w")


def clean_stale_temps(folder: Path) -> None:
    """Removes the temp files a killed run may have left (".<name>.<random>.tmp")."""
    for p in Path(folder).glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _blocking_file(path: Path) -> Path | None:
    """The first existing non-folder among ``path`` and its parents, if any."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def output_dir(path, flag: str) -> Path:
    """``path`` as a folder that can be created (or already is one). Raises OutputPathError naming ``flag``
    when it, or a folder above it, is an existing file. Nothing is created here: the checks run before a
    job starts, so a bad path costs no work."""
    path = Path(path)
    blocker = _blocking_file(path)
    if blocker == path:
        raise OutputPathError(f"{flag} {path} is an existing file, not a folder: choose a folder")
    if blocker is not None:
        raise OutputPathError(f"{flag} {path}: {blocker} is an existing file, not a folder")
    return path


def output_file(path, flag: str) -> Path:
    """``path`` as a file that can be written: not a folder, and no file where a folder above it must be."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder: give a file name (e.g. {path / 'metrics.json'})")
    blocker = _blocking_file(path.parent)
    if blocker is not None:
        raise OutputPathError(f"{flag} {path}: {blocker} is an existing file, not a folder")
    return path


def parse_device(device, flag: str):
    """``torch.device(device)``, or a ValueError naming ``flag`` when it is not a device, or a CUDA device that
    this torch cannot see."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: no CUDA GPU is visible to torch {torch.__version__}")
    return dev
