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
    """(seconds of one baseline call, median seconds of `kernel_reps` kernel calls made right after it)."""
    t0 = time.perf_counter()
    baseline()
    tb = time.perf_counter() - t0
    tk = []
    for _ in range(kernel_reps):
        t0 = time.perf_counter()
        kernel()
        tk.append(time.perf_counter() - t0)
    return tb, statistics.median(tk)


def paired_ratio(baseline, kernel, pairs: int, kernel_reps: int) -> float:
    """The speed-up of `kernel` over `baseline`, timed side by side: the median over `pairs` pairs of
    (one baseline call) / (the median of `kernel_reps` kernel calls made right after it).

    This VM has slow spells lasting seconds in which everything runs up to 2x slower. Two benchmarks timed
    one after the other can fall on either side of a spell; a pair is timed within a second or so, so
    both halves see the same machine. Reported as extra_info["paired_ratio"] beside the usual medians.
    """
    return statistics.median(tb / tk for tb, tk in (timed_pair(baseline, kernel, kernel_reps) for _ in range(pairs)))
