"""How every Triton kernel of crowdkernels is launched: on the tensors' device, with pinned compile options, on
a one-dimensional grid.

- Device: Triton launches on the *current* CUDA device and its current stream. With inputs on `cuda:1` while
  the current device is 0, an unguarded launch would run on device 0 with device-1 pointers. `launch` enters
  the inputs' device first (`torch.cuda.device`), as ATen's device guards do.
- Compile options (`LAUNCH_OPTIONS`): `enable_fp_fusion=False`, so that `a * b + c` is a rounded product and
  a rounded sum, as numpy computes it under TRITON_INTERPRET=1 (the interpreter the CPU tests run) and as
  the C++ kernels compute it (GCC in ISO C++ mode does not contract either). With fusion the GPU would round
  once (FMA) where the tests round twice; every kernel here is memory-bound, so the FMAs bought nothing.
  Triton 3.9 warns when the option is left unset, and its default changes in 3.10: pinning it also makes the
  result independent of the Triton version. `num_warps` is pinned for the same reason (reproducible
  resource use; `benchmarks/RESULTS.md` lists registers and spills per kernel at these options).
- Grids: one axis only. CUDA caps grid axes 1 and 2 at 65,535 programs; axis 0 allows 2**31 - 1, and
  `flat_grid` checks that bound (a ValueError rather than a failed launch).

Every kernel is declared with `jit` below: all its runtime arguments in `do_not_specialize` (integers are not
specialized on == 1 or on divisibility by 16) and in `do_not_specialize_on_alignment` (pointers are not
specialized on 16-byte alignment). So there is one compiled variant per constexpr configuration,
whatever the sizes and alignments, so that the configurations compiled ahead of time in CI
(`crowdkernels.ops.triton.aot`, `pytest -m gpu_compile`) are all the GPU will ever run, and a new image size
never triggers a recompilation.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import triton
from torch.library import wrap_triton

__all__ = ["LAUNCH_OPTIONS", "MAX_GRID", "device_guard", "flat_grid", "jit", "launch"]

LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
MAX_GRID = 2**31 - 1  # programs along grid axis 0 (CUDA's limit)


def jit(fn):
    """`triton.jit` for a kernel (a function that is launched, not called by other kernels), with Triton's
    value specializations of its runtime arguments turned off (see the module's docstring)."""
    runtime = [name for name, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]
    return triton.jit(do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)(fn)


def device_guard(device: torch.device):
    """The context in which a launch for tensors on `device` must run: that CUDA device made current (and so
    its current stream), or nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def flat_grid(batch: int, per_image: int) -> tuple[int]:
    """The one-axis grid of `batch * per_image` programs (program p handles image p // per_image, piece
    p % per_image). Raises ValueError past CUDA's 2**31 - 1 programs."""
    programs = int(batch) * int(per_image)
    if programs > MAX_GRID:
        raise ValueError(
            f"the launch needs {batch} x {per_image} = {programs} programs, more than CUDA's {MAX_GRID} "
            f"on one grid axis: split the batch"
        )
    return (max(programs, 1),)


def launch(kernel, grid, device: torch.device, *args, **constexprs) -> None:
    """Runs `kernel[grid](*args, **constexprs)` through torch's `wrap_triton` (traceable by torch.compile),
    inside the device guard of `device` (the inputs' device) and with `LAUNCH_OPTIONS`."""
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **constexprs, **LAUNCH_OPTIONS)
