"""crowdkernels.local_counts forward + backward against its plain-PyTorch reference (ops/reference.py)
and against the usual AvgPool2d formulation (three pools), at batch 8, 512x512, 1/8 windows.

    PYTHONPATH=. python -m pytest benchmarks/bench_local_count.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crowdkernels import local_counts
from crowdkernels.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, W = 8, 512, 512
WIN = 64


def avgpool_counts(pred, target):
    pool = lambda x: F.avg_pool2d(x, WIN, WIN, ceil_mode=True, divisor_override=1).flatten(1)  # noqa: E731
    return pool(pred), pool(target), pool((pred - target) ** 2)


def reference_counts(pred, target):
    return reference.local_counts(pred[:, 0], target[:, 0], WIN, WIN, True)


def kernel_counts(pred, target):
    return local_counts(pred, target, (WIN, WIN))


IMPLS = {"crowdkernels": kernel_counts, "avgpool x3": avgpool_counts, "reference": reference_counts}


@pytest.mark.benchmark(group="local_counts fwd+bwd, B=8, 512x512, 64x64 windows, float32")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_local_counts(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(B, 1, H, W, generator=g).to(DEVICE).requires_grad_()
    target = torch.rand(B, 1, H, W, generator=g).to(DEVICE)
    weights = [torch.randn(B, (H // WIN) ** 2, generator=g).to(DEVICE) for _ in range(3)]

    def run():
        pred.grad = None
        out = IMPLS[impl](pred, target)
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    want = avgpool_counts(pred.detach().double(), target.double())
    for o, w in zip(out, want):
        torch.testing.assert_close(o.double(), w, rtol=1e-4, atol=1e-2)
