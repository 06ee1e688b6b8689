"""SPN, the scale preserving network (Xu et al., "Learn to Scale", ICCV 2019, sec. 3.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import density_loss
from ._common import (channels, check_images, check_targets, check_width, conv_relu, conv_stack, density_at,
                      he_init, init_normal_, out_size, pad_to_multiple)
from .backbones import VGG16
from .conventions import Conventions, DensityModel
from .registry import register_model

#: sec. 3.2: the features of stages 1..5 are pooled to 16^2, 8^2, 4^2, 2^2 and 1^2
PYRAMID_SIZES: Tuple[int, ...] = (16, 8, 4, 2, 1)


@dataclass
class SPNOutput:
    """final: [B, 1, ceil(H/4), ceil(W/4)] density, people per output cell.
    pyramid: the five pooled scale-preserving features [B, P, s, s], s = 16, 8, 4, 2, 1 (on the padded input).
    """

    final: torch.Tensor
    pyramid: List[torch.Tensor]


@register_model("spn", rank=3)
class SPN(DensityModel):
    """The scale preserving network: VGG16 without pool4 and pool5 (conv5_3 at stride 8); a 3x3 conv (+ ReLU,
    `pyramid_channels` outputs) on the last layer of each stage, adaptive-average-pooled to 16^2, 8^2, 4^2,
    2^2, 1^2, bilinearly upsampled to conv5's size and stacked with conv5_3; three 3x3 convs (256, 128, 64,
    + ReLU) and a 4x4 stride-2 deconvolution regress the density.

    Output stride 4: the input is zero-padded at the bottom/right to a multiple of 8 (conv5 then is exactly
    H/8 and the deconvolution exactly doubles it), and `final` is cropped to ceil(H/4) x ceil(W/4), the grid
    of `density_maps(..., stride=4)`, in people per output cell.

    The paper gives no widths for the pyramid convs and the regressor; these are ours. Parameters (width 1,
    pyramid_channels 64): 17,849,921 (14,714,688 of them VGG16's 13 convs); the paper reports none.

    Args:
        pretrained: a local torchvision vgg16 state_dict (path or dict); see `VGG16`.
        width: channel multiplier (1.0 = the widths above).
        pyramid_channels: P, the channels of each pyramid conv (scaled by width).
        init: the layers outside the encoder: "normal" (N(0, 0.01)), "he" or "auto" (see `he_init`).
    """

    # ImageNet mean/std (the pretrained VGG's), people per cell at stride 4
    conventions = Conventions(stride=4, forward_multiple=8)

    def __init__(self, pretrained=None, *, width: float = 1.0, pyramid_channels: int = 64, init: str = "auto"):
        super().__init__()
        width = check_width(width)
        scratch = he_init(init, pretrained)
        self.width = width
        self.backbone = VGG16(batch_norm=False, pretrained=pretrained, width=width, pools=(1, 2, 3))
        p = channels(pyramid_channels, width)
        self.pyramid_channels = p
        self.pyramid = nn.ModuleList(nn.Sequential(*conv_relu(c, p)) for c in self.backbone.stage_channels)
        c5 = self.backbone.stage_channels[-1]
        self.regressor = conv_stack([c5 + 5 * p, channels(256, width), channels(128, width), channels(64, width)])
        self.deconv = nn.ConvTranspose2d(channels(64, width), 1, 4, stride=2, padding=1)
        init_normal_(self.pyramid, from_scratch=scratch)
        init_normal_(self.regressor, from_scratch=scratch)
        init_normal_(self.deconv, from_scratch=scratch)

    def run(self, padded: torch.Tensor):
        """On an input already padded to `forward_multiple`: (density [B,1,H/4,W/4], conv5_3 [B,C,H/8,W/8],
        the five pooled pyramid features)."""
        stages = self.backbone(padded)
        conv5 = stages[-1]
        size = conv5.shape[-2:]
        pooled = [F.adaptive_avg_pool2d(conv(f), s) for conv, f, s in zip(self.pyramid, stages, PYRAMID_SIZES)]
        stacked = torch.cat([conv5] + [F.interpolate(q, size=size, mode="bilinear", align_corners=False)
                                       for q in pooled], dim=1)
        return self.deconv(self.regressor(stacked)), conv5, pooled

    def forward(self, images: torch.Tensor) -> SPNOutput:
        images = check_images(images)
        h, w = out_size(images.shape[-2:], self.stride)
        density, _, pooled = self.run(pad_to_multiple(images, self.forward_multiple))
        return SPNOutput(final=density[..., :h, :w], pyramid=pooled)

    def criterion(self, *, reduction: str = "sum", density_scale=None) -> "SPNCriterion":
        """L_D (L2SM sec. 3.4): the squared error of the density map, summed over pixels ("sum", then averaged
        over the batch) or averaged ("mean"). Targets are multiplied by `density_scale` (default: the model's)."""
        return SPNCriterion(self.stride, reduction, self.density_scale if density_scale is None else density_scale)


class SPNCriterion(nn.Module):
    """criterion(output, {"density": [B,1,H,W], ...}) -> {"density", "total"}."""

    def __init__(self, stride: int, reduction: str = "sum", density_scale: float = 1.0):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.stride, self.reduction, self.density_scale = stride, reduction, float(density_scale)

    def forward(self, output, targets) -> dict:
        pred = output.final
        full = check_targets(targets, pred.shape[0]).to(pred.dtype) * self.density_scale
        gt = density_at(full, self.stride, pred.shape[-2:])
        loss = density_loss(pred, gt, self.reduction)
        if self.reduction == "sum":
            loss = loss / pred.shape[0]
        return {"density": loss, "total": loss}
