"""The CUDA kernels of csrc/ executed on the CPU (docs/definitions.md, "Testing the GPU code"), for the tests.

`emulated_ops()` builds the emulation from this checkout's csrc/ (once; cached under build/cuda_emulated/,
never part of the installed package), loads it, and returns ``torch.ops.crowdkernels_cuda_emulated``: the
real .cu sources compiled as host C++ through csrc/common/cuda_emulation.h, one op per op that has a CUDA
kernel (same name, same schema as ``torch.ops.crowdkernels.<op>``), taking CPU tensors. Their kernels run
block after block, the threads of a block as fibers with real barriers, in a seeded random order.
The emulated ops have the fake kernels of the real ones, and scale_regions/unscale_regions the same
autograd formulas, so that gradcheck and torch.library.opcheck apply to them. `crowdkernels._ext.poisoned_outputs()`
poisons their outputs too (they call the very ck::poison_outputs() of crowdkernels._C).

    from cuda_emulation import emulated_ops, emulation
    ops = emulated_ops()                            # or pytest.skip(reason) where no C++ compiler exists
    with emulation(seed=3, max_grid=2, max_block=32):
        maps = ops.density_splat(points, offsets, sigma, H, W, 0, 4.0, 15, 1, True)

`emulation(seed, max_grid, max_block)` chooses the shuffling seed and forces launches smaller than the
sources ask for: at most `max_grid` blocks and `max_block` threads a block (a power of two), so that the
kernels' grid- and block-stride loops wrap. `run_under_asan(code)` runs Python code in a subprocess with
AddressSanitizer preloaded (torch's allocations get redzones) and the emulation built with
-fsanitize=address, there as `ops`.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_emulated"
NAMESPACE = "crowdkernels_cuda_emulated"

# Every .cu of csrc/ runs through one wrapper here (which includes it); test_cuda_emulated.py checks that
# none is left out.
EMULATED_DIR = CSRC / "emulated"
SOURCES = ["runtime.cpp", "selftest_kernels.cpp", "density_emulated.cpp", "regions_emulated.cpp"]

_COMMON_FLAGS = ["-std=c++17", "-DCK_CUDA_EMULATION", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
VARIANTS = {
    # -O2: the tests run a few million fiber switches; the build takes about as long as with -O1
    "plain": dict(cflags=["-O2", *_COMMON_FLAGS], ldflags=[]),
    "asan": dict(
        cflags=["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address", *_COMMON_FLAGS],
        ldflags=["-fsanitize=address"],
    ),
}

# The timings of this process's builds (seconds), for the report and test output.
BUILD_SECONDS: dict[str, float] = {}


def cuda_sources() -> list[pathlib.Path]:
    return sorted(CSRC.glob("*/*_cuda.cu"))


def cuda_op_names() -> list[str]:
    """The ops that have a CUDA kernel: every m.impl("name", ...) of the .cu sources."""
    names = []
    for cu in cuda_sources():
        names += re.findall(r'm\.impl\(\s*"(\w+)"', cu.read_text())
    return names


def compiler_missing() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulation needs Linux (fibers, guard pages), this is {sys.platform}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH): the CUDA emulation is built from csrc/ at test time"
    from crowdkernels import _ext

    if not _ext.compiled():
        return "crowdkernels._C is not built: the emulated ops copy its schemas and share its poison flag"
    return None


def _promote_c_symbols() -> None:
    # The emulated kernels allocate outputs with ck::new_output, whose ck::poison_outputs() lives in
    # crowdkernels._C; Python loaded _C with RTLD_LOCAL, so reopen it RTLD_GLOBAL (RTLD_NOLOAD: the same copy)
    # for the emulation library's undefined reference to bind to it.
    from crowdkernels import _C

    ctypes.CDLL(_C.__file__, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)


_library = None  # the torch.library.Library holding the emulated schemas (kept alive)


def _define_schemas() -> None:
    global _library
    if _library is not None:
        return
    import crowdkernels  # noqa: F401  (loads _C and registers the real ops' fake kernels)

    _library = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name in cuda_op_names():
        schema = str(getattr(torch.ops.crowdkernels, name).default._schema)
        _library.define(schema.split("::", 1)[1])


def _register_python_parts(ops) -> None:
    for name in cuda_op_names():
        # the real op's fake kernel: called with fake tensors, the real op dispatches to it
        torch.library.register_fake(f"{NAMESPACE}::{name}", _real_op_caller(name), lib=_library)

    # The autograd formulas of crowdkernels/ops/regions.py, with the emulated backward kernels.
    from crowdkernels.ops.regions import register_regions_autograd

    register_regions_autograd(NAMESPACE, ops, lib=_library)


def _real_op_caller(name):
    def call(*args, **kwargs):
        return getattr(torch.ops.crowdkernels, name)(*args, **kwargs)

    return call


def build(variant: str = "plain", verbose: bool = False) -> None:
    """Builds (ninja: only what changed since the last build) and loads the emulation `variant` into this
    process. "asan" only loads where libasan was preloaded (see run_under_asan)."""
    from torch.utils import cpp_extension

    flags = VARIANTS[variant]
    directory = BUILD / variant
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env_preload = os.environ.pop("LD_PRELOAD", None)  # the compilers must not run under ASan
    try:
        cpp_extension.load(
            name=f"crowdkernels_cuda_emulated_{variant}",
            sources=[str(EMULATED_DIR / s) for s in SOURCES],
            extra_include_paths=[str(EMULATED_DIR), str(CSRC)],  # csrc/emulated first: its c10/cuda stand-ins
            extra_cflags=flags["cflags"],
            # -Bsymbolic: the library's own copies of the inline functions it shares with _C (compiled here
            # with other flags, ASan's) are the ones it calls; only ck::poison_outputs() comes from _C
            extra_ldflags=["-Wl,-Bsymbolic", *flags["ldflags"]],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload
    BUILD_SECONDS[variant] = time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _load(variant: str):
    _define_schemas()
    _promote_c_symbols()
    build(variant)
    ops = getattr(torch.ops, NAMESPACE)
    _register_python_parts(ops)
    return ops


def emulated_ops(variant: str = "plain"):
    """torch.ops.crowdkernels_cuda_emulated, built and loaded; pytest.skip with the reason where the emulation
    cannot be built (no C++ compiler, not Linux, crowdkernels._C missing). A build that fails (a compile
    error in a .cu) raises: it must fail the tests, not skip them."""
    reason = compiler_missing()
    if reason:
        pytest.skip(reason)
    return _load(variant)


def configure(seed: int = 0, max_grid: int = 0, max_block: int = 0) -> None:
    """The shuffling seed, and the largest grid (blocks) and block (threads, a power of two) a launch gets;
    0: as the source launches. Launch i after this call shuffles with (seed, i)."""
    getattr(torch.ops, NAMESPACE)._configure(seed, max_grid, max_block)


@contextlib.contextmanager
def emulation(seed: int = 0, max_grid: int = 0, max_block: int = 0):
    """`configure` for the duration of a with block, then back to what it was."""
    old = list(getattr(torch.ops, NAMESPACE)._config())
    configure(seed, max_grid, max_block)
    try:
        yield
    finally:
        configure(*old)


def kernel_counts() -> dict[tuple[str, str], int]:
    """Launches so far in this process, per kernel instantiation: (name as launched, signature) -> count."""
    out = {}
    for line in getattr(torch.ops, NAMESPACE)._kernel_counts().splitlines():
        name, signature, count = line.split("\t")
        out[(name, signature)] = int(count)
    return out


def _compiler_library(name: str) -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def asan_preload() -> str | None:
    """LD_PRELOAD for run_under_asan: the compiler's AddressSanitizer runtime, then its libstdc++ (loaded
    before anything throws, so that ASan's __cxa_throw interceptor finds the real one: Python itself does
    not link libstdc++), or None where there is no libasan."""
    asan, stdcxx = _compiler_library("libasan.so"), _compiler_library("libstdc++.so")
    return None if asan is None else " ".join(p for p in (asan, stdcxx) if p)


ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0:alloc_dealloc_mismatch=0"


def run_under_asan(code: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python with libasan preloaded (so torch's CPU allocations get redzones) and
    the "asan" emulation build loaded as `ops` (cuda_emulation's names imported too). Skips where no
    libasan exists. Returns the finished process (stdout, stderr, returncode)."""
    preload = asan_preload()
    if preload is None:
        pytest.skip("no AddressSanitizer runtime (c++ -print-file-name=libasan.so) to preload")
    prelude = (
        "import sys\n"
        f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "import torch\n"
        "from cuda_emulation import *\n"
        "ops = emulated_ops('asan')\n"
        "assert ops._asan_build()\n"
    )
    import crowdkernels

    # the crowdkernels this process imported (an installed one, or the checkout's with PYTHONPATH=.), first
    # on the path; run from build/, where no other crowdkernels/ lies
    paths = [str(pathlib.Path(crowdkernels.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=ASAN_OPTIONS, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    BUILD.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=timeout, cwd=BUILD
    )
