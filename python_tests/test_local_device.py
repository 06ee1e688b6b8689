"""crowdkernels.engine.distributed.local_device: the device `train --device ...` runs on, made current.

Triton kernels and `torch.cuda` streams use the *current* CUDA device; `--device cuda:1` must make device 1
current, or work on device-1 tensors would be launched on device 0. Checked without a GPU by recording the
calls to torch.cuda.set_device."""
from __future__ import annotations

import pytest
import torch

from crowdkernels.engine import distributed


@pytest.fixture
def set_device_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return calls


def test_a_cuda_device_with_an_index_is_made_current(set_device_calls):
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)
    assert set_device_calls == [torch.device("cuda", 1)]


@pytest.mark.parametrize("requested", ["cpu", "cuda", "meta"])
def test_other_devices_leave_the_current_device_alone(set_device_calls, requested):
    # "cuda" without an index means the current device: nothing to set.
    assert distributed.local_device(requested) == torch.device(requested)
    assert set_device_calls == []


def test_a_distributed_run_keeps_the_device_init_from_env_set(set_device_calls, monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.local_device("cuda") == torch.device("cuda", 2)
    assert distributed.local_device("cuda:3") == torch.device("cuda", 3)
    assert set_device_calls == []


def test_the_default_on_a_cuda_machine_is_cuda_local_rank(set_device_calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.local_device(None) == torch.device("cuda", 0)
    assert set_device_calls == [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device(None) == torch.device("cpu")
