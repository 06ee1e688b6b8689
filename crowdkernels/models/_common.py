"""Small pieces every model shares: channel widths, conv stacks, input padding and count-keeping target
resizing."""
from __future__ import annotations

from numbers import Real
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def channels(c: int, width: float) -> int:
    """`c` channels scaled by the width multiplier (at least 1)."""
    return max(1, int(round(c * width)))


def check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, Real) or not 0 < float(width) <= 4:
        raise ValueError(f"width must be a number in (0, 4] (1.0 = the paper's widths), got {width!r}")
    return float(width)


def conv_relu(cin: int, cout: int, k: int = 3, dilation: int = 1, relu: bool = True) -> List[nn.Module]:
    """A k x k conv with 'same' padding (dilation-aware), optionally followed by ReLU."""
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def conv_stack(widths: Sequence[int], k: int = 3, dilation: int = 1, last_relu: bool = True) -> nn.Sequential:
    """Convs widths[0] -> widths[1] -> ... each followed by ReLU (the last one only if `last_relu`)."""
    layers: List[nn.Module] = []
    n = len(widths) - 1
    for i in range(n):
        layers += conv_relu(widths[i], widths[i + 1], k, dilation, relu=(i < n - 1 or last_relu))
    return nn.Sequential(*layers)


def init_normal_(module: nn.Module, std: float = 0.01, *, from_scratch: bool = False) -> None:
    """N(0, std) conv weights and zero biases, the usual initialization of crowd-counting heads (CSRNet,
    the released HMoDE code), or He (Kaiming) initialization with ``from_scratch=True``.

    The papers' N(0, 0.01) sits on top of a pretrained front end. Without one, a stack of such layers
    shrinks the signal at every layer (by ~4x per layer at width 0.125), the output is a constant, and
    only its bias learns: the model predicts the mean count. So models built without ``pretrained``
    weights use He initialization, as the VGG backbone does (torchvision's)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if from_scratch:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


INITS = ("auto", "normal", "he")


def he_init(init: str, pretrained) -> bool:
    """Whether the layers outside the encoder get He initialization (``init_normal_(from_scratch=True)``):
    ``init`` "normal" (N(0, 0.01)), "he", or "auto" (N(0, 0.01) over a ``pretrained`` encoder, He over a
    random one: see `init_normal_`)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init == "he" or (init == "auto" and pretrained is None)


def check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (normalized RGB), got {images.dtype}")
    return images


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads at the bottom and right so that H and W are multiples of `multiple` (zero = the mean colour
    of normalized images)."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def out_size(size: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """The output grid of a model of output stride `stride` on an H x W input: ceil(H/s) x ceil(W/s), the
    grid of `density_maps(..., stride=s)`."""
    return -(-size[0] // stride), -(-size[1] // stride)


def density_at(density: torch.Tensor, stride: int, size: Tuple[int, int]) -> torch.Tensor:
    """A full-resolution density [B, 1, H, W] summed over stride x stride cells onto the `size` grid (the count
    is kept): zero-padded at the bottom/right up to size*stride first. Cropping (size*stride < H) drops the
    mass beyond, so callers pass a grid that covers the image."""
    if not isinstance(density, torch.Tensor) or density.dim() != 4 or density.shape[1] != 1:
        raise ValueError(f"targets['density'] must be [B, 1, H, W], got "
                         f"{tuple(density.shape) if isinstance(density, torch.Tensor) else type(density).__name__}")
    H, W = size[0] * stride, size[1] * stride
    h, w = density.shape[-2:]
    if h > H or w > W:
        density = density[..., :H, :W]
    if h < H or w < W:
        density = F.pad(density, (0, max(0, W - w), 0, max(0, H - h)))
    if stride == 1:
        return density
    B = density.shape[0]
    return density.reshape(B, 1, size[0], stride, size[1], stride).sum(dim=(3, 5))


DOWNSAMPLES = ("sum", "cubic")


def density_cubic(density: torch.Tensor, stride: int) -> torch.Tensor:
    """A full-resolution density [B, 1, H, W] resized to floor(H/s) x floor(W/s) by bicubic interpolation (a =
    -0.75, pixel centres at +0.5: ``align_corners=False``, no antialiasing) and multiplied by s^2, s = `stride`:
    the released CSRNet image.py's ``cv2.resize(target, (w/8, h/8), interpolation=cv2.INTER_CUBIC) * 64``
    (Python 2 integer division). Unlike `density_at`, the count is kept only approximately."""
    if not isinstance(density, torch.Tensor) or density.dim() != 4 or density.shape[1] != 1:
        raise ValueError(f"targets['density'] must be [B, 1, H, W], got "
                         f"{tuple(density.shape) if isinstance(density, torch.Tensor) else type(density).__name__}")
    H, W = density.shape[-2:]
    if H < stride or W < stride:
        raise ValueError(f"a cubic-downsampled target needs images of at least {stride} x {stride} pixels, got {H} x {W}")
    out = F.interpolate(density, size=(H // stride, W // stride), mode="bicubic", align_corners=False)
    return out * float(stride * stride)


def check_targets(targets, batch: int, need_points: bool = False):
    if not isinstance(targets, dict) or "density" not in targets:
        raise TypeError("targets must be a dict with 'density' [B, 1, H, W] (and 'points', a list of [N_i, 2])")
    d = targets["density"]
    if not isinstance(d, torch.Tensor) or d.dim() != 4 or d.shape[1] != 1 or d.shape[0] != batch:
        raise ValueError(f"targets['density'] must be [B={batch}, 1, H, W], got "
                         f"{tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__}")
    if need_points:
        p = targets.get("points")
        if not isinstance(p, (list, tuple)) or len(p) != batch:
            raise ValueError(f"targets['points'] must be a list of B={batch} tensors [N_i, 2], got "
                             f"{type(p).__name__ if not isinstance(p, (list, tuple)) else len(p)}")
    return d


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
