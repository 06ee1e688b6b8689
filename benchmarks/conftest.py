"""Shared helpers for the benchmarks: real samples from ../shared/data (skipped when absent)."""
from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def require_data(*parts: str) -> pathlib.Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real benchmark samples not found at {path} (../shared/data beside the checkout; set CROWDKERNELS_SHARED)")
    return path
