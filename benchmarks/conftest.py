"""The benchmarks' pytest wiring: the harness's sweeps as parametrized cases, and the real samples from
../shared/data (skipped when absent)."""
from __future__ import annotations

import os
import pathlib

import pytest

import harness

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def pytest_addoption(parser):
    parser.addoption("--bench-sweep", choices=("small", "full"), default="full",
                     help="the sizes each benchmarks/bench_*.py op runs at: small, or full (default; the issues' "
                          "shapes); --benchmark-disable runs the check sizes once")


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.function, "bench_op", None)
    if op is None:
        return
    config = metafunc.config
    sweep = "check" if config.getoption("benchmark_disable") else config.getoption("bench_sweep")
    found = harness.cases(op, sweep, float(config.getoption("benchmark_max_time")))
    metafunc.parametrize("case", found, ids=[c.id for c in found])


def require_data(*parts: str) -> pathlib.Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real benchmark samples not found at {path} (../shared/data beside the checkout; set CROWDKERNELS_SHARED)")
    return path
