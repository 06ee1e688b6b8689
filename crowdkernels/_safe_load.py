"""Reading PyTorch files (checkpoints, released weights, pretrained encoders) without running code from them.

Every ``.pt``/``.pth`` crowdkernels opens goes through :func:`load_torch_file`: ``torch.load`` with
``weights_only=True``, which rebuilds tensors and plain containers (dict, list, tuple, str, int, float, ...) and
refuses any other global the pickle names, before calling it. There is no fallback to the full unpickler: a file
that needs it (a whole pickled ``nn.Module``, a checkpoint holding other objects, a planted payload) is refused
with one line naming the file and the type it met. Beyond torch's own list, exactly these NumPy globals are
allowed: an ndarray of uint32 (the NumPy RNG state of checkpoints written by crowdkernels 0.1.0) and NumPy
float64/float32 scalars (the ``record`` of the authors' released HMoDE training checkpoint: ``best_mae``,
``mse``, ``corr_loss``, float64 under NumPy 1, which their torch 1.10 needs, float32 under NumPy 2). None of
them calls anything but NumPy's own constructors of arrays and scalars.

The other files crowdkernels reads are parsed as data, never unpickled: ``.npy`` through
``np.load(allow_pickle=False)`` (an object array is refused); ``.mat`` through ``scipy.io.loadmat`` (MATLAB v4/v5
parsed into arrays; a MATLAB object or function handle comes back as inert bytes, v7.3 files are refused); ``.json``
through ``json.loads``; ``.txt`` split by hand. Images go through ``PIL.Image.open`` with every format Pillow
knows but EPS, which Pillow renders by running Ghostscript whatever the file's suffix
(:func:`crowdkernels.data.datasets.open_image_file`); its decompression-bomb limit stays on.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import warnings

import torch

__all__ = ["CheckpointError", "load_torch_file"]


class CheckpointError(ValueError):
    """A weights file (a checkpoint, a released or pretrained file) that is unreadable, refused (it needs more
    than tensors and plain data to unpickle), not a crowdkernels checkpoint, or made for another model."""


def _numpy_globals() -> list:
    """The NumPy globals allowed beyond torch's list (see the module docstring), under the names NumPy 1
    (``numpy.core``) and NumPy 2 (``numpy._core``) write them."""
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    allowed = [np.ndarray, np.dtype, *(type(np.dtype(t)) for t in (np.uint32, np.float64, np.float32))]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return allowed


# what torch's weights_only unpickler names when it refuses: a global, or a class it may not build
_REFUSED = (r"GLOBAL (\S+) (?:was not|whose module)", r"but got <class '([^']+)'>")


def _refused_global(message: str) -> str | None:
    """The global named in torch's refusal, with the "builtins." that torch drops put back."""
    for pattern in _REFUSED:
        found = re.search(pattern, message)
        if found:
            name = found.group(1).rstrip(".")
            return name if "." in name else f"builtins.{name}"
    return None


def _is_module_class(name: str, path) -> bool:
    """Whether the global ``name`` is an ``nn.Module`` class: looked up among the modules already imported
    (nothing is imported for it), else told by the file naming any of torch.nn's module classes (read
    statically, nothing run)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is not None:
            for attr in parts[i:]:  # vars(), not getattr(): no module's __getattr__ hook runs
                obj = vars(obj).get(attr) if hasattr(obj, "__dict__") else None
            if isinstance(obj, type):
                return issubclass(obj, torch.nn.Module)
            break
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the legacy format is not read statically
        return False
    return any(n.startswith("torch.nn.modules.") for n in names)


def _refusal(path, message: str) -> str:
    where = os.fspath(path)
    name = _refused_global(message)
    if name is not None and _is_module_class(name, path):
        return (f"{where} holds a whole pickled model ({name}, an nn.Module), not a state_dict; crowdkernels does "
                f"not unpickle models (that runs code from the file). If you trust the file, save its weights once: "
                f"torch.save(torch.load({where!r}, weights_only=False).state_dict(), 'weights.pth') (see the README)")
    if name is not None:
        held = f"{name}, which is neither a tensor nor plain data"
    else:  # an opcode it does not take, or another refusal: torch's own words, on one line
        said = [line.strip() for line in message.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        held = f"what weights_only reading does not take ({said[0][:200] if said else 'no reason given'})"
    return (f"{where}: refused: it holds {held}; crowdkernels reads weights files with torch.load(weights_only=True), "
            f"which never runs code from the file. If you trust the file, convert it (see the README: 'Files "
            f"crowdkernels reads')")


def load_torch_file(path, map_location="cpu", what: str = "checkpoint"):
    """What ``torch.load(path, weights_only=True)`` finds in the file (with the NumPy arrays and scalars of
    the module docstring allowed). CheckpointError, one line naming the file: when the file needs anything
    more, it is refused, unrun, naming the type it met (a pickled ``nn.Module``: how to turn it into a
    state_dict); when it is missing, truncated or not a PyTorch file, "not a readable ``what``"."""
    allowed = [g for g in _numpy_globals() if g not in torch.serialization.get_safe_globals()]
    try:
        # only what is not allowed already is added, and removed again: a caller's own allowlist stays as it was
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # torch warns of a pickle protocol > 2 (it may refuse the file: it says so if it does) and of a
            # TorchScript archive (which weights_only refuses): the error below is the one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(path, str(exc))) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, ... on files it cannot read
        where = os.fspath(path)
        if "TorchScript" in str(exc):
            raise CheckpointError(f"{where} is a TorchScript archive (torch.jit.save), not a state_dict. If you trust "
                                  f"the file, save its weights once: torch.save(torch.jit.load({where!r}).state_dict(), "
                                  f"'weights.pth')") from None
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{where}: not a readable {what} ({type(exc).__name__}: {reason})") from None
