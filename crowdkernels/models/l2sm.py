"""L2SM: SPN + the learning-to-scale module (Xu et al., "Learn to Scale", ICCV 2019, sec. 3.3, 3.4 and 4.2)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import MultipolarCenterLoss, assign_centers, fit_density_levels
from ..losses.center import NORMS, quantile_levels
from ..ops.density import knn_sigma
from ..ops.regions import grid_boxes, region_means, scale_regions, transform_region_targets, unscale_regions
from ._common import (channels, check_images, check_targets, check_width, conv_stack, density_at, he_init, init_normal_,
                      out_size, pad_to_multiple)
from .conventions import Conventions, DensityModel
from .registry import register_model
from .spn import SPN


@dataclass
class L2SMOutput:
    """What `L2SM.forward` returns (maps in people per output cell, stride 4).

    final: [B, 1, ceil(H/4), ceil(W/4)], the initial density with the selected regions replaced by their
        re-predictions (unscaled by 1/r, times r^2).
    initial: the same grid, SPN's density D-hat.
    scale: [B, 1, K, K], the scale map r (every region's ratio, selected or not).
    region_means: [B, K*K], D_i, the mean initial density of each region (on the padded grid).
    center_index: [B, K*K] int64, the density level (0..C-1) of each selected region, -1 elsewhere.
    boxes: [N, 5] int64 (b, y0, x0, h, w), the selected regions on the padded stride-4 grid.
    region_scale: [N], their r.
    repredictions: [N, 1, Sh, Sw], D-hat'_i on the zoomed canvas (valid part floor(r h) x floor(r w)).
    """

    final: torch.Tensor
    initial: torch.Tensor
    scale: torch.Tensor
    region_means: torch.Tensor
    center_index: torch.Tensor
    boxes: torch.Tensor
    region_scale: torch.Tensor
    repredictions: torch.Tensor


@register_model("l2sm", rank=2)
class L2SM(DensityModel):
    """SPN + the learning-to-scale module.

    - The padded stride-4 density grid is split into K x K regions (`grid_boxes`); D_i = `region_means`.
    - Dense regions are selected by density levels (sec. 4.2): `fit_levels` splits a dataset's region means
      into G = `num_groups` levels (`fit_density_levels`, kept in the `density_levels` buffer) and the densest
      C = `num_centers` levels are selected and assigned to the C centres (`assign_centers`). Until
      `fit_levels` is called, the levels are the quantiles of the current batch's region means (so the densest
      C/G of the batch's regions are selected).
    - The scale map r: the five pooled pyramid features resized to K x K (adaptive average pooling for the
      16^2, 8^2 levels, bilinear for 2^2, 1^2), concatenated, a 1x1 conv, then the positive mapping
      r = 1 + (max_scale - 1) * sigmoid(z), so every region is zoomed in by a factor in (1, max_scale).
    - The conv5_3 features of each selected region are zoomed (`scale_regions`, by 2r on the stride-8
      features, so that the canvas is the stride-4 region zoomed by r), five convs (3x3 256, 128, 64, 32 +
      ReLU, 1x1 -> 1) re-predict the density there, and `unscale_regions` puts it back with r^2, replacing
      the initial prediction.

    Input sizes: zero-padded at the bottom/right to a multiple of 8K (the K x K division of the stride-8
    features then matches the stride-4 grid's exactly); the outputs are cropped to ceil(H/4) x ceil(W/4).

    Parameters (width 1, K = 4, P = 64): 19,417,475 (SPN 17,849,921 + the scale conv 321 + the re-prediction
    convs 1,567,233); the paper reports none.

    Args:
        pretrained, width, pyramid_channels: as `SPN`.
        k: K (4 in the paper).
        num_groups: G (5); num_centers: C (3; 5 on UCF_CC_50).
        max_scale: the upper bound of r (2).
        init: the layers outside the pretrained encoder: "normal" (N(0, 0.01) weights, zero biases: the
            released HMoDE and CSRNet code), "he" (Kaiming), or "auto" (normal over a `pretrained` encoder, He
            over a random one; see `init_normal_`).
    """

    def __init__(self, pretrained=None, *, width: float = 1.0, pyramid_channels: int = 64, k: int = 4,
                 num_groups: int = 5, num_centers: int = 3, max_scale: float = 2.0, init: str = "auto"):
        super().__init__()
        width = check_width(width)
        scratch = he_init(init, pretrained)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        if not isinstance(num_centers, int) or not 1 <= num_centers <= num_groups:
            raise ValueError(f"num_centers must be an int in 1..num_groups={num_groups}, got {num_centers!r}")
        if not float(max_scale) > 1:
            raise ValueError(f"max_scale must be > 1, got {max_scale!r}")
        self.k, self.num_groups, self.num_centers, self.max_scale = k, num_groups, num_centers, float(max_scale)
        # ImageNet mean/std (the pretrained VGG's), people per cell at stride 4; the input padded to 8K
        self.conventions = Conventions(stride=4, forward_multiple=8 * k)
        self.spn = SPN(pretrained, width=width, pyramid_channels=pyramid_channels, init=init)
        p = self.spn.pyramid_channels
        self.scale_conv = nn.Conv2d(5 * p, 1, 1)
        c5 = self.spn.backbone.stage_channels[-1]
        self.repredict = conv_stack([c5] + [channels(n, width) for n in (256, 128, 64, 32)])
        self.repredict.append(nn.Conv2d(channels(32, width), 1, 1))
        init_normal_(self.scale_conv, from_scratch=scratch)
        init_normal_(self.repredict, from_scratch=scratch)
        self.register_buffer("density_levels", torch.zeros(num_groups - 1, dtype=torch.float64))
        self.register_buffer("levels_fitted", torch.tensor(False))

    # ----------------------------------------------------------------------------------------- levels

    @torch.no_grad()
    def fit_levels(self, source) -> torch.Tensor:
        """Fits the G density levels over a dataset (sec. 4.2) and stores them in `density_levels`.

        `source` is a tensor of region means (any shape, people per stride-4 cell, e.g. collected with
        `ground_truth_region_means`), or an iterable of batches: a dict with "density" [B,1,H,W]
        (full-resolution ground truth, people per pixel: multiplied by `density_scale` here, so that the
        levels are in the predictions' units), a (images, targets) pair with such a dict, or the density
        tensor. Returns the thresholds."""
        if isinstance(source, torch.Tensor):
            means = source
        else:
            collected = []
            for batch in source:
                if isinstance(batch, (list, tuple)):
                    batch = batch[-1]
                if isinstance(batch, dict):
                    batch = batch["density"]
                collected.append(self.ground_truth_region_means(batch).flatten() * self.density_scale)
            if not collected:
                raise ValueError("source yielded no batch")
            means = torch.cat(collected)
        levels = fit_density_levels(means, self.num_groups)
        self.density_levels.copy_(levels.to(self.density_levels))
        self.levels_fitted.fill_(True)
        return levels

    def ground_truth_region_means(self, density: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] full-resolution density -> [B, K*K] region means on the model's padded stride-4 grid."""
        H, W = density.shape[-2:]
        m = self.forward_multiple
        hp, wp = -(-H // m) * m, -(-W // m) * m
        return region_means(density_at(density, self.stride, (hp // self.stride, wp // self.stride)), self.k)

    # ---------------------------------------------------------------------------------------- forward

    def _scale_map(self, pooled) -> torch.Tensor:
        k = self.k
        resized = [F.adaptive_avg_pool2d(q, k) if q.shape[-1] >= k
                   else F.interpolate(q, size=(k, k), mode="bilinear", align_corners=False) for q in pooled]
        z = self.scale_conv(torch.cat(resized, dim=1))
        return 1.0 + (self.max_scale - 1.0) * torch.sigmoid(z)

    def forward(self, images: torch.Tensor) -> L2SMOutput:
        images = check_images(images)
        h, w = out_size(images.shape[-2:], self.stride)
        initial, conv5, pooled = self.spn.run(pad_to_multiple(images, self.forward_multiple))
        scale = self._scale_map(pooled)                                    # [B, 1, K, K]
        if torch.compiler.is_exporting():
            return self._forward_every_region(initial, conv5, scale, h, w)
        B, _, H4, W4 = initial.shape
        k = self.k
        means = region_means(initial, k)                                   # [B, K*K]
        levels = self.density_levels if bool(self.levels_fitted) else fit_density_levels(means, self.num_groups)
        selected, center_index = assign_centers(means, levels, self.num_centers)
        b, region = selected.nonzero(as_tuple=True)
        r = scale.flatten(1)[b, region]
        grid4 = grid_boxes(H4, W4, k).to(initial.device)
        grid8 = grid_boxes(conv5.shape[-2], conv5.shape[-1], k).to(initial.device)
        boxes4 = torch.cat([b[:, None], grid4[region]], dim=1)
        boxes8 = torch.cat([b[:, None], grid8[region]], dim=1)
        canvas = self.canvas_size(H4, W4)
        if b.numel():
            zoomed = scale_regions(conv5, boxes8, 2.0 * r, canvas)
            repred = self.repredict(zoomed)
            final = unscale_regions(repred, boxes4, r, initial)
        else:
            repred = initial.new_zeros(0, 1, *canvas)
            final = initial
        return L2SMOutput(final[..., :h, :w], initial[..., :h, :w], scale, means, center_index, boxes4, r, repred)

    def _forward_every_region(self, initial, conv5, scale, h: int, w: int) -> L2SMOutput:
        """`forward` in fixed shapes, as ``torch.export`` traces it (`crowdkernels.engine.export`): the
        same selection and the same sampling (docs/definitions.md, "Region rescaling"), but every one of the
        K x K regions is zoomed and re-predicted, and the selection picks per region between the re-prediction
        and the initial density with ``torch.where``, instead of gathering the selected regions (a
        data-dependent number of boxes, which does not trace). The regions are equal (the input is padded to
        8K, so the stride-4 and stride-8 grids divide by K), and the zoom and its inverse are products with
        interpolation matrices (`_region_zoom`). `final` equals `forward`'s (the tests compare); `boxes`,
        `region_scale` and `repredictions` cover every region, row-major (the selected ones have
        ``center_index >= 0``)."""
        B, _, H4, W4 = initial.shape
        C, H8, W8 = conv5.shape[1:]
        k = self.k
        h4, w4, h8, w8 = H4 // k, W4 // k, H8 // k, W8 // k
        cells = initial.reshape(B, 1, k, h4, k, w4)
        means = cells.mean(dim=(3, 5)).reshape(B, k * k)
        levels = torch.where(self.levels_fitted, self.density_levels, quantile_levels(means, self.num_groups))
        selected, center_index = assign_centers(means, levels, self.num_centers)
        r = scale.reshape(B * k * k)                                       # region n = b K^2 + i K + j
        canvas = self.canvas_size(H4, W4)
        regions = conv5.reshape(B, C, k, h8, k, w8).permute(0, 2, 4, 1, 3, 5).reshape(B * k * k, C, h8, w8)
        zoomed = _region_zoom(regions, 2.0 * r, canvas, down=False)        # scale_regions
        repred = self.repredict(zoomed)
        back = r[:, None, None, None] ** 2 * _region_zoom(repred, r, (h4, w4), down=True)  # unscale_regions
        back = back.reshape(B, k, k, 1, h4, w4).permute(0, 3, 1, 4, 2, 5)
        final = torch.where(selected.reshape(B, 1, k, 1, k, 1), back, cells).reshape(B, 1, H4, W4)
        n = torch.arange(B * k * k, device=initial.device)
        i, j = (n // k) % k, n % k
        boxes4 = torch.stack([n // (k * k), i * h4, j * w4, torch.full_like(n, h4), torch.full_like(n, w4)], dim=1)
        return L2SMOutput(final[..., :h, :w], initial[..., :h, :w], scale, means, center_index, boxes4, r, repred)

    def canvas_size(self, H4: int, W4: int):
        """The re-prediction canvas for a padded stride-4 grid H4 x W4: the largest region zoomed by max_scale."""
        if self.max_scale.is_integer():  # integer arithmetic, which torch.export's symbolic sizes keep exact
            m = int(self.max_scale)
            return m * (H4 // self.k), m * (W4 // self.k)
        return math.ceil(self.max_scale * (H4 // self.k)), math.ceil(self.max_scale * (W4 // self.k))

    # -------------------------------------------------------------------------------------- criterion

    def criterion(self, *, lambda1: float = 1.0, lambda2: float = 1.0, sigma="adaptive", alpha: float = 0.5,
                  generator: Optional[torch.Generator] = None, density_scale=None, center_init_max: float = 1.0,
                  norm: str = "squared") -> "L2SMCriterion":
        """Eq. 3: L = L_D + lambda1 L_r + lambda2 L_c (lambda1 = 1 as in sec. 4.2; lambda2 the weight the
        paper studies in Fig. 5).

        L_D: squared error of the initial density (sum over pixels, mean over images); L_r: squared error
        of the re-predictions against `transform_region_targets` on the valid zoomed part of each selected
        region (sum, mean over images); L_c: `MultipolarCenterLoss` (C centres, eq. 1 update rate `alpha`)
        on D_i / r_i^2 of the selected regions, per image.
        `sigma`: each head's Gaussian spread in input pixels for the zoomed targets: "adaptive" (`knn_sigma`,
        k = 3, beta = 0.3; a lone head gets mean(H, W) / 4, as `density_maps`) or a float; it is divided by
        the stride with the head positions, so the heads keep their own sigmas (Fig. 4).
        `center_init_max`: the C centres start as sorted uniform random values in [0, center_init_max) (sec. 3.3:
        "increasing random values"), in the units of D_i / r_i^2 (people per stride-4 cell times the density
        scale). `norm`: how sec. 3.4's ||.||_2 is read in L_D, L_r and L_c: "squared" (the sum of squared
        errors, "L2 loss" as counting papers use it, and the centre loss whose gradient eq. 1 is) or "l2" (the
        norm as printed: L_D = ||D - D-hat||_2 per image, L_r = sum_i ||D'_i - D-hat'_i||_2, L_c = sum |d_i - d_c|).
        The criterion owns the centres (a buffer): keep the same criterion object through training.
        Targets (and the zoomed region targets) are multiplied by `density_scale` (default: the model's)."""
        return L2SMCriterion(self, lambda1, lambda2, sigma, alpha, generator,
                             self.density_scale if density_scale is None else density_scale, center_init_max, norm)


def _axis_weights(factor: torch.Tensor, n_out, n_src, down: bool) -> torch.Tensor:
    """[N, n_out, n_src] bilinear interpolation matrices along one axis, one per region, as the region kernels
    sample (csrc/regions/regions.h, docs/definitions.md "Region rescaling"): output d samples the source at
    src = a (d + 0.5) - 0.5, clamped to the valid source samples, its two neighbours floor(src) and the next
    weighted 1 - l and l. Zoom (``down=False``, scale_regions, factor r): a = 1/r rounded to float32, the
    output rows d >= floor(r n_src) are 0. Zoom back (``down=True``, unscale_regions): a = r, the source is the
    valid floor(r n_out) part of the n_src canvas rows. Extents are computed in float64, as the kernels do."""
    t = factor.dtype  # the kernels' T: float32 arithmetic for a float32 model
    r = factor[:, None]
    d = torch.arange(n_out, dtype=t, device=factor.device)[None, :] + 0.5
    if down:
        valid = torch.clamp(torch.floor(factor.to(torch.float64) * n_out), max=n_src)[:, None].to(t)
        src = torch.minimum((r * d - 0.5).clamp(min=0), valid - 1)
        rows = torch.ones_like(src)
    else:
        inv = (1.0 / factor.to(torch.float64)).to(t)[:, None]
        src = (inv * d - 0.5).clamp(0, n_src - 1)
        rows = ((d - 0.5) < torch.floor(factor.to(torch.float64) * n_src)[:, None]).to(t)
    i0 = torch.floor(src)
    l = src - i0  # 0 where src is clamped to the last sample, so the next one needs no clamp
    cols = torch.arange(n_src, dtype=t, device=factor.device)[None, None, :]
    w = (cols == i0[..., None]) * (1 - l)[..., None] + (cols == i0[..., None] + 1) * l[..., None]
    return w * rows[..., None]


def _region_zoom(regions: torch.Tensor, factor: torch.Tensor, size, down: bool) -> torch.Tensor:
    """regions [N, C, h, w] resampled to [N, C, *size] by the per-region factor [N] (see `_axis_weights`):
    Y @ region @ X^T, the separable bilinear sampling as two matrix products."""
    ys = _axis_weights(factor, size[0], regions.shape[-2], down).to(regions.dtype)
    xs = _axis_weights(factor, size[1], regions.shape[-1], down).to(regions.dtype)
    return ys[:, None] @ regions @ xs[:, None].transpose(-1, -2)


class L2SMCriterion(nn.Module):
    """criterion(output, {"density": [B,1,H,W], "points": list of [N_i, 2]}) ->
    {"density", "reprediction", "center", "total"}."""

    def __init__(self, model: L2SM, lambda1=1.0, lambda2=1.0, sigma="adaptive", alpha=0.5, generator=None,
                 density_scale=1.0, center_init_max=1.0, norm="squared"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        if not (sigma == "adaptive" or (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0)):
            raise ValueError(f"sigma must be 'adaptive' or a positive float, got {sigma!r}")
        self.stride = model.stride
        self.lambda1, self.lambda2, self.sigma = float(lambda1), float(lambda2), sigma
        self.density_scale = float(density_scale)
        self.center_loss = MultipolarCenterLoss(model.num_centers, alpha=alpha, init_max=center_init_max,
                                                generator=generator, norm=norm)

    def _sigmas(self, points, size):
        if self.sigma != "adaptive":
            return float(self.sigma) / self.stride
        lone = (size[0] + size[1]) / 2 / 4
        return [knn_sigma(p.detach().double(), lone=lone) / self.stride for p in points]

    def region_targets(self, output: L2SMOutput, targets):
        """(D'_i [N, 1, Sh, Sw], valid [N, Sh, Sw] bool): the zoomed ground truth of the selected regions
        (`transform_region_targets` with the heads' own sigmas, on the stride-4 grid) and the valid
        floor(r h) x floor(r w) part of each canvas, where the loss is taken."""
        full = targets["density"]
        boxes, r, repred = output.boxes, output.region_scale, output.repredictions
        points = [p.reshape(-1, 2).to(repred.device) for p in targets["points"]]
        sig = self._sigmas(points, full.shape[-2:])
        on_grid = [p / self.stride for p in points]
        canvas = tuple(repred.shape[-2:])
        target = transform_region_targets(on_grid, boxes, r.detach(), sig, canvas).to(repred.dtype) * self.density_scale
        rd = r.detach().double()
        vh = torch.floor(rd * boxes[:, 3]).clamp(max=canvas[0])
        vw = torch.floor(rd * boxes[:, 4]).clamp(max=canvas[1])
        ii = torch.arange(canvas[0], device=repred.device)
        jj = torch.arange(canvas[1], device=repred.device)
        valid = (ii[None, :, None] < vh[:, None, None]) & (jj[None, None, :] < vw[:, None, None])
        return target, valid

    def forward(self, output: L2SMOutput, targets) -> dict:
        initial = output.initial
        B = initial.shape[0]
        full = check_targets(targets, B, need_points=True)
        gt = density_at(full.to(initial.dtype) * self.density_scale, self.stride, initial.shape[-2:])
        sq = ((initial - gt) ** 2).flatten(1).sum(dim=1)
        l_d = (sq if self.norm == "squared" else _sqrt(sq)).sum() / B
        if output.boxes.shape[0]:
            target, valid = self.region_targets(output, targets)
            sq = (((output.repredictions - target) ** 2)[:, 0] * valid.to(target.dtype)).flatten(1).sum(dim=1)
            l_r = (sq if self.norm == "squared" else _sqrt(sq)).sum() / B
        else:
            l_r = initial.new_zeros(())
        l_c = self.center_loss(output.region_means, output.scale.flatten(1), output.center_index) / B
        total = l_d + self.lambda1 * l_r + self.lambda2 * l_c
        return {"density": l_d, "reprediction": l_r, "center": l_c, "total": total}


def _sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of sums of squares with a zero (not NaN) gradient where the sum is 0 (the subgradient of the norm)."""
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq))
