"""The expert importance loss (HMoDE, Du et al., TIP 2023, sec. III-D-2, eq. 6)."""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-10


def _cv_squared(w: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Squared coefficient of variation over the last dim: variance (unbiased: over n - 1, or over n) /
    (mean^2 + 1e-10); 0 for a single expert (as the released code and the MoE code it follows return)."""
    if w.shape[-1] < 2:
        return w.sum(dim=-1) * 0
    return w.var(dim=-1, unbiased=unbiased) / (w.mean(dim=-1) ** 2 + EPS)


def expert_importance_loss(importance: torch.Tensor, per_image: bool = False, unbiased: bool = True) -> torch.Tensor:
    """HMoDE eq. 6: L_Eim = sum_{i=1..M} (sigma(W_i) / mean(W_i))^2.

    W_ij, the importance of expert j in group i, is the sum over pixels of its first-level gating weight
    map G1_ij (``hierarchical_gating(...).importance``). As the released code does, the importances are
    summed over the batch first, then the squared coefficient of variation (variance / (mean^2 + 1e-10),
    the unbiased variance by default) is taken over the N experts of each group and summed over the M groups. ``per_image=True``
    takes it per image instead and averages over the batch.

    Args:
        importance: ``[B, M, N]`` importance scores (pixels' worth of gate weight), float.
        per_image: see above.
        unbiased: sigma^2 over N - 1 (True: the released code's ``x.var()``, torch's default) or over N (the
            population standard deviation; eq. 6 writes sigma(W_i) without saying which).

    Returns a scalar.

    Example (any mixture-of-experts density model)::

        out = hierarchical_gating(experts, g1_logits, g2_logits)
        loss = density_loss(out.final, gt) + expert_importance_loss(out.importance)
    """
    if not isinstance(importance, torch.Tensor) or not importance.dtype.is_floating_point:
        raise TypeError(f"importance must be a floating-point tensor, got {type(importance).__name__}")
    if importance.dim() != 3:
        raise ValueError(f"importance must be [B, M, N], got shape {tuple(importance.shape)}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
    if per_image:
        return _cv_squared(importance, unbiased).sum(dim=1).mean()
    return _cv_squared(importance.sum(dim=0), unbiased).sum()


class ExpertImportanceLoss(nn.Module):
    """HMoDE eq. 6 as a module; see `expert_importance_loss`. ``forward(importance [B, M, N]) -> scalar``.

    Example::

        eim = ExpertImportanceLoss()
        loss = loss + eim(gating_output.importance)
    """

    def __init__(self, per_image: bool = False, unbiased: bool = True):
        super().__init__()
        self.per_image, self.unbiased = per_image, unbiased

    def forward(self, importance: torch.Tensor) -> torch.Tensor:
        return expert_importance_loss(importance, self.per_image, self.unbiased)

    def extra_repr(self) -> str:
        return f"per_image={self.per_image}, unbiased={self.unbiased}"
