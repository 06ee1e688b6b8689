"""Losses for density-map crowd counting, each a function plus an nn.Module, usable with any model.

- `relative_local_count_loss` / `RelativeLocalCountLoss`: REL, HMoDE eq. 2 (on the fused `local_counts`).
- `MultipolarCenterLoss` / `multipolar_center_loss`: MPCL, L2SM eqs. 1-2; `fit_density_levels` and
  `assign_centers` give the density levels of L2SM sec. 4.2.
- `expert_importance_loss` / `ExpertImportanceLoss`: HMoDE eq. 6.
- `attention_loss` / `AttentionLoss`: HMoDE eq. 5.
- `density_loss` / `DensityLoss`: HMoDE eq. 3.
"""
from .attention import AttentionLoss, attention_loss
from .center import MultipolarCenterLoss, assign_centers, fit_density_levels, multipolar_center_loss
from .density import DensityLoss, density_loss
from .importance import ExpertImportanceLoss, expert_importance_loss
from .rel import RelativeLocalCountLoss, hard_region_ranking, relative_local_count_loss

__all__ = [
    "AttentionLoss", "attention_loss",
    "MultipolarCenterLoss", "multipolar_center_loss", "fit_density_levels", "assign_centers",
    "DensityLoss", "density_loss",
    "ExpertImportanceLoss", "expert_importance_loss",
    "RelativeLocalCountLoss", "relative_local_count_loss", "hard_region_ranking",
]
