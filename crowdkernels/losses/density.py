"""The pixel-wise density loss (HMoDE, Du et al., TIP 2023, sec. III-D, eq. 3)."""
from __future__ import annotations

import torch
from torch import nn

from ._common import check_reduction


def density_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """HMoDE eq. 3: L_Des = 1/Z sum_z (e_z - e^g_z)^2, the pixel-wise squared error of a density map.

    Args:
        pred, target: density maps of the same shape, e.g. ``[B, 1, H, W]`` (people per pixel).
        reduction: ``"mean"`` (eq. 3: over all Z pixels of the batch), ``"sum"`` (the released code's
            ``MSELoss(reduction="sum")``, later divided by the batch size there) or ``"none"`` (``[B]``
            per-image means).

    Example (any density model)::

        loss = density_loss(model(images), gt) + relative_local_count_loss(model(images), gt)
    """
    check_reduction(reduction)
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be tensors")
    if pred.shape != target.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    sq = (pred - target) ** 2
    if reduction == "sum":
        return sq.sum()
    if reduction == "mean":
        return sq.mean()
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


class DensityLoss(nn.Module):
    """HMoDE eq. 3 as a module; see `density_loss`. ``forward(pred, target) -> loss``.

    Example::

        crit = DensityLoss(reduction="sum")     # the released code's choice
        loss = crit(model(images), gt) / images.shape[0]
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return density_loss(pred, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
