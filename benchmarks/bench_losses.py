"""REL forward + backward (HMoDE eq. 2), batch 8 of H x H maps: crowdkernels against the authors' released
structure (func.py: three AvgPool2d passes, topk, a Python loop over the batch for gather and sort, the
hinge over the sub-lists; rewritten here from its description, device-agnostic) and against the plain
reference (ops/reference.py: its local counts, then eq. 2 image by image).

    PYTHONPATH=. python -m pytest benchmarks/bench_losses.py --benchmark-json=/tmp/r.json
    python benchmarks/ratios.py /tmp/r.json
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import harness
from crowdkernels import losses
from crowdkernels.ops import reference

B = 8
SWEEP = {"check": [64], "small": [128, 256], "full": [256, 512]}


def released_structure(pred, gt, patch=16, k=9):
    pool = torch.nn.AvgPool2d(kernel_size=patch, stride=patch)
    err = pool(F.mse_loss(pred, gt, reduction="none")).flatten(1) * patch ** 2        # pass 1: error map
    hard = torch.topk(err.detach(), k, dim=-1, largest=True, sorted=True).indices
    pc = pool(pred).flatten(1) * patch ** 2                                            # pass 2: pred counts
    tc = pool(gt).flatten(1) * patch ** 2                                              # pass 3: gt counts
    rows = []
    for b in range(pred.shape[0]):                                                      # per-image gather + sort
        x, t = pc[b, hard[b]], tc[b, hard[b]]
        rows.append(x[torch.sort(t, descending=True).indices])
    ranked = torch.stack(rows)
    loss = 0.0
    for i in range(3):                                                                  # every pair of each sub-list
        s = ranked[:, i::3]
        loss = loss + torch.relu(s[:, 1] - s[:, 0]) + torch.relu(s[:, 2] - s[:, 0]) + torch.relu(s[:, 2] - s[:, 1])
    return loss.sum()


def reference_rel(pred, target, region=0.125, num_hard=9, num_sublists=3, pairs="adjacent", edge="keep",
                  reduction="mean"):
    """losses.relative_local_count_loss's signature, composed from the references."""
    H, W = pred.shape[-2:]
    rh, rw = (region, region) if isinstance(region, int) else (math.ceil(H * region), math.ceil(W * region))
    counts = reference.local_counts(pred[:, 0], target[:, 0], rh, rw, edge == "keep")
    per_image = reference.relative_local_count_loss(*counts, num_hard, num_sublists, pairs)
    return per_image.mean() if reduction == "mean" else per_image.sum()


def build(x, device, dtype):
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(B, 1, x, x, generator=g).to(device, dtype).requires_grad_()
    gt = torch.rand(B, 1, x, x, generator=g).to(device, dtype)
    return pred, gt


RELEASED = dict(region=16, pairs="all", edge="drop", reduction="sum")
test_rel_released_settings = harness.bench(harness.Op(
    name="rel_released_settings", x_name="H=W", build=build, sweep=SWEEP,
    providers={
        "released_structure": released_structure,
        "crowdkernels": lambda p, t: losses.relative_local_count_loss(p, t, **RELEASED),
        "reference": lambda p, t: reference_rel(p, t, **RELEASED),
    },
    describe=lambda x: f"B={B} {x}x{x}, 16x16 windows, all pairs, drop", baseline="released_structure",
))
test_rel_paper_settings = harness.bench(harness.Op(
    name="rel_paper_settings", x_name="H=W", build=build, sweep=SWEEP,
    providers={"crowdkernels": losses.relative_local_count_loss, "reference": reference_rel},
    describe=lambda x: f"B={B} {x}x{x}, 1/8 windows, adjacent pairs, keep",
))
