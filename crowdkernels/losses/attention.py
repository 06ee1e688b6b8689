"""The attention loss (HMoDE, Du et al., TIP 2023, sec. III-D-1, eq. 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_reduction


def attention_loss(attention: torch.Tensor, target_density: torch.Tensor, threshold: float = 1e-5,
                   reduction: str = "mean", log_eps: float | None = None) -> torch.Tensor:
    """HMoDE eq. 5: binary cross-entropy between the attention map A and its ground truth A^g::

        L_Att = -1/Z sum_z [ a^g_z log(a_z) + (1 - a^g_z) log(1 - a_z) ],   A^g = (target density > threshold)

    A (in [0, 1], a sigmoid output) is brought to the target's size by nearest upsampling, as the released
    code does. Each log is clamped at -100 (as ``F.binary_cross_entropy`` does), so a = 0 or 1 gives a
    finite loss and gradient; or, with ``log_eps``, computed as log(a + log_eps) and log(1 - a + log_eps),
    the released training script's form (``log_eps=1e-10``).

    Args:
        attention: ``[B, 1, h, w]`` attention map (or ``[B, h, w]``), values in [0, 1].
        target_density: ``[B, 1, H, W]`` (or ``[B, H, W]``) ground-truth density; same batch.
        threshold: density above which a pixel is foreground (1e-5, as in the paper; scale it by the
            density's multiplier when the maps are stored multiplied, e.g. LOG_PARA).
        reduction: ``"mean"`` (eq. 5: over every pixel of every image), ``"sum"`` (the released code)
            or ``"none"`` (``[B]`` per-image means).
        log_eps: None (clamped logs) or a positive float added inside both logs (the released code: 1e-10).

    Example (any model with an attention head)::

        loss = density_loss(density, gt) + attention_loss(model.attention, gt)
    """
    check_reduction(reduction)
    if attention.dim() == 3:
        attention = attention.unsqueeze(1)
    if target_density.dim() == 3:
        target_density = target_density.unsqueeze(1)
    if attention.dim() != 4 or attention.shape[1] != 1:
        raise ValueError(f"attention must be [B, 1, h, w], got shape {tuple(attention.shape)}")
    if target_density.dim() != 4 or target_density.shape[1] != 1:
        raise ValueError(f"target_density must be [B, 1, H, W], got shape {tuple(target_density.shape)}")
    if target_density.shape[0] != attention.shape[0]:
        raise ValueError(f"target_density must have attention's batch size {attention.shape[0]}, "
                         f"got {target_density.shape[0]}")
    if attention.shape[2:] != target_density.shape[2:]:
        attention = F.interpolate(attention, size=target_density.shape[2:], mode="nearest")
    target = (target_density > threshold).to(attention.dtype)
    if log_eps is None:
        bce = F.binary_cross_entropy(attention, target, reduction="none")
    else:
        if not (isinstance(log_eps, (int, float)) and not isinstance(log_eps, bool) and log_eps > 0):
            raise ValueError(f"log_eps must be None or a positive number, got {log_eps!r}")
        bce = -(target * torch.log(attention + log_eps) + (1 - target) * torch.log(1 - attention + log_eps))
    if reduction == "sum":
        return bce.sum()
    per_image = bce.flatten(1).mean(dim=1)
    return per_image.mean() if reduction == "mean" else per_image


class AttentionLoss(nn.Module):
    """HMoDE eq. 5 as a module; see `attention_loss`. ``forward(attention, target_density) -> loss``.

    Example::

        att = AttentionLoss(threshold=1e-5)
        loss = loss + att(attention_map, gt_density)
    """

    def __init__(self, threshold: float = 1e-5, reduction: str = "mean", log_eps: float | None = None):
        super().__init__()
        check_reduction(reduction)
        self.threshold, self.reduction, self.log_eps = threshold, reduction, log_eps

    def forward(self, attention: torch.Tensor, target_density: torch.Tensor) -> torch.Tensor:
        return attention_loss(attention, target_density, self.threshold, self.reduction, self.log_eps)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, reduction={self.reduction!r}, log_eps={self.log_eps}"
