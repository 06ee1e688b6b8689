"""CSRNet (Li et al., CVPR 2018): the VGG16 front end (its first 10 convs) and the dilated back end, used here to
show REL (HMoDE eq. 2) on a second model (HMoDE Table X)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses import density_loss, relative_local_count_loss
from ..losses.rel import check_rel_normalize, rel_normalizer
from ._common import (DOWNSAMPLES, channels, check_images, check_targets, check_width, conv_stack, density_at,
                      density_cubic, he_init, init_normal_, out_size, pad_to_multiple)
from .backbones import VGG16
from .conventions import Conventions, DensityModel
from .registry import register_model


@dataclass
class DensityOutput:
    """final: [B, 1, h, w] density, people per output pixel (count = final.sum((1, 2, 3)))."""

    final: torch.Tensor


@register_model("csrnet", rank=4)
class CSRNet(DensityModel):
    """CSRNet: VGG16 conv1_1..conv4_3 (pools 1-3), then six 3x3 convs of dilation 2 (512, 512, 512, 256, 128,
    64, each + ReLU) and a 1x1 conv to the density.

    Output stride 8: the input is zero-padded at the bottom/right to a multiple of 8 and `final` is
    [B, 1, ceil(H/8), ceil(W/8)], people per output cell (the grid of `density_maps(..., stride=8)`).

    Args:
        pretrained: a local torchvision vgg16 state_dict (path or dict) for the front end; see `VGG16`.
        width: channel multiplier (1.0 = the paper's widths).
        init: the layers outside the pretrained encoder: "normal" (N(0, 0.01) weights, zero biases: the
            released HMoDE and CSRNet code), "he" (Kaiming), or "auto" (normal over a `pretrained` encoder, He
            over a random one; see `init_normal_`).

    Parameters (width 1): 16,263,489 (CSRNet paper: 16.26M).
    """

    # ImageNet mean/std (the pretrained VGG's), people per cell at stride 8
    conventions = Conventions(stride=8, forward_multiple=8)

    def __init__(self, pretrained=None, *, width: float = 1.0, init: str = "auto"):
        super().__init__()
        width = check_width(width)
        scratch = he_init(init, pretrained)
        self.width = width
        self.frontend = VGG16(batch_norm=False, pretrained=pretrained, width=width, num_stages=4, pools=(1, 2, 3))
        c = [self.frontend.stage_channels[-1]] + [channels(n, width) for n in (512, 512, 512, 256, 128, 64)]
        self.backend = conv_stack(c, k=3, dilation=2)
        self.output_layer = nn.Conv2d(c[-1], 1, 1)
        init_normal_(self.backend, from_scratch=scratch)
        init_normal_(self.output_layer, from_scratch=scratch)

    def forward(self, images: torch.Tensor) -> DensityOutput:
        images = check_images(images)
        h, w = out_size(images.shape[-2:], self.stride)
        x = self.frontend(pad_to_multiple(images, self.forward_multiple))[-1]
        x = self.output_layer(self.backend(x))
        return DensityOutput(final=x[..., :h, :w])

    def criterion(self, *, reduction: str = "mean", rel: bool = True, rel_weight: float = 1.0,
                  rel_options=None, density_weight: float = 1.0, per_batch: bool = False,
                  density_scale=None, rel_normalize: str = "none", downsample: str = "sum") -> "CSRNetCriterion":
        """L = density_weight * L_Des (HMoDE eq. 3, `density_loss` with `reduction`) + rel_weight * L_Rel (HMoDE
        eq. 2, when `rel`), divided by the batch size when `per_batch`. The CSRNet paper's Euclidean loss
        1/(2N) sum_i ||Z_i - Z_i^GT||^2 is reduction="sum", density_weight=0.5, per_batch=True, rel=False.
        Targets are multiplied by `density_scale` (default: the model's). `rel_normalize`: REL's counts as
        window sums ("none", eq. 2), divided by the window's area ("window") or by the output map's pixel
        count ("pixels"); see `crowdkernels.losses.rel.rel_normalizer`.
        `downsample`: how the full-resolution target reaches the output grid: "sum" (`density_at`: summed over
        8 x 8 cells, the count kept exactly; the grid ceil(H/8) x ceil(W/8)) or "cubic" (`density_cubic`: the
        released image.py's cv2.resize(..., INTER_CUBIC) * 64, on floor(H/8) x floor(W/8); the prediction's
        partial last row and column, which the released model does not have, are left out)."""
        scale = self.density_scale if density_scale is None else density_scale
        return CSRNetCriterion(self.stride, reduction, rel, rel_weight, rel_options, density_weight, per_batch, scale,
                               rel_normalize, downsample)


class CSRNetCriterion(nn.Module):
    """criterion(output, {"density": [B,1,H,W], ...}) -> {"density", "rel", "total"}. The target is brought to
    the output grid first: summed over cells (count kept) or resized bicubically (`downsample`)."""

    def __init__(self, stride, reduction="mean", rel=True, rel_weight=1.0, rel_options=None, density_weight=1.0,
                 per_batch=False, density_scale=1.0, rel_normalize="none", downsample="sum"):
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        self.downsample = downsample
        self.rel_normalize = check_rel_normalize(rel_normalize)
        self.stride, self.reduction = stride, reduction
        self.rel, self.rel_weight, self.rel_options = bool(rel), float(rel_weight), dict(rel_options or {})
        self.density_weight, self.per_batch, self.density_scale = float(density_weight), bool(per_batch), float(density_scale)

    def forward(self, output: DensityOutput, targets) -> dict:
        pred = output.final
        full = check_targets(targets, pred.shape[0]).to(pred.dtype) * self.density_scale
        if self.downsample == "cubic":
            gt = density_cubic(full, self.stride)
            pred = pred[..., : gt.shape[-2], : gt.shape[-1]]
        else:
            gt = density_at(full, self.stride, pred.shape[-2:])
        terms = {"density": density_loss(pred, gt, self.reduction)}
        if self.rel:
            norm = rel_normalizer(pred, self.rel_normalize, self.rel_options.get("region", 0.125))
            terms["rel"] = relative_local_count_loss(pred, gt, **self.rel_options) / norm
        total = self.density_weight * terms["density"] + self.rel_weight * terms.get("rel", 0.0)
        terms["total"] = total / pred.shape[0] if self.per_batch else total
        return terms
