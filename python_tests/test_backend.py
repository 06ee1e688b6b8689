"""One backend decision, `crowdkernels._ext.backend(device, op)`: what it answers for every op and device, and
that every public op really runs where it answers (the compiled op, never the reference, and the other way
round)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import density as D
from crowdkernels.ops import reference

needs_compiled = pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CPP_OPS = ("knn_sigma", "density_prepare", "density_splat", "density_adaptive", "scale_regions", "unscale_regions",
           "local_counts", "gating_forward")
CUDA_KERNELS = ("knn_sigma", "density_splat", "scale_regions", "unscale_regions")  # csrc/*/*_cuda.cu


def _points():
    return torch.tensor([[3.5, 4.0], [10.2, 7.7], [12.0, 12.5], [5.0, 14.0]], dtype=torch.float64)


def _regions_args():
    features = torch.rand(1, 2, 8, 9, dtype=torch.float64)
    boxes = torch.tensor([[0, 1, 1, 3, 4], [0, 5, 5, 3, 3]])
    return features, boxes, torch.tensor([1.5, 2.0], dtype=torch.float64)


# op -> (a call of the public function that runs it, the reference it runs where the op has no kernel)
CALLS = {
    "knn_sigma": (lambda: ck.knn_sigma(_points()), (reference, "knn_sigma_reference")),
    "density_prepare": (lambda: ck.density_maps([_points()], (16, 16), sigma=2.0), (D, "_prepare_vectorized")),
    "density_splat": (lambda: ck.density_maps([_points()], (16, 16), sigma=2.0), (reference, "_splat_reference")),
    # without the fused kernel, density_maps runs prepare, kNN and splat in turn
    "density_adaptive": (lambda: ck.density_maps([_points()], (16, 16)), (D, "_knn_sigma")),
    "scale_regions": (lambda: ck.scale_regions(*_regions_args(), 8), (reference, "scale_regions_reference")),
    "unscale_regions": (
        lambda: ck.unscale_regions(torch.rand(2, 2, 8, 8, dtype=torch.float64), _regions_args()[1],
                                   _regions_args()[2], torch.rand(1, 2, 8, 9, dtype=torch.float64)),
        (reference, "unscale_regions_reference"),
    ),
    "local_counts": (lambda: ck.local_counts(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), 4),
                     (reference, "local_counts")),
    "gating_forward": (
        lambda: ck.hierarchical_gating([torch.rand(1, 1, 4, 4, dtype=torch.float64) for _ in range(3)],
                                       torch.randn(1, 6, 2, 2, dtype=torch.float64),
                                       torch.randn(1, 3, 2, 2, dtype=torch.float64)),
        (reference, "hierarchical_gating"),
    ),
}


@contextlib.contextmanager
def _counting(monkeypatch, op):
    """Counts the calls of torch.ops.crowdkernels.<op> and of the reference `op` falls back to."""
    calls = {"op": 0, "reference": 0}
    real_op = getattr(torch.ops.crowdkernels, op)
    module, name = CALLS[op][1]
    real_ref = getattr(module, name)

    def op_spy(*args):
        calls["op"] += 1
        return real_op(*args)

    def ref_spy(*args, **kwargs):
        calls["reference"] += 1
        return real_ref(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch.ops.crowdkernels, op, op_spy)
        mp.setattr(module, name, ref_spy)
        yield calls


@needs_compiled
@pytest.mark.parametrize("op", CPP_OPS)
def test_cpu_tensors_run_the_cpp_kernel(op):
    assert _ext.backend(CPU, op) == "cpu"


@needs_compiled
@pytest.mark.parametrize("op", CPP_OPS)
def test_each_op_runs_where_backend_says(monkeypatch, op):
    call = CALLS[op][0]
    with _counting(monkeypatch, op) as calls:
        call()
    assert calls == {"op": 1, "reference": 0}
    real = _ext.backend
    monkeypatch.setattr(_ext, "backend", lambda device, name: "reference" if name == op else real(device, name))
    with _counting(monkeypatch, op) as calls:
        call()
    assert calls["op"] == 0 and calls["reference"] >= 1


def test_without_the_extension_everything_runs_the_reference(monkeypatch):
    monkeypatch.setattr(_ext, "compiled", lambda: False)
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    for op in CPP_OPS:
        assert _ext.backend(CPU, op) == "reference"
        assert _ext.backend(torch.device("meta"), op) == "reference"


def test_a_kernel_missing_from_the_build_falls_back_to_the_reference(monkeypatch):
    """A partial or stale `_C`: an op without a kernel for the device runs the reference."""
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: op != "density_splat")
    assert _ext.backend(CPU, "density_splat") == "reference"
    assert _ext.backend(CPU, "knn_sigma") == ("cpu" if _ext.compiled() else "reference")


@pytest.mark.parametrize("triton_runs", [True, False])
@pytest.mark.parametrize("registered", [True, False])
def test_gpu_decision(monkeypatch, triton_runs, registered):
    """On a GPU: the CUDA kernel where the build has one, Triton for the Triton ops where Triton runs and their
    op registered, else the reference (never the CUDA C++ path for a Triton op, never Triton for another)."""
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: (key == "CUDA" and op in CUDA_KERNELS)
                        or (registered and op.endswith("_triton") and key == "CompositeExplicitAutograd"))
    monkeypatch.setattr(_ext, "triton_available", lambda: triton_runs)
    for op in CPP_OPS:
        if op in _ext.TRITON_OPS:
            want = "triton" if triton_runs and registered else "reference"
        else:
            want = "cuda" if op in CUDA_KERNELS else "reference"
        assert _ext.backend(CUDA, op) == want, op
        assert _ext.backend(torch.device("cuda", 1), op) == want, op
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    assert all(_ext.backend(CUDA, op) == "reference" for op in CUDA_KERNELS)


def test_triton_ops_are_registered_when_triton_imports():
    from crowdkernels.ops import gating, local_count

    for op, module in (("local_counts", local_count.triton_local_count), ("gating_forward", gating.triton_gating)):
        assert (module is not None) == _ext._has_kernel(f"{op}_triton", "CompositeExplicitAutograd")
        # CPU tensors never take the Triton path of a public op, even under TRITON_INTERPRET=1.
        assert _ext.backend(CPU, op) in ("cpu", "reference")
