"""Loads the compiled extension `crowdkernels._C` and decides which backend runs each op.

The backend of every op is chosen by its tensors' device, in one place (`backend`): the CUDA kernel (or
Triton) on a GPU, the C++ kernel on the CPU, and the plain-PyTorch reference only where no compiled kernel
exists. `crowdkernels.backends()` says which of these this installation has.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the ops with torch.library)

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # an unbuilt source checkout: the reference path still works
    _C = None
    _LOAD_ERROR = exc


def compiled() -> bool:
    """True when `crowdkernels._C` was built and loaded."""
    return _C is not None


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    if _C is None:
        return {}
    pairs = (kv.split("=", 1) for kv in torch.ops.crowdkernels._build_info().split(";"))
    return dict(pairs)


def cuda_compiled() -> bool:
    """True when the CUDA kernels were compiled into `_C`."""
    return _build_info().get("cuda") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton install must not break the library
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, key: str) -> bool:
    # Cached: `_C` registers its kernels when it loads, above, and the Triton ops when their modules load
    # with crowdkernels.ops, before any op runs; neither registers later.
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"crowdkernels::{op}", key)
    except RuntimeError:  # the schema is not registered at all (an older _C, or no Triton)
        return False


# The ops whose GPU path is a Triton op, `crowdkernels::<op>_triton` (crowdkernels/ops/triton/), rather than a
# CUDA kernel in `_C`. Their modules register the Triton op when Triton imports.
TRITON_OPS = ("local_counts", "gating_forward")


# A constant for torch.compile: the answer depends on the device's type and this installation alone, and the
# dispatcher queries below are not traceable.
@torch.compiler.assume_constant_result
def backend(device: torch.device, op: str) -> str:
    """Which implementation of the op `op` (its schema name in `_C`, e.g. "knn_sigma") runs on `device`.

    'cuda': the CUDA kernel of `_C`, on a GPU, where this build compiled one for `op`;
    'triton': the Triton op `<op>_triton`, on a GPU, for the ops in `TRITON_OPS`, where Triton runs and the
        op registered;
    'cpu': the C++ kernel of `_C`, on the CPU, where this build registered one for `op`;
    'reference': the plain-PyTorch reference (crowdkernels/ops/reference.py) everywhere else, so that a
        partial or stale build falls back to it instead of failing; and while `torch.export` traces a model
        (`crowdkernels.engine.export`), so that the exported graph holds the reference maths in standard
        operators: an ONNX runtime has no kernel of ours, and the compiled ops' plain-int arguments (sizes)
        would fix the traced image size in the graph.
    """
    if torch.compiler.is_exporting():
        return "reference"
    if device.type == "cuda":
        if op in TRITON_OPS:
            runs = triton_available() and _has_kernel(f"{op}_triton", "CompositeExplicitAutograd")
            return "triton" if runs else "reference"
        if cuda_compiled() and _has_kernel(op, "CUDA"):
            return "cuda"
    elif device.type == "cpu" and compiled() and _has_kernel(op, "CPU"):
        return "cpu"
    return "reference"


def backends() -> dict:
    """What this installation can run.

    Returns a dict: ``cpu`` (the C++ kernels were built), ``openmp`` (the OpenMP version they were built
    with, 0 if none), ``cuda`` (CUDA kernels built), ``cuda_archs`` (the architectures they were built
    for), ``cuda_device`` (a GPU is visible now), ``triton`` (Triton's version, or None), ``torch``,
    ``threads`` (torch's intra-op thread count, which the C++ kernels use), and ``load_error`` when `_C`
    did not load.
    """
    info = _build_info()
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as exc:  # pragma: no cover - depends on the install
            warnings.warn(f"triton is installed but does not import: {exc}")
    out = {
        "cpu": compiled(),
        "openmp": int(info.get("openmp", 0) or 0),
        "cuda": cuda_compiled(),
        "cuda_archs": [a for a in info.get("cuda_archs", "").split(",") if a],
        "cuda_device": torch.cuda.is_available(),
        "triton": triton_version,
        "triton_runs": triton_available(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if _LOAD_ERROR is not None:
        out["load_error"] = str(_LOAD_ERROR)
    return out


def _yes_no(flag) -> str:
    return "yes" if flag else "no"


def backends_text(info: dict) -> str:
    """A :func:`backends` report, with ``"crowdkernels"`` (the package's version) added, as aligned
    "name  value" lines (``crowdkernels info``)."""
    fallback = "" if info["cpu"] else " (the plain-PyTorch reference runs instead: slower, same results)"
    triton = f"{info['triton']} (runs here: {_yes_no(info['triton_runs'])})" if info["triton"] else "not installed"
    rows = [
        ("crowdkernels", info["crowdkernels"]),
        ("torch", info["torch"]),
        ("C++ kernels (cpu)", _yes_no(info["cpu"]) + fallback),
        ("OpenMP", info["openmp"] or "no"),
        ("CUDA kernels", _yes_no(info["cuda"])),
        ("CUDA archs", ", ".join(info["cuda_archs"]) or "-"),
        ("GPU visible", _yes_no(info["cuda_device"])),
        ("Triton", triton),
        ("threads", info["threads"]),
    ]
    if "load_error" in info:
        rows.append(("load error", info["load_error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_POISON = False


class poisoned_outputs:
    """Context manager for tests: outputs that the kernels (C++, CUDA, Triton wrappers) allocate start
    filled with NaN (integers: the lowest value), so that an element a kernel never writes is caught."""

    def __enter__(self):
        global _POISON
        self._old = _POISON
        _POISON = True
        if _C is not None:
            torch.ops.crowdkernels._set_poison(True)
        return self

    def __exit__(self, *exc):
        global _POISON
        _POISON = self._old
        if _C is not None:
            torch.ops.crowdkernels._set_poison(self._old)
        return False


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """`torch.empty`, or a poisoned tensor inside `poisoned_outputs()`: for Python-side allocations of
    outputs that Triton kernels fill."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------- CPU output pool
def _check_cache_env() -> None:
    value = os.environ.get("CROWDKERNELS_CPU_CACHE_MB")
    if value:
        try:
            int(value)
        except ValueError:
            warnings.warn(f"CROWDKERNELS_CPU_CACHE_MB must be an integer number of MiB, got {value!r}; using 256")


def cpu_cache_info() -> dict:
    """The CPU output pool (csrc/common/output_pool.h): large CPU outputs of the density op (>= 1 MiB) go
    back to it when their tensor dies, and the next output of a similar size reuses the memory, already
    mapped, instead of faulting in fresh pages (about 1 ms per ShanghaiTech-A map on our VMs).

    Returns ``{"cached_bytes", "limit_bytes", "hits", "misses"}`` (all 0 without the compiled extension).
    The limit comes from ``CROWDKERNELS_CPU_CACHE_MB`` (default 256; 0 disables the pool) or
    :func:`set_cpu_cache_limit`.
    """
    if _C is None:
        return {"cached_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    cached, limit, hits, misses = torch.ops.crowdkernels._cpu_cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of freed CPU outputs for reuse (0 disables the pool); frees any excess now."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    if _C is not None:
        torch.ops.crowdkernels._cpu_cache_limit(nbytes)


def empty_cache() -> None:
    """Return every cached CPU output buffer to the system (like torch.cuda.empty_cache for the GPU)."""
    if _C is not None:
        torch.ops.crowdkernels._cpu_cache_empty()


_check_cache_env()
