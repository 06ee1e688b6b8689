"""The authors' released HMoDE code (github ZPDu/Redesigning-Multi-Scale-Neural-Network-for-Crowd-Counting),
restated here from its arithmetic with torch.nn.functional, for tests that compare crowdkernels with it.

Nothing here is the released code: each function re-derives what `HMoDE.py`, `train.py`, `test.py` and
`datasets/SHHA/*.py` compute, from reading them, on tensors named as the released modules name their
parameters (``features1..5`` = vgg16_bn ``features[0:6], [6:13], [13:23], [23:33], [33:43]``; ``de_pred*``,
``head*``, ``gating1``, ``gating2``, ``mask`` = their ``Conv2d`` wrappers, each holding ``.conv``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crowdkernels.models import official_key_map

LOG_PARA = 100.0  # datasets/SHHA/setting.py
MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # datasets/SHHA/setting.py
LR = 2e-5  # train.py: optim.Adam(net.parameters(), lr=2e-5)

# released module -> (first index into vgg16_bn.features, the block's layers as (kind, index in the block))
_STAGES = {1: 0, 2: 6, 3: 13, 4: 23, 5: 33}


def released_state_dict(model) -> dict:
    """Our official-variant ``model``'s weights under the released names (any width): the inverse of
    `official_key_map`, found by mapping every released name (the full-width key list) to ours."""
    own = model.state_dict()
    names = released_key_names()
    out = {}
    for k in names:
        ours = official_key_map(k)
        out[k] = own[ours]
    assert len(out) == len(own), "the released names do not cover the model"
    return out


def released_key_names() -> list[str]:
    """The released HMoDE.py state_dict keys, written from its module tree."""
    keys = []
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    i = 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        for j, names in ((i, ("weight", "bias")), (i + 1, ("weight", "bias", "running_mean", "running_var",
                                                             "num_batches_tracked"))):
            stage = max(s for s, a in _STAGES.items() if a <= j)
            keys += [f"features{stage}.{j - _STAGES[stage]}.{n}" for n in names]
        i += 3
    blocks = ["de_pred3.0", "de_pred3.1", "de_pred2.0", "de_pred2.1", "de_pred1.0", "de_pred1.1",
              "head3.0", "head3.1", "head2.0", "head2.1", "head1.0", "head1.1", "gating1.conv1", "gating1.conv2"]
    blocks += [f"gating2.conv{n}" for n in range(1, 7)] + ["mask.conv1", "mask.conv2", "mask.output"]
    for b in blocks:
        keys += [f"{b}.conv.weight", f"{b}.conv.bias"]
    return keys


def _vgg_stage(sd, stage: int, x, training: bool):
    """features<stage>: (pool unless stage 1), then conv + BN + ReLU per conv (vgg16_bn numbering)."""
    if stage > 1:
        x = F.max_pool2d(x, 2, 2)
    j = 1 if stage > 1 else 0  # index inside the block of its first conv
    while f"features{stage}.{j}.weight" in sd:
        p = f"features{stage}.{j}"
        x = F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=1)
        b = f"features{stage}.{j + 1}"
        x = F.batch_norm(x, sd[b + ".running_mean"].clone(), sd[b + ".running_var"].clone(), sd[b + ".weight"],
                         sd[b + ".bias"], training=training, momentum=0.1, eps=1e-5)
        x = F.relu(x)
        j += 3
    return x


def _conv(sd, name, x, relu=True):
    """The released Conv2d wrapper: 'same' padding for its k x k kernel (every use here is same-padded or
    1x1), no BN, ReLU unless NL=None."""
    w = sd[name + ".conv.weight"]
    x = F.conv2d(x, w, sd[name + ".conv.bias"], padding=(w.shape[-1] - 1) // 2)
    return F.relu(x) if relu else x


def _cv_squared(x):
    eps = 1e-10
    x = x.sum(2).sum(1)
    return x.float().var() / (x.float().mean() ** 2 + eps)


def released_forward(sd, image, training: bool = False):
    """HMoDE.py's ``forward``: (densities, amp, imp_loss), densities = [E1, E2, E3, group 1, 2, 3, final], each
    nearest-upsampled to the input size; amp the attention map at stride 16; imp_loss the summed cv^2 of the
    batch-summed first-level weight maps."""
    size = image.shape
    x1 = _vgg_stage(sd, 1, image, training)
    x2 = _vgg_stage(sd, 2, x1, training)
    x3 = _vgg_stage(sd, 3, x2, training)
    x4 = _vgg_stage(sd, 4, x3, training)
    x5 = _vgg_stage(sd, 5, x4, training)
    x = _conv(sd, "de_pred3.1", _conv(sd, "de_pred3.0", x5))
    x3_out = x
    x = F.interpolate(x, size=x4.shape[2:], mode="bilinear", align_corners=True)
    x = _conv(sd, "de_pred2.1", _conv(sd, "de_pred2.0", torch.cat([x4, x], 1)))
    x2_out = x
    x = F.interpolate(x, size=x3.shape[2:], mode="bilinear", align_corners=True)
    x1_out = _conv(sd, "de_pred1.1", _conv(sd, "de_pred1.0", torch.cat([x3, x], 1)))
    d3 = _conv(sd, "head3.1", _conv(sd, "head3.0", x3_out))
    d2 = _conv(sd, "head2.1", _conv(sd, "head2.0", x2_out))
    d1 = _conv(sd, "head1.1", _conv(sd, "head1.0", x1_out))
    d3 = F.interpolate(d3, size=d1.shape[2:], mode="nearest")
    d2 = F.interpolate(d2, size=d1.shape[2:], mode="nearest")
    amp = torch.sigmoid(_conv(sd, "mask.output", _conv(sd, "mask.conv2", _conv(sd, "mask.conv1", x5)), relu=False))
    g = _conv(sd, "gating1.conv2", _conv(sd, "gating1.conv1", x5))
    w = [F.interpolate(F.softmax(g[:, 2 * i: 2 * i + 2], dim=1), size=d1.shape[2:], mode="nearest") for i in range(3)]
    imp_loss = _cv_squared(w[0].sum(0)) + _cv_squared(w[1].sum(0)) + _cv_squared(w[2].sum(0))
    g1 = torch.sum(torch.cat([d1, d2], 1) * w[0], 1, keepdim=True)
    g2 = torch.sum(torch.cat([d1, d3], 1) * w[1], 1, keepdim=True)
    g3 = torch.sum(torch.cat([d2, d3], 1) * w[2], 1, keepdim=True)
    h = amp * x5
    for n in range(1, 7):
        h = _conv(sd, f"gating2.conv{n}", h)
    w2 = F.interpolate(F.softmax(h, dim=1), size=d1.shape[2:], mode="nearest")
    final = torch.sum(torch.cat([g1, g2, g3], 1) * w2, 1, keepdim=True)
    densities = [F.interpolate(t, size[2:], mode="nearest") for t in (d1, d2, d3, g1, g2, g3, final)]
    return densities, amp, imp_loss


def released_image_tensor(rgb_uint8: np.ndarray) -> torch.Tensor:
    """test.py / train.py's img_transform: ToTensor (HWC uint8 -> CHW float / 255) then Normalize(MEAN_STD),
    with a batch dimension."""
    t = torch.from_numpy(rgb_uint8.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN_STD[0]).reshape(3, 1, 1)
    std = torch.tensor(MEAN_STD[1]).reshape(3, 1, 1)
    return ((t - mean) / std)[None]


def released_train_loss(densities, amp, imp_loss, gt_map):
    """train.py's loss for one batch: gt_map [B, H, W] already multiplied by LOG_PARA."""
    amp_gt = (gt_map > (1e-5 * LOG_PARA)).float().unsqueeze(1)
    loss = 0.0
    for j in range(len(densities)):
        loss = loss + (2 ** int(j / 3)) * ((densities[j] - gt_map) ** 2).sum()  # MSELoss(reduction='sum')
    amp = F.interpolate(amp, amp_gt.shape[2:], mode="nearest")
    bce = (amp_gt * torch.log(amp + 1e-10) + (1 - amp_gt) * torch.log(1 - amp + 1e-10)) * -1
    loss = loss + torch.sum(imp_loss) + torch.sum(bce)
    return loss / densities[0].shape[0]


def released_count(final_map) -> float:
    """test.py: np.sum(pred_map) / log_para of ``net(img)[0][-1]``."""
    return float(np.sum(final_map.detach().cpu().numpy()) / LOG_PARA)
