"""Shared helpers for the benchmarks: real samples from ../shared/data (skipped when absent)."""
from __future__ import annotations

import os
import pathlib
import statistics
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def require_data(*parts: str) -> pathlib.Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real benchmark samples not found at {path} (../shared/data beside the checkout; set CROWDKERNELS_SHARED)")
    return path


def timed_pair(baseline, kernel, kernel_reps: int) -> tuple[float, float]:
    """(seconds of one baseline call, mean seconds of a kernel call), timed side by side: `kernel_reps`
    kernel calls, half of them right before the baseline call and half right after it, so that the kernel
    samples the machine on both sides of the baseline. Means on both sides: a baseline call is one sample
    of its own mean, and a median of the kernel calls would drop the hiccups that the baseline keeps."""
    def kernel_block(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            kernel()
        return time.perf_counter() - t0

    before = kernel_block(kernel_reps // 2)
    t0 = time.perf_counter()
    baseline()
    tb = time.perf_counter() - t0
    after = kernel_block(kernel_reps - kernel_reps // 2)
    return tb, (before + after) / kernel_reps


def paired_ratio(baseline, kernel, pairs: int, kernel_reps: int) -> float:
    """The speed-up of `kernel` over `baseline`, timed side by side: the median over `pairs` pairs of
    (one baseline call) / (the mean kernel call around it, see timed_pair).

    This VM has slow spells lasting seconds in which each of its two vCPUs runs 1.5-2x slower, whatever the
    code (pure Python and L1-resident loops alike). Two benchmarks timed one after the other can fall on
    either side of a spell; a pair is timed within a second or so, so both halves see the same machine.
    Reported as extra_info["paired_ratio"] beside the usual medians.
    """
    return statistics.median(tb / tk for tb, tk in (timed_pair(baseline, kernel, kernel_reps) for _ in range(pairs)))
