"""VGG16 and VGG16-BN feature extractors, built here with torchvision's `features.*` parameter layout so that
torchvision's ImageNet state_dicts load unchanged (torchvision itself is not needed).

The ImageNet weights are not bundled and never downloaded. Get them once, on a machine with internet:

    https://download.pytorch.org/models/vgg16-397923af.pth       (VGG16,    torchvision.models.vgg16)
    https://download.pytorch.org/models/vgg16_bn-6c64b313.pth    (VGG16-BN, torchvision.models.vgg16_bn)

and pass the file: ``VGG16(batch_norm=True, pretrained="vgg16_bn-6c64b313.pth")``. Inputs are RGB in [0, 1]
normalized with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as for torchvision.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Tuple

import torch
from torch import nn

from .._safe_load import load_torch_file
from ._common import channels, check_width

#: convs per stage and their widths (VGG "D" configuration)
STAGE_CONVS: Tuple[int, ...] = (2, 2, 3, 3, 3)
STAGE_WIDTHS: Tuple[int, ...] = (64, 128, 256, 512, 512)
WEIGHTS_URL = {
    False: "https://download.pytorch.org/models/vgg16-397923af.pth",
    True: "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}


def _stage_layout(batch_norm: bool, num_stages: int, trailing_pool: bool):
    """Indices into `features` (torchvision's numbering): for each stage, (first, last+1) of its layers, and
    the index of the pool after it (or None when the model is truncated there)."""
    per_conv = 3 if batch_norm else 2
    spans, pools = [], []
    i = 0
    for s in range(num_stages):
        n = STAGE_CONVS[s] * per_conv
        spans.append((i, i + n))
        i += n
        last = s == num_stages - 1
        pools.append(None if (last and not trailing_pool) else i)
        if pools[-1] is not None:
            i += 1
    return spans, pools


class VGG16(nn.Module):
    """The 13 convolutional layers of VGG16 (or VGG16-BN), torchvision's `features.N` layout.

    Args:
        batch_norm: False for `vgg16`, True for `vgg16_bn` (a BatchNorm2d after every conv).
        pretrained: None (random init, as torchvision initializes), or the path of a local torchvision
            state_dict file (`vgg16-397923af.pth` / `vgg16_bn-6c64b313.pth`, see the module docstring),
            or such a state_dict itself. Only the `features.*` entries are used (`classifier.*` is ignored;
            a `module.` prefix is stripped). Requires width=1.
        width: channel multiplier (1.0 = VGG16); smaller widths make fast CPU models (no pretrained weights).
        num_stages: how many of the 5 stages to keep (CSRNet's front end: 4, ending at conv4_3).
        pools: the stages (1-based) whose max pool is applied in `forward`. torchvision pools after all five
            (output stride 32); SPN skips pool4 and pool5 (stride 8), HMoDE skips pool5 (stride 16), CSRNet
            keeps pool1-3 (stride 8). Skipped pools stay in `features` as parameter-free layers so that the
            indices (and hence the parameter names) are torchvision's.

    Stage splits: `stage_spans[s]` is the (start, stop) of stage s+1's layers in `features`, `stage_pools[s]`
    the index of the pool after it (None when truncated); `stage_channels[s]` its output channels.

    forward(images [B, 3, H, W]) -> list of the `num_stages` stage outputs (each the last ReLU of the
    stage, before its pool): stage s+1 is at stride 2**(number of applied pools before it).

    Parameters (width 1): VGG16 features 14,714,688; VGG16-BN features 14,723,136 (+ BN buffers), as
    torchvision's.
    """

    def __init__(self, batch_norm: bool = False, pretrained=None, *, width: float = 1.0, num_stages: int = 5,
                 pools: Iterable[int] = (1, 2, 3, 4, 5)):
        super().__init__()
        width = check_width(width)
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 5:
            raise ValueError(f"num_stages must be an int in 1..5, got {num_stages!r}")
        pools = tuple(sorted(set(int(p) for p in pools)))
        if any(not 1 <= p <= num_stages for p in pools):
            raise ValueError(f"pools must be stage numbers in 1..{num_stages}, got {pools}")
        self.batch_norm = bool(batch_norm)
        self.width = width
        self.num_stages = num_stages
        self.pools = pools
        layers: List[nn.Module] = []
        cin = 3
        self.stage_channels: List[int] = []
        trailing = num_stages in pools
        for s in range(num_stages):
            cout = channels(STAGE_WIDTHS[s], width)
            for _ in range(STAGE_CONVS[s]):
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU(inplace=True))
                cin = cout
            self.stage_channels.append(cout)
            if s < num_stages - 1 or trailing:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.stage_spans, self.stage_pools = _stage_layout(self.batch_norm, num_stages, trailing)
        self._init_weights()
        if pretrained is not None:
            if isinstance(pretrained, (str, os.PathLike)):
                check_weights_path(pretrained, self.batch_norm)  # the real reason first: missing, or not weights
            if width != 1.0:
                raise ValueError(f"pretrained weights need width=1.0, got width={width}")
            self.load_torchvision(pretrained)

    def _init_weights(self) -> None:
        # torchvision's VGG initialization, so that a randomly initialized backbone trains as theirs does
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def output_stride(self) -> int:
        return 2 ** sum(1 for p in self.pools if p <= self.num_stages)

    def stage(self, index: int) -> nn.Sequential:
        """The layers of stage `index` (0-based), without its pool."""
        a, b = self.stage_spans[index]
        return self.features[a:b]

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        outs: List[torch.Tensor] = []
        x = images
        for s in range(self.num_stages):
            a, b = self.stage_spans[s]
            for layer in self.features[a:b]:
                x = layer(x)
            outs.append(x)
            if (s + 1) in self.pools:
                x = self.features[self.stage_pools[s]](x)
        if self.num_stages in self.pools:
            outs[-1] = x  # the trailing pool is part of the last output, as torchvision's `features`
        return outs

    def load_torchvision(self, source) -> None:
        """Loads `features.*` from a torchvision vgg16 / vgg16_bn state_dict (a path or the dict; see
        `read_torchvision_state_dict` for the files accepted). The classifier and anything else outside
        `features.*` is ignored; BatchNorm's `num_batches_tracked`, absent from torchvision's published
        vgg16_bn file (it predates that buffer), is kept as initialized. A file of another layout raises a
        `PretrainedWeightsError` naming the expected layout and the keys that differ."""
        name = "vgg16_bn" if self.batch_norm else "vgg16"
        state = read_torchvision_state_dict(source, self.batch_norm)
        own = self.features.state_dict()
        missing, wrong = [], []
        picked = {}
        for key, value in own.items():
            full = "features." + key
            if full not in state:
                if key.endswith("num_batches_tracked"):
                    picked[key] = value
                else:
                    missing.append(full)
                continue
            if tuple(state[full].shape) != tuple(value.shape):
                wrong.append(f"{full} {list(state[full].shape)} (expected {list(value.shape)})")
                continue
            picked[key] = state[full]
        # keys of the file's features.* that this layout does not have (e.g. BatchNorm entries in a plain
        # vgg16 model, or the other way round); stages a truncated backbone drops are not reported
        last = max(int(k.split(".")[0]) for k in own)
        unexpected = [k for k in state if k.startswith("features.") and k[9:] not in own
                      and not k.endswith("num_batches_tracked") and int(k.split(".")[1]) <= last]
        if missing or wrong or unexpected:
            where = source if isinstance(source, (str, os.PathLike)) else "the state_dict"
            parts = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
                if keys:
                    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                    parts.append(f"{label}: {shown}")
            raise PretrainedWeightsError(
                f"{os.fspath(where) if not isinstance(where, str) else where} is not a torchvision {name} "
                f"state_dict (expected features.0.weight [64, 3, 3, 3] ... with torchvision's `features.N` "
                f"numbering{', a BatchNorm after every conv' if self.batch_norm else ', no BatchNorm'}, as in "
                f"{WEIGHTS_URL[self.batch_norm]}); {'; '.join(parts)}"
            )
        self.features.load_state_dict(picked, strict=True)


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file that is not what the model expects (one line naming the expected layout and
    the keys that differ)."""


def read_torchvision_state_dict(source, batch_norm: bool = False) -> dict:
    """The state_dict in ``source``: a path or a dict (or an ``nn.Module`` object, whose ``state_dict()`` is
    taken). Accepted: a torchvision model's state_dict (features and classifier, as torchvision publishes
    them), such a dict wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` (training checkpoints), keys
    with a ``module.`` prefix (DataParallel). A file is read with ``torch.load(weights_only=True)``
    (:func:`crowdkernels._safe_load.load_torch_file`): a whole pickled ``nn.Module``, or anything else that
    needs more than tensors and plain data, is refused with a CheckpointError saying how to convert it.
    Never downloads anything."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        check_weights_path(path, batch_norm)
        source = load_torch_file(path, what="PyTorch weights file")
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, dict):
        raise TypeError(f"pretrained must be a path or a state_dict, got {type(source).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(source.get(wrapper), dict):
            source = source[wrapper]
            break
        if isinstance(source.get(wrapper), nn.Module):
            source = source[wrapper].state_dict()
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()
            if isinstance(v, torch.Tensor)}


#: first bytes of files that are often passed by mistake where weights are expected, and what they are
_NOT_WEIGHTS = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF8", "a GIF image"),
                (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
                (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras weights?)"), (b"\x93NUMPY", "a NumPy .npy array"),
                (b"\x1f\x8b", "a gzip archive"), (b"BM", "a BMP image"))


def _weights_file_kind(path: str) -> str | None:
    """None when the file starts as ``torch.save`` writes (a zip archive, a pickle, or the legacy tar); else
    what it looks like ("a JPEG image", ...), from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, kind in _NOT_WEIGHTS:
        if head.startswith(magic):
            return kind
    if len(head) > 8 and head[8:9] == b"{":
        return "a safetensors file (read it with safetensors.torch.load_file and torch.save the dict)"
    if head.lstrip()[:1] == b"<":
        return "an HTML or XML page (a failed download?)"
    return "empty" if not head else "neither the zip archive nor the pickle that torch.save writes"


def check_weights_path(path, batch_norm: bool = False) -> None:
    """FileNotFoundError when the pretrained-weights file ``path`` is missing, PretrainedWeightsError when it is
    plainly no PyTorch weights file (an image, a web page, ...: told by its first bytes): one line each, saying
    where to get torchvision's file. Checked before anything else about the weights (e.g. the model's width)."""
    path = os.fspath(path)
    name = "vgg16_bn" if batch_norm else "vgg16"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights file {path!r} not found. crowdkernels never downloads weights: get torchvision's "
            f"{name} ImageNet weights from {WEIGHTS_URL[batch_norm]} (or copy "
            f"~/.cache/torch/hub/checkpoints/{os.path.basename(WEIGHTS_URL[batch_norm])} from a machine that has "
            f"torchvision) and pass its local path.")
    kind = _weights_file_kind(path)
    if kind is not None:
        raise PretrainedWeightsError(f"{path}: not a PyTorch weights file ({kind}); pass torchvision's {name} "
                                     f"ImageNet weights, {WEIGHTS_URL[batch_norm]}")
