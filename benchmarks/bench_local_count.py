"""crowdkernels.local_counts (HMoDE sec. III-C: per-window sums of pred, target and their squared error)
against its plain-PyTorch reference (ops/reference.py) and the usual AvgPool2d formulation (three pools):
batch 8 of H x H maps, 1/8 windows (64 x 64 at 512 x 512), float32.

    PYTHONPATH=. python -m pytest benchmarks/bench_local_count.py --benchmark-json=/tmp/l.json
    python benchmarks/ratios.py /tmp/l.json
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import harness
from crowdkernels import local_counts
from crowdkernels.ops import reference

B = 8


def build(x, device, dtype):
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(B, 1, x, x, generator=g).to(device, dtype).requires_grad_()
    target = torch.rand(B, 1, x, x, generator=g).to(device, dtype)
    return pred, target


def avgpool_x3(pred, target):
    win = pred.shape[-1] // 8
    pool = lambda t: F.avg_pool2d(t, win, win, ceil_mode=True, divisor_override=1).flatten(1)  # noqa: E731
    return pool(pred), pool(target), pool((pred - target) ** 2)


OP = harness.Op(
    name="local_counts", x_name="H=W", build=build,
    sweep={"check": [64], "small": [128, 256], "full": [256, 512]},
    providers={
        "crowdkernels": lambda p, t: local_counts(p, t, (p.shape[-1] // 8,) * 2),
        "avgpool_x3": avgpool_x3,
        "reference": lambda p, t: reference.local_counts(p[:, 0], t[:, 0], p.shape[-1] // 8, p.shape[-1] // 8, True),
    },
    describe=lambda x: f"B={B} {x}x{x}, {x // 8}x{x // 8} windows", atol=1e-2,
)
test_local_counts = harness.bench(OP)
