"""L2SM region zoom, at L2SM shapes: B x C x 64 x 64 features (4 x 512 at the paper's), 6 regions of 16 x 16
per image on the 4 x 4 grid, r uniform in [1, 2.5], a 40 x 40 canvas, float32.

`scale_regions`, over C:
- crowdkernels: `scale_regions` (gradients to features and to r);
- loop: the naive per-region F.interpolate(scale_factor=r) + F.pad, stacked (gradient to features only:
  F.interpolate's scale_factor is a Python float, so r gets none); the issue's baseline. It is timed, not
  checked: where r < 17/16, F.interpolate returns the 16 x 16 crop unscaled (its output size equals its
  input's), so on such draws it differs from the others;
- grid_sample: one batched F.grid_sample over the gathered 16 x 16 crops, with the same sampling grid
  (border padding for the clamp, a mask for the valid part; gradients to features and to r);
- reference: ops/reference.py, region by region.

`unscale_regions` (the one-channel 40 x 40 re-predictions put back into B x 1 x 64 x 64), over B, against
its per-region loop and the reference.

    PYTHONPATH=. python -m pytest benchmarks/bench_regions.py --benchmark-json=/tmp/z.json
    python benchmarks/ratios.py /tmp/z.json
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import crowdkernels as ck
import harness
from crowdkernels.ops import reference

H, W = 64, 64
K, PER_IMAGE, CANVAS = 4, 6, 40


def _boxes(b, g, device):
    grid = ck.grid_boxes(H, W, K)
    rows = [torch.cat([torch.full((PER_IMAGE, 1), i), grid[torch.randperm(K * K, generator=g)[:PER_IMAGE]]], 1)
            for i in range(b)]
    boxes = torch.cat(rows)
    return boxes.to(device), (1.0 + 1.5 * torch.rand(boxes.shape[0], generator=g))


def build_zoom(c, device, dtype):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, c, H, W, generator=g).to(device, dtype).requires_grad_()
    boxes, scale = _boxes(4, g, device)
    return features, boxes, scale.to(device, dtype).requires_grad_()


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


def build_unzoom(b, device, dtype):
    g = torch.Generator().manual_seed(0)
    boxes, scale = _boxes(b, g, device)
    pred = torch.rand(boxes.shape[0], 1, CANVAS, CANVAS, generator=g).to(device, dtype).requires_grad_()
    base = torch.rand(b, 1, H, W, generator=g).to(device, dtype).requires_grad_()
    return pred, boxes, scale.to(device, dtype), base


def loop_unzoom(pred, boxes, scale, base):
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


test_scale_regions = harness.bench(harness.Op(
    name="scale_regions", x_name="C", build=build_zoom,
    sweep={"check": [8], "small": [64, 128], "full": [128, 512]},
    providers={
        "crowdkernels": lambda f, b, s: ck.scale_regions(f, b, s, CANVAS),
        "loop": loop_zoom,
        "grid_sample": grid_sample_zoom,
        "reference": lambda f, b, s: reference.scale_regions_reference(f, b, s, (CANVAS, CANVAS)),
    },
    describe=lambda c: f"4x{c}x64x64, 24 boxes 16x16, canvas 40", baseline="loop",
    checks={"crowdkernels": "reference", "grid_sample": "reference"},
))
test_unscale_regions = harness.bench(harness.Op(
    name="unscale_regions", x_name="B", build=build_unzoom,
    sweep={"check": [2], "small": [4, 16], "full": [4, 32]},
    providers={"crowdkernels": ck.unscale_regions, "loop": loop_unzoom,
               "reference": reference.unscale_regions_reference},
    describe=lambda b: f"{PER_IMAGE * b} x 1 x 40x40 into {b}x1x64x64", baseline="loop", atol=1e-5,
))
