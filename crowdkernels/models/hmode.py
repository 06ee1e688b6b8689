"""HMoDE: the hierarchical mixture of density experts (Du et al., "Redesigning Multi-Scale Neural Network for
Crowd Counting", TIP 2023, sec. III and IV-B), in the paper's form and in the authors' released code's form.

Layers (width 1; the paper gives no widths beyond VGG16-BN, so both variants take the released code's):

- encoder: VGG16-BN conv1_1..conv5_3 (13 convs), pools 1-4 (conv5_3 at stride 16) (sec. IV-B1);
- decoder: three blocks of two 3x3 conv + ReLU (sec. IV-B1): D3 on conv5_3 (512 -> 1024 -> 512), D2 on
  [conv4_3, up(D3)] (1024 -> 512 -> 256), D1 on [conv3_3, up(D2)] (512 -> 256 -> 128); with K = 4 a fourth
  block D0 on [conv2_2, up(D1)] (256 -> 128 -> 64). up = bilinear, align_corners=True (the paper does not
  say; the released code's);
- density heads: "two additional 1x1 conv + ReLU layers and one upsampling layer" (sec. IV-B1): 1x1 conv
  (-> 64) + ReLU, 1x1 conv (-> 1) + ReLU; head k on block k gives expert E_k at the block's resolution
  (E1: stride 4, E2: 8, E3: 16; with K = 4 E1 is at stride 2), upsampled to E1's grid, nearest (the kind is
  not stated; the released code's);
- gates, both on conv5_3 (F) (sec. III-B1): G1 = "two convolutional layers with each followed by a ReLU":
  3x3 conv (-> 256) + ReLU, 1x1 conv (-> M*N) + ReLU; G2 "triples the number of layers to six", each + ReLU
  (1024, 2048, 1024, 512, 256, then 1x1 -> M), on A * F; the attention module A = "three convolutional
  layers followed by the Sigmoid": sigmoid(1x1(ReLU(3x3(ReLU(3x3(F)))))) (256, 128, 1). The softmaxed gate
  weights are brought to E1's grid by nearest upsampling (not stated; the released code's);
- fusion: `hierarchical_gating` (eq. 1) over the M = C(K, N) groups of N experts.

The two variants share all of the above. They differ in how they meet the input size: "paper" zero-pads the
input to a multiple of 16 and returns maps on the stride-s grid (people per output cell, the grid of
`density_maps(..., stride=s)`); its criterion brings them to the input resolution, where the paper
optimizes every output ("They are all optimized on the original resolution of the image", sec. III-D).
"official" takes any size as the released code does and nearest-upsamples every output to the input size
(people per pixel, times `density_scale`, the released LOG_PARA of 100).

Parameter counts (K=3, N=2, width 1, either variant): 82,621,261 in all: encoder 14,723,136, decoder
16,812,672, heads 57,731, G1 1,181,446, G2 48,371,203, attention 1,475,073. The paper gives no count; the
released `HMoDE.py` builds the same 82,621,261 (checked by loading its state_dict with `from_official`).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import IMAGENET_NORM
from .._safe_load import CheckpointError, load_torch_file
from ..losses import attention_loss, density_loss, expert_importance_loss, relative_local_count_loss
from ..losses.rel import check_rel_normalize, rel_normalizer
from ..ops.gating import hierarchical_gating
from ._common import (channels, check_images, check_targets, check_width, conv_relu, conv_stack, density_at, he_init, init_normal_,
                      out_size, pad_to_multiple)
from .backbones import VGG16
from .conventions import Conventions, DensityModel
from .registry import register_model

VARIANTS = ("paper", "official")
FUSIONS = ("hmode", "average")

#: the released code's LOG_PARA: its density targets (and so its predictions) are people per pixel x 100
OFFICIAL_DENSITY_SCALE = 100.0


@dataclass
class HMoDEOutput:
    """What `HMoDE.forward` returns.

    final: [B, 1, h, w], the fused density E_out (eq. 1).
    experts: K maps [B, 1, h, w], E_1..E_K brought to final's grid.
    group_maps: [B, M, h, w], the first-level mixtures (None for fusion="average").
    importance: [B, M, N], sum over pixels of G1_ij (eq. 6's W_ij; None for fusion="average").
    attention: [B, 1, h/16, w/16], the attention module's output at its own resolution (None for "average").
    The paper variant's maps are people per output cell (stride `HMoDE.stride`); the official variant's are
    at the input size, people per pixel times `HMoDE.density_scale` (100, the released LOG_PARA).
    """

    final: torch.Tensor
    experts: List[torch.Tensor]
    group_maps: Optional[torch.Tensor]
    importance: Optional[torch.Tensor]
    attention: Optional[torch.Tensor]

    @property
    def densities(self) -> List[torch.Tensor]:
        """The K + M + 1 density outputs of eq. 7: experts, each group's map, final (the released order)."""
        groups = [] if self.group_maps is None else list(self.group_maps.split(1, dim=1))
        return list(self.experts) + groups + [self.final]


@register_model("hmode", rank=0, variant="paper")
@register_model("hmode-official", rank=1, variant="official")
class HMoDE(DensityModel):
    """The hierarchical mixture of density experts.

    Args:
        experts: K, 3 (paper) or 4 (a fourth decoder block with a skip from conv2_2).
        group_size: N, 2 (paper) or 3; the M = C(K, N) groups are `itertools.combinations(range(K), N)`.
        variant: "paper" or "official" (reproduces the released HMoDE.py forward exactly: no input padding,
            every output nearest-upsampled to the input size, maps scaled by 100; K = 3, N = 2 only). The
            layers are the same (module docstring).
        fusion: "hmode" (eq. 1) or "average" (the paper's baseline, sec. IV-B-3: the mean of the experts; no
            gates, no attention).
        pretrained: a local torchvision vgg16_bn state_dict (path or dict) for the encoder; see `VGG16`.
        width: channel multiplier for every layer (1.0 = the widths above).
        init: the layers outside the pretrained encoder: "normal" (N(0, 0.01) weights, zero biases: the
            released HMoDE and CSRNet code), "he" (Kaiming), or "auto" (normal over a `pretrained` encoder, He
            over a random one; see `init_normal_`).

    Input sizes: the paper variant zero-pads the input at the bottom/right to a multiple of 16 and crops the outputs to ceil(H/s) x ceil(W/s), s = `stride` (4; 2 with
    K = 4), the grid of `density_maps(..., stride=s)`. The official variant takes any size as the released
    code does (VGG pools floor, the decoder resizes to the skip's size) and returns maps at H x W.
    """

    def __init__(self, experts: int = 3, group_size: int = 2, *, variant: str = "paper", fusion: str = "hmode",
                 pretrained=None, width: float = 1.0, init: str = "auto"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if experts not in (3, 4):
            raise ValueError(f"experts must be 3 or 4, got {experts!r}")
        if group_size not in (2, 3) or group_size >= experts:
            raise ValueError(f"group_size must be 2 or 3 and < experts={experts}, got {group_size!r}")
        if variant == "official" and (experts, group_size, fusion) != (3, 2, "hmode"):
            raise ValueError("variant='official' is the released model: experts=3, group_size=2, fusion='hmode'")
        width = check_width(width)
        scratch = he_init(init, pretrained)
        self.variant, self.fusion, self.width = variant, fusion, width
        self.num_experts, self.group_size = experts, group_size
        self.register_buffer("groups", torch.tensor(list(itertools.combinations(range(experts), group_size)),
                                                    dtype=torch.long), persistent=False)
        official = variant == "official"
        # ImageNet mean/std (the pretrained VGG-BN's). The official variant takes any input size (VGG pools
        # floor) and is run unpadded, as the released test.py runs it, its maps at the input size times the
        # released LOG_PARA; the paper variant pads to a multiple of 16 (pool4's stride) itself
        self.conventions = (Conventions(stride=1, density_scale=OFFICIAL_DENSITY_SCALE, input_multiple=1) if official else
                            Conventions(stride=4 if experts == 3 else 2, input_multiple=16, forward_multiple=16))

        self.encoder = VGG16(batch_norm=True, pretrained=pretrained, width=width, pools=(1, 2, 3, 4))
        enc = self.encoder.stage_channels                       # 64, 128, 256, 512, 512
        c = lambda n: channels(n, width)  # noqa: E731
        # decoder[k] feeds expert k (0 = the finest): D1, D2, D3 (and D0 first when K = 4)
        blocks = [conv_stack([enc[4], c(1024), c(512)]),        # D3 on conv5_3
                  conv_stack([enc[3] + c(512), c(512), c(256)]),  # D2 on [conv4_3, up(D3)]
                  conv_stack([enc[2] + c(256), c(256), c(128)])]  # D1 on [conv3_3, up(D2)]
        outs = [c(512), c(256), c(128)]
        if experts == 4:
            blocks.append(conv_stack([enc[1] + c(128), c(128), c(64)]))  # D0 on [conv2_2, up(D1)]
            outs.append(c(64))
        self.decoder = nn.ModuleList(blocks[::-1])
        # sec. IV-B1: "two additional 1x1 conv + ReLU layers": the density ends in a ReLU
        self.heads = nn.ModuleList(conv_stack([cin, c(64), 1], k=1, last_relu=True) for cin in outs[::-1])
        M, N = self.groups.shape
        if fusion == "hmode":
            # sec. III-B1: the gates' convolutions are "each followed by a ReLU", the last one included
            self.gate1 = nn.Sequential(*conv_relu(enc[4], c(256)), *conv_relu(c(256), M * N, k=1))
            self.attention = nn.Sequential(*conv_stack([enc[4], c(256), c(128)]), nn.Conv2d(c(128), 1, 1),
                                           nn.Sigmoid())
            g2 = conv_stack([enc[4], c(1024), c(2048), c(1024), c(512), c(256)])
            g2.extend([nn.Conv2d(c(256), M, 1), nn.ReLU(inplace=True)])
            self.gate2 = g2
        init_normal_(self.decoder, from_scratch=scratch)
        init_normal_(self.heads, from_scratch=scratch)
        if fusion == "hmode":
            for m in (self.gate1, self.gate2, self.attention):
                init_normal_(m, from_scratch=scratch)

    # ------------------------------------------------------------------------------------------- forward

    def _up(self, x: torch.Tensor, size) -> torch.Tensor:
        # bilinear with align_corners=True in both variants: the paper does not say which; the released code
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def forward(self, images: torch.Tensor) -> HMoDEOutput:
        images = check_images(images)
        official = self.variant == "official"
        in_size = tuple(images.shape[-2:])
        images = pad_to_multiple(images, self.forward_multiple)
        feats = self.encoder(images)                            # conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
        x5 = feats[4]
        K = self.num_experts
        first_skip = 2 if K == 3 else 1                         # skip feeding the finest block
        # decode from the coarsest block (D3 on conv5_3) to the finest, keeping each block's output
        x = self.decoder[K - 1](x5)
        block_out = [x]
        for k in range(K - 2, -1, -1):
            skip = feats[first_skip + k]
            x = self.decoder[k](torch.cat([skip, self._up(x, skip.shape[-2:])], dim=1))
            block_out.append(x)
        block_out = block_out[::-1]                             # finest first
        raw = [self.heads[k](block_out[k]) for k in range(K)]   # E_k at its block's resolution
        grid = tuple(raw[0].shape[-2:])

        # the heads' upsampling layer brings every expert to E1's grid (nearest, as the released code)
        on_grid = [raw[0]] + [F.interpolate(e, size=grid, mode="nearest") for e in raw[1:]]
        if official:
            # the released code: every output nearest-upsampled to the input size
            crop = lambda t: F.interpolate(t, size=in_size, mode="nearest")  # noqa: E731
        else:
            h, w = out_size(in_size, self.stride)
            crop = lambda t: t[..., :h, :w]  # noqa: E731
        experts = [crop(e) for e in on_grid]

        if self.fusion == "average":
            final = torch.stack(experts, dim=0).mean(dim=0)
            return HMoDEOutput(final, experts, None, None, None)

        attention = self.attention(x5)
        g1 = self.gate1(x5)
        g2 = self.gate2(attention * x5)
        # the gates are nearest-upsampled to E1's grid inside the op; the released code upsamples after its
        # softmax, which for nearest is the same thing
        fused = hierarchical_gating(on_grid, g1, g2, self.groups, size=grid, upsample="nearest")
        return HMoDEOutput(crop(fused.final), experts, crop(fused.group_maps), fused.importance, attention)

    # ----------------------------------------------------------------------------------------- criterion

    def criterion(self, **options) -> "HMoDECriterion":
        """The training loss, eq. 7: sum over the K + M + 1 density outputs of (L_Des + L_Rel), + L_Att + L_Eim.

        Options (defaults by variant, paper (the text) / official (the released train.py)):
            weights: per-output weights in `HMoDEOutput.densities` order (all 1, eq. 7 / 2^floor(j/3):
                1,1,1,2,2,2,4).
            reduction: `density_loss` reduction ("mean", eq. 3's 1/Z / "sum").
            resolution: where L_Des and L_Rel compare maps: "input" (sec. III-D: "optimized on the original
                resolution of the image": each output cell spread evenly over its s x s pixels, i.e.
                nearest-upsampled and divided by s^2, against the full-resolution target) or "output" (the
                target summed onto the output grid). The official variant's outputs are at the input size,
                so both are the same there.
            rel: add REL (True, eq. 4 / False, as the released training script leaves it commented out).
            rel_options: kwargs of `relative_local_count_loss` (defaults: region 1/8, S = 9, three sub-lists,
                adjacent pairs: sec. IV-B2 and eq. 2).
            rel_weight: the weight of L_Rel against L_Des (1: eq. 4 as printed).
            rel_normalize: REL's counts as eq. 2 prints them, window sums ("none"), divided by the window's
                area ("window": mean densities), or by the map's pixel count Z ("pixels", eq. 3's 1/Z); see
                `crowdkernels.losses.rel.rel_normalizer`.
            attention_weight, importance_weight: 1 / 1 (eq. 7).
            attention_reduction: "mean" (eq. 5) / "sum".
            attention_log_eps: None (clamped logs) / 1e-10 (the released log(a + 1e-10)).
            importance_per_image: True (eq. 6 on each image's weight maps: "balance expert contributions on
                the image-level") / False (the released code sums the weight maps over the batch first).
            attention_threshold: A^g = (ground truth > attention_threshold), in people per pixel (1e-5: sec.
                III-D1 "a threshold of 1e-5"; the released train.py: gt_map > 1e-5 * LOG_PARA on its scaled maps).
            importance_unbiased: L_Eim's variance over N - 1 (True: the released cv_squared's x.var()) or over N.
            density_scale: the targets are multiplied by it (default: the model's `density_scale`, set by the
                recipe's ground-truth scale; 100 for the official variant, the released LOG_PARA); the
                attention threshold is scaled with it.
            per_batch: divide the total by the batch size (False / True, as the released script).
        """
        return HMoDECriterion(self, **options)

    # ------------------------------------------------------------------------------------ released weights

    @classmethod
    def from_official(cls, source, *, strict: bool = True) -> "HMoDE":
        """The official variant with the authors' released weights: `source` is a checkpoint path or a
        state_dict (or their training checkpoint, a dict with "model"). A `module.` prefix (DataParallel) is
        stripped and their names (features1..5, de_pred1..3, head1..3, gating1, gating2, mask) are mapped by
        `official_key_map`."""
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"official HMoDE checkpoint {os.fspath(source)!r} not found")
            source = load_torch_file(source)  # weights_only: CheckpointError if it needs more than tensors
        if not isinstance(source, dict):
            raise TypeError(f"source must be a path or a state_dict, got {type(source).__name__}")
        if isinstance(source.get("model"), dict):
            source = source["model"]
        model = cls(variant="official")
        state = {official_key_map(k): v for k, v in source.items()}
        model.load_state_dict(state, strict=strict)
        return model


# the released code's VGG16-BN partition: features1 = vgg.features[0:6], features2 = [6:13], ...
_FEATURE_OFFSETS = (0, 6, 13, 23, 33)
# their wrapped Conv2d sequences: layer i of a block is conv (ours: index 2 i of conv + ReLU pairs)
_OFFICIAL_BLOCKS = {"de_pred1": "decoder.0", "de_pred2": "decoder.1", "de_pred3": "decoder.2",
                    "head1": "heads.0", "head2": "heads.1", "head3": "heads.2"}
_OFFICIAL_NAMED = {"gating1": ("gate1", ["conv1", "conv2"]),
                   "gating2": ("gate2", ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6"]),
                   "mask": ("attention", ["conv1", "conv2", "output"])}


def official_key_map(key: str) -> str:
    """A released-checkpoint key -> this module's key, e.g. ``module.features2.1.weight`` ->
    ``encoder.features.7.weight``, ``de_pred3.1.conv.bias`` -> ``decoder.2.2.bias``,
    ``gating2.conv6.conv.weight`` -> ``gate2.10.weight``, ``mask.output.conv.weight`` -> ``attention.4.weight``."""
    if key.startswith("module."):
        key = key[len("module."):]
    parts = key.split(".")
    head = parts[0]
    if head.startswith("features") and head[8:].isdigit() and 1 <= int(head[8:]) <= 5:
        index = _FEATURE_OFFSETS[int(head[8:]) - 1] + int(parts[1])
        return ".".join(["encoder", "features", str(index)] + parts[2:])
    if head in _OFFICIAL_BLOCKS and len(parts) == 4 and parts[2] == "conv":
        return f"{_OFFICIAL_BLOCKS[head]}.{2 * int(parts[1])}.{parts[3]}"
    if head in _OFFICIAL_NAMED and len(parts) == 4 and parts[2] == "conv":
        ours, names = _OFFICIAL_NAMED[head]
        if parts[1] in names:
            return f"{ours}.{2 * names.index(parts[1])}.{parts[3]}"
    raise KeyError(f"{key!r} is not a key of the released HMoDE model")


#: the top-level modules of the authors' released HMoDE.py (their state_dict's first name components)
_RELEASED_MODULES = {"features1", "features2", "features3", "features4", "features5", "de_pred1", "de_pred2",
                     "de_pred3", "head1", "head2", "head3", "gating1", "gating2", "mask"}

#: the settings the released test.py runs its model with, as a run's ``config`` (a checkpoint's): ImageNet
#: normalization, maps in people per pixel x LOG_PARA
RELEASED_CONFIG = {"model": "hmode-official", "model_kwargs": {}, "input_norm": IMAGENET_NORM,
                   "target": {"scale": OFFICIAL_DENSITY_SCALE}}


def released_state_dict(obj) -> dict | None:
    """The state_dict in ``obj`` when it is one of the authors' released HMoDE files: their plain state_dict
    (test.py loads it as is), ``{"model": state_dict}`` (their best_model.pth), or their training checkpoint
    ``{"model": state_dict with "module." keys, "optimizer", "epoch", ...}`` (latestmodel.pth). None
    otherwise."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "format" not in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    heads = {(k[len("module."):] if k.startswith("module.") else k).split(".")[0] for k in obj}
    if heads <= _RELEASED_MODULES and {"features1", "gating1", "mask"} <= heads:
        return obj
    return None


def released_weights_for(model, state: dict, path) -> dict:
    """The authors' released ``state`` (:func:`released_state_dict`) renamed for ``model`` by
    :func:`official_key_map`; CheckpointError naming ``path`` unless ``model`` is an HMoDE of their layout
    (K = 3, N = 2, gated: either variant, whose layers are the same)."""
    if not isinstance(model, HMoDE) or model.num_experts != 3 or model.group_size != 2 or model.fusion != "hmode":
        raise CheckpointError(f"{path} holds the authors' released HMoDE weights (K = 3, N = 2): train an 'hmode' or "
                              "'hmode-official' model from it")
    return {official_key_map(k): v for k, v in state.items()}


class HMoDECriterion(nn.Module):
    """criterion(output, {"density": [B, 1, H, W], "points": ...}) -> {"density", "rel", "attention",
    "importance", "total"} (eq. 7; "rel" only when enabled, "attention"/"importance" only with gates).
    The target density (full resolution, people per pixel) is multiplied by `density_scale`; see
    `HMoDE.criterion` for the options."""

    def __init__(self, model: HMoDE, *, weights=None, reduction=None, resolution=None, rel=None, rel_options=None,
                 attention_weight: float = 1.0, importance_weight: float = 1.0, attention_reduction=None,
                 attention_log_eps="default", importance_per_image=None, density_scale=None, per_batch=None,
                 rel_weight: float = 1.0, rel_normalize: str = "none", attention_threshold: float = 1e-5,
                 importance_unbiased: bool = True):
        super().__init__()
        official = model.variant == "official"
        n_out = model.num_experts + (0 if model.fusion == "average" else model.groups.shape[0]) + 1
        if weights is None:
            weights = [2.0 ** (j // 3) for j in range(n_out)] if official else [1.0] * n_out
        if len(weights) != n_out:
            raise ValueError(f"weights must have one value per density output ({n_out}), got {len(weights)}")
        self.weights = [float(w) for w in weights]
        self.stride = model.stride
        self.reduction = reduction or ("sum" if official else "mean")
        self.resolution = resolution or "input"
        if self.resolution not in ("input", "output"):
            raise ValueError(f"resolution must be 'input' or 'output', got {resolution!r}")
        self.rel = (not official) if rel is None else bool(rel)
        self.rel_options = dict(rel_options or {})
        self.rel_weight = float(rel_weight)
        self.rel_normalize = check_rel_normalize(rel_normalize)
        self.attention_weight, self.importance_weight = float(attention_weight), float(importance_weight)
        self.attention_reduction = attention_reduction or ("sum" if official else "mean")
        self.attention_log_eps = (1e-10 if official else None) if attention_log_eps == "default" else attention_log_eps
        self.importance_per_image = (not official) if importance_per_image is None else bool(importance_per_image)
        if isinstance(attention_threshold, bool) or not isinstance(attention_threshold, (int, float)) or not attention_threshold >= 0:
            raise ValueError(f"attention_threshold must be a number >= 0, got {attention_threshold!r}")
        self.attention_threshold = float(attention_threshold)
        if not isinstance(importance_unbiased, bool):
            raise TypeError(f"importance_unbiased must be True or False, got {importance_unbiased!r}")
        self.importance_unbiased = importance_unbiased
        self.density_scale = float(model.density_scale if density_scale is None else density_scale)
        self.per_batch = official if per_batch is None else bool(per_batch)

    def _at_input(self, d: torch.Tensor, size) -> torch.Tensor:
        """An output map (people per s x s cell) spread evenly over its pixels, cropped to ``size``."""
        s = self.stride
        if s == 1:
            return d[..., : size[0], : size[1]]
        return (F.interpolate(d, scale_factor=s, mode="nearest") / (s * s))[..., : size[0], : size[1]]

    def forward(self, output: HMoDEOutput, targets) -> dict:
        pred = output.final
        B = pred.shape[0]
        full = check_targets(targets, B).to(pred.dtype) * self.density_scale
        if self.resolution == "input":
            size = tuple(full.shape[-2:])
            gt, bring = full, (lambda d: self._at_input(d, size))  # noqa: E731
        else:
            gt, bring = density_at(full, self.stride, pred.shape[-2:]), (lambda d: d)  # noqa: E731
        dens = pred.new_zeros(())
        rel = pred.new_zeros(())
        for w, d in zip(self.weights, output.densities):
            d = bring(d)
            dens = dens + w * density_loss(d, gt, self.reduction)
            if self.rel:
                norm = rel_normalizer(d, self.rel_normalize, self.rel_options.get("region", 0.125))
                rel = rel + w * relative_local_count_loss(d, gt, **self.rel_options) / norm
        terms = {"density": dens}
        total = dens
        if self.rel:
            terms["rel"] = rel
            total = total + self.rel_weight * rel
        if output.attention is not None:
            terms["attention"] = attention_loss(output.attention, full, threshold=self.attention_threshold * self.density_scale,
                                                reduction=self.attention_reduction, log_eps=self.attention_log_eps)
            terms["importance"] = expert_importance_loss(output.importance, per_image=self.importance_per_image,
                                                         unbiased=self.importance_unbiased)
            total = total + self.attention_weight * terms["attention"] + self.importance_weight * terms["importance"]
        terms["total"] = total / B if self.per_batch else total
        return terms
