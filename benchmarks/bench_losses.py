"""REL forward + backward (HMoDE eq. 2) at batch 8, 512x512: crowdkernels vs the authors' released
structure (func.py: three AvgPool2d passes, topk, a Python loop over the batch for gather and sort, the
hinge over the sub-lists; rewritten here from its description, device-agnostic).

    PYTHONPATH=. python -m pytest benchmarks/bench_losses.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crowdkernels import losses

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, W = 8, 512, 512


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


def crowdkernels_released_settings(pred, gt):
    return losses.relative_local_count_loss(pred, gt, region=16, pairs="all", edge="drop", reduction="sum")


def crowdkernels_paper_settings(pred, gt):
    return losses.relative_local_count_loss(pred, gt)  # 1/8 windows, eq. 2's adjacent pairs


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(B, 1, H, W, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    gt = torch.rand(B, 1, H, W, generator=g, dtype=dtype).to(DEVICE)
    return pred, gt


def _step(fn, pred, gt):
    def run():
        pred.grad = None
        loss = fn(pred, gt)
        loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    return run


@pytest.mark.benchmark(group="rel fwd+bwd, B=8, 512x512, region=16, pairs=all, edge=drop")
@pytest.mark.parametrize("impl", ["released_structure", "crowdkernels"])
def test_rel_released_settings(benchmark, impl):
    pred, gt = _inputs()
    fn = released_structure if impl == "released_structure" else crowdkernels_released_settings
    loss = benchmark(_step(fn, pred, gt))
    # Same loss and gradient as the other implementation (float32, random data: no ties).
    ref_pred = pred.detach().double().requires_grad_()
    other = crowdkernels_released_settings if impl == "released_structure" else released_structure
    ref = other(ref_pred, gt.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.grad.double(), ref_pred.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="rel fwd+bwd, B=8, 512x512, paper settings (1/8, adjacent, keep)")
def test_rel_paper_settings(benchmark):
    pred, gt = _inputs()
    loss = benchmark(_step(crowdkernels_paper_settings, pred, gt))
    assert torch.isfinite(loss)
