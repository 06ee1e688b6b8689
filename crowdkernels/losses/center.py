"""The multipolar centre loss, MPCL (L2SM, Xu et al., ICCV 2019, sec. 3.3-3.4, eqs. 1-2), and the
density levels that assign regions to its centres (sec. 4.2)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ._common import check_positive_int


class MultipolarCenterLoss(nn.Module):
    """L2SM eq. 2: pull the relative density d_i = D_i / r_i^2 of every selected region towards the centre
    d_c of its density level, and move the centres online by eq. 1.

    ::

        L_c = sum_c sum_{i in c} (D_i / r_i^2 - d_c)^2                                      (eq. 2)
        delta_c = sum_{i in c} (d_c - D_i / r_i^2) / (1 + n_c),  d_c <- d_c - alpha delta_c   (eq. 1)

    D_i is region i's average predicted density (people per pixel), r_i > 0 its learned scale ratio,
    n_c the number of selected regions assigned to centre c in the call.

    The C centres live in the ``centers`` buffer (saved in the ``state_dict``), initialized to increasing
    random values in [0, `init_max`) (sec. 3.3: "increasing random values for more and more dense
    regions"). In training mode, each forward updates them by eq. 1 *after* computing the loss, from
    detached values, so the returned loss uses the centres as they were before the update; in eval mode
    they stay fixed. Eq. 1 is the paper's per-image update; given the regions of a whole batch it counts
    them together (n_c over the batch), as center losses usually do for a mini-batch. Gradients flow to
    `region_density` and `scale`, not to the centres.

    Args:
        num_centers: C (L2SM: 3; 5 on UCF_CC_50).
        alpha: eq. 1's centre learning rate, in (0, 1].
        init_max: upper bound of the random initial centres.
        generator: optional torch.Generator for the initial centres.
        norm: eq. 2's ||.||_2 of each scalar difference read as its square ("squared", the centre loss of Wen et
            al. whose gradient eq. 1's update is) or as written, its absolute value ("l2").

    forward(region_density, scale, center_index):
        region_density: ``[...]`` D_i, any shape (e.g. ``[B, K*K]`` or ``[N]``).
        scale: r_i, the same shape (or broadcastable to it), every value > 0.
        center_index: int64, the same shape: the centre c in [0, C) of each selected region, -1 for a
            region that is not selected (it adds nothing). `assign_centers` produces it.
        Returns the scalar L_c.

    Example (with any model that predicts a density and per-region scales)::

        levels = fit_density_levels(train_region_means, num_groups=5)     # once, over the dataset
        mpcl = MultipolarCenterLoss(num_centers=3)
        D = F.adaptive_avg_pool2d(density, 4).flatten(1)                  # [B, 16] region means
        _, idx = assign_centers(D.detach(), levels, num_centers=3)
        loss = density_loss(density, gt) + 0.01 * mpcl(D, r.flatten(1), idx)
    """

    def __init__(self, num_centers: int, alpha: float = 0.5, init_max: float = 1.0,
                 generator: Optional[torch.Generator] = None, norm: str = "squared"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        check_positive_int(num_centers, "num_centers")
        if not (0.0 < float(alpha) <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not float(init_max) > 0:
            raise ValueError(f"init_max must be > 0, got {init_max}")
        self.num_centers = num_centers
        self.alpha = float(alpha)
        init = torch.sort(torch.rand(num_centers, generator=generator, dtype=torch.float64) * init_max).values
        self.register_buffer("centers", init.to(torch.get_default_dtype()))

    def forward(self, region_density: torch.Tensor, scale: torch.Tensor, center_index: torch.Tensor) -> torch.Tensor:
        d, c = _selected_levels(region_density, scale, center_index, self.num_centers)
        centers = self.centers.to(d.dtype)
        loss = _distance(d - centers[c], self.norm).sum()           # eq. 2, with the centres before the update
        if self.training and c.numel():
            with torch.no_grad():
                d_det = d.detach()
                n = torch.zeros_like(centers).index_add_(0, c, torch.ones_like(d_det))
                pull = torch.zeros_like(centers).index_add_(0, c, centers[c] - d_det)
                delta = pull / (1 + n)                               # eq. 1; a centre with no region keeps its value
                self.centers.sub_((self.alpha * delta).to(self.centers.dtype))
        return loss

    def extra_repr(self) -> str:
        return f"num_centers={self.num_centers}, alpha={self.alpha}, norm={self.norm!r}"


NORMS = ("squared", "l2")


def _distance(diff: torch.Tensor, norm: str) -> torch.Tensor:
    """||diff||_2 of scalar differences: squared ("squared") or the absolute value ("l2")."""
    return diff * diff if norm == "squared" else diff.abs()


def _selected_levels(region_density, scale, center_index, num_centers):
    """Checks the arguments; returns d_i = D_i / r_i^2 and c_i of the selected regions (center_index >= 0)."""
    if not isinstance(region_density, torch.Tensor) or not region_density.dtype.is_floating_point:
        raise TypeError(f"region_density must be a floating-point tensor, got {type(region_density).__name__}")
    if not isinstance(center_index, torch.Tensor) or center_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"center_index must be an int64 tensor, got "
                        f"{getattr(center_index, 'dtype', type(center_index).__name__)}")
    scale = torch.as_tensor(scale, dtype=region_density.dtype, device=region_density.device)
    try:
        region_density, scale = torch.broadcast_tensors(region_density, scale)
    except RuntimeError:
        raise ValueError(f"scale must broadcast to region_density's shape {tuple(region_density.shape)}, "
                         f"got {tuple(scale.shape)}") from None
    if center_index.shape != region_density.shape:
        raise ValueError(f"center_index must have region_density's shape {tuple(region_density.shape)}, "
                         f"got {tuple(center_index.shape)}")
    if center_index.numel() and (int(center_index.min()) < -1 or int(center_index.max()) >= num_centers):
        raise ValueError(f"center_index must be in [0, {num_centers}) or -1 (not selected), got values in "
                         f"[{int(center_index.min())}, {int(center_index.max())}]")
    selected = center_index >= 0
    r = scale[selected]
    if r.numel() and bool((r.detach() <= 0).any()):
        raise ValueError(f"scale must be > 0 on the selected regions, got min {float(r.detach().min())}")
    # D / r / r, not D / r**2: r**2 under- or overflows for extreme r (1e-30 in float32: 0, and 0 / 0 = NaN)
    # where D / r^2 itself is representable
    return region_density[selected] / r / r, center_index[selected].long()


def multipolar_center_loss(region_density: torch.Tensor, scale: torch.Tensor, center_index: torch.Tensor,
                           centers: torch.Tensor) -> torch.Tensor:
    """L2SM eq. 2 with given centres ``[C]``: the sum over the selected regions (center_index >= 0) of
    (D_i / r_i^2 - d_c)^2. The functional form of `MultipolarCenterLoss`, which also moves the centres
    (eq. 1); here they are only read (a gradient reaches them if they require one)."""
    d, c = _selected_levels(region_density, scale, center_index, centers.numel())
    return ((d - centers.to(d.dtype)[c]) ** 2).sum()


def fit_density_levels(region_means: torch.Tensor, num_groups: int = 5) -> torch.Tensor:
    """The G-1 thresholds that split a dataset's region densities evenly into G = `num_groups` levels.

    L2SM sec. 4.2: all regions of the training set are divided evenly into G groups of increasing
    density (G = 5), and the densest C groups are centralized to the C centres. The thresholds are the
    k/G quantiles (k = 1..G-1, linear interpolation between order statistics) of `region_means`, any
    shape (e.g. the K x K region averages of every training image). Returns a float64 ``[G-1]`` tensor,
    non-decreasing; region level = number of thresholds <= its mean (see `assign_centers`).
    """
    check_positive_int(num_groups, "num_groups")
    values = torch.as_tensor(region_means).detach().reshape(-1).to(torch.float64).cpu()
    if values.numel() == 0:
        raise ValueError("region_means must not be empty")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("region_means must be finite")
    return quantile_levels(values, num_groups)


def quantile_levels(values: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The k/G quantiles (k = 1..G-1) of `values` (non-empty, finite: not checked) as float64 ``[G-1]``, linear
    between order statistics: :func:`fit_density_levels` without its checks, in tensor operations only, so
    that ``torch.export`` traces it (an exported L2SM that was never fitted takes its batch's quantiles)."""
    v = torch.sort(values.reshape(-1).to(torch.float64)).values
    pos = torch.arange(1, num_groups, dtype=torch.float64, device=v.device) / num_groups * (v.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def assign_centers(region_means: torch.Tensor, thresholds: torch.Tensor,
                   num_centers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map region means to (selected, center_index) for `MultipolarCenterLoss`.

    A region's level is the number of `thresholds` (from `fit_density_levels`, G-1 of them) at or below
    its mean, 0..G-1. The densest C = `num_centers` levels are selected (L2SM sec. 4.2), level G-C going
    to centre 0 and level G-1 to centre C-1; other regions get center_index -1.
    Returns ``selected`` (bool) and ``center_index`` (int64), both of region_means' shape.
    """
    check_positive_int(num_centers, "num_centers")
    thresholds = torch.as_tensor(thresholds).reshape(-1)
    G = thresholds.numel() + 1
    if num_centers > G:
        raise ValueError(f"num_centers must be <= the number of levels {G}, got {num_centers}")
    means = region_means.detach()
    # the number of thresholds at or below each mean (torch.bucketize(right=True) for sorted thresholds),
    # counted with a comparison so that the exported graph of an L2SM needs no bucketize operator
    level = (thresholds.to(device=means.device, dtype=torch.float64)
             <= means.to(torch.float64)[..., None]).sum(dim=-1)
    center_index = level - (G - num_centers)
    selected = center_index >= 0
    return selected, torch.where(selected, center_index, torch.full_like(center_index, -1))
