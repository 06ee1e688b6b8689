"""Shared fixtures: the devices to run on, and the real benchmark samples in ../shared/data."""
from __future__ import annotations

import os
import pathlib
import tempfile

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: where Python subprocesses of the tests run: not the checkout, which `python -c` and `python -m` would put
#: first on sys.path, so that a fresh checkout's sources (without the built _C) would shadow the package
CHILD_CWD = tempfile.gettempdir()


def child_env(**extra) -> dict:
    """The environment for a Python subprocess that must import the crowdkernels this process imported (the
    installed package, or a checkout with its built _C): that package's folder first on PYTHONPATH. Run the
    child with ``cwd=CHILD_CWD``."""
    import crowdkernels

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(crowdkernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


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
