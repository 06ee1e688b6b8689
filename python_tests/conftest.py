"""Shared fixtures: the devices to run on, and the real benchmark samples in ../shared/data."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def require_data(*parts: str) -> pathlib.Path:
    """The path ../shared/data/<parts>, or a skip saying why the real samples are not there."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"real benchmark samples not found at {path}: they live in ../shared/data beside the "
            "checkout (set CROWDKERNELS_SHARED to another shared/ folder)"
        )
    return path


@pytest.fixture
def shared_data() -> pathlib.Path:
    return require_data()
