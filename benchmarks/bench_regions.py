"""L2SM region zoom, forward + backward, at L2SM shapes: 4 x 512 x 64 x 64 features, 24 regions of 16 x 16
(6 per image, on the 4 x 4 grid), r uniform in [1, 2.5], a 40 x 40 canvas, float32.

- crowdkernels: `scale_regions` (gradients to features and to r);
- loop: the naive per-region F.interpolate(scale_factor=r) + F.pad, stacked (gradient to features only:
  F.interpolate's scale_factor is a Python float, so r gets none);
- grid_sample: one batched F.grid_sample over the gathered 16 x 16 crops, with the same sampling grid
  (border padding for the clamp, a mask for the valid part; gradients to features and to r).

And `unscale_regions` (24 one-channel 40 x 40 re-predictions put back into 4 x 1 x 64 x 64) against its
per-region loop.

    PYTHONPATH=. python -m pytest benchmarks/bench_regions.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crowdkernels as ck

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, H, W = 4, 512, 64, 64
K, PER_IMAGE, CANVAS = 4, 6, 40


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, H, W, generator=g).to(DEVICE)
    grid = ck.grid_boxes(H, W, K)
    rows = []
    for b in range(B):
        chosen = torch.randperm(K * K, generator=g)[:PER_IMAGE]
        rows.append(torch.cat([torch.full((PER_IMAGE, 1), b), grid[chosen]], 1))
    boxes = torch.cat(rows).to(DEVICE)
    scale = (1.0 + 1.5 * torch.rand(boxes.shape[0], generator=g)).to(DEVICE)
    grad = torch.randn(boxes.shape[0], C, CANVAS, CANVAS, generator=g).to(DEVICE)
    return features, boxes, scale, grad


def crowdkernels_zoom(features, boxes, scale):
    return ck.scale_regions(features, boxes, scale, CANVAS)


def loop_zoom(features, boxes, scale):
    out = []
    for (b, y0, x0, h, w), r in zip(boxes.tolist(), scale.tolist()):
        z = F.interpolate(
            features[b : b + 1, :, y0 : y0 + h, x0 : x0 + w],
            scale_factor=r,
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )[:, :, :CANVAS, :CANVAS]
        out.append(F.pad(z, (0, CANVAS - z.shape[3], 0, CANVAS - z.shape[2])))
    return torch.cat(out)


def grid_sample_zoom(features, boxes, scale):
    """All boxes must share one size here (16 x 16): the crops are gathered with one advanced index."""
    b, y0, x0, h, w = boxes.unbind(1)
    hh, ww = int(h[0]), int(w[0])
    rows = y0[:, None] + torch.arange(hh, device=features.device)  # [N, h]
    cols = x0[:, None] + torch.arange(ww, device=features.device)  # [N, w]
    crops = features.permute(0, 2, 3, 1)[b[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    d = torch.arange(CANVAS, device=features.device, dtype=features.dtype) + 0.5
    # src = (d + 0.5)/r - 0.5 in pixels; grid_sample(align_corners=False) reads x_norm = (src + 0.5) * 2/w - 1
    gy = (d[None] / scale[:, None]) * (2.0 / hh) - 1  # [N, S]
    gx = (d[None] / scale[:, None]) * (2.0 / ww) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [N, S, S, 2] (x, y)
    out = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
    vh = torch.floor(scale * hh)
    vw = torch.floor(scale * ww)
    idx = torch.arange(CANVAS, device=features.device)
    mask = (idx[None, :, None] < vh[:, None, None]) & (idx[None, None, :] < vw[:, None, None])
    return out * mask[:, None].to(out.dtype)


ZOOMS = {"crowdkernels": crowdkernels_zoom, "loop": loop_zoom, "grid_sample": grid_sample_zoom}


def _fwd_bwd(fn, features, boxes, scale, grad):
    def run():
        features.grad = None
        scale.grad = None
        out = fn(features, boxes, scale)
        out.backward(grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", list(ZOOMS))
def test_scale_regions_fwd_bwd(benchmark, impl):
    benchmark.group = "scale_regions fwd+bwd 4x512x64x64, 24 boxes 16x16, r in [1, 2.5], canvas 40"
    features, boxes, scale, grad = _inputs()
    features.requires_grad_()
    scale.requires_grad_(impl != "loop")
    out = benchmark.pedantic(_fwd_bwd(ZOOMS[impl], features, boxes, scale, grad), rounds=1 if benchmark.disabled else 7, warmup_rounds=0 if benchmark.disabled else 1)
    # Every implementation computes the same thing.
    reference = crowdkernels_zoom(features.detach(), boxes, scale.detach())
    torch.testing.assert_close(out.detach(), reference, rtol=1e-4, atol=1e-4)


def _unscale_loop(pred, boxes, scale, base):
    out = base.clone()
    for n, ((b, y0, x0, h, w), r) in enumerate(zip(boxes.tolist(), scale.tolist())):
        vh, vw = min(math.floor(r * h), CANVAS), min(math.floor(r * w), CANVAS)
        # F.interpolate to the box size would resample with (vh / h), not r; the grid keeps r exactly.
        d = torch.arange(h, device=pred.device, dtype=pred.dtype) + 0.5
        gy = (d * r) * (2.0 / vh) - 1
        gx = (torch.arange(w, device=pred.device, dtype=pred.dtype) + 0.5) * r * (2.0 / vw) - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        valid = pred[n : n + 1, :, :vh, :vw]
        out[b, :, y0 : y0 + h, x0 : x0 + w] = r * r * F.grid_sample(valid, grid, padding_mode="border", align_corners=False)[0]
    return out


@pytest.mark.parametrize("impl", ["crowdkernels", "loop"])
def test_unscale_regions_fwd_bwd(benchmark, impl):
    benchmark.group = "unscale_regions fwd+bwd 24 x 1 x 40x40 into 4x1x64x64"
    features, boxes, scale, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(boxes.shape[0], 1, CANVAS, CANVAS, generator=g).to(DEVICE).requires_grad_()
    base = torch.rand(B, 1, H, W, generator=g).to(DEVICE).requires_grad_()
    grad = torch.randn(B, 1, H, W, generator=g).to(DEVICE)
    fn = ck.unscale_regions if impl == "crowdkernels" else _unscale_loop

    def run():
        pred.grad = base.grad = None
        out = fn(pred, boxes, scale, base)
        out.backward(grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 20, warmup_rounds=0 if benchmark.disabled else 2)
    torch.testing.assert_close(out.detach(), ck.unscale_regions(pred.detach(), boxes, scale, base.detach()), rtol=1e-4, atol=1e-5)
