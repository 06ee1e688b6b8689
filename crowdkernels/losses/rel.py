"""The relative local counting loss, REL (HMoDE, Du et al., TIP 2023, sec. III-C, eq. 2)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.local_count import EDGES, Region, local_counts, window_size
from ._common import check_positive_int, check_reduction, reduce

PAIRS = ("adjacent", "all")
REL_NORMALIZE = ("none", "window", "pixels")


def check_rel_normalize(normalize) -> str:
    if normalize not in REL_NORMALIZE:
        raise ValueError(f"rel_normalize must be one of {list(REL_NORMALIZE)}, got {normalize!r}")
    return normalize


def rel_normalizer(density: torch.Tensor, normalize: str, region: Region = 0.125) -> float:
    """What REL is divided by when it is added to a density loss: 1 for ``"none"`` (eq. 2 as printed: hinges
    on window counts); the window's area w x w for ``"window"`` (hinges on the windows' mean densities, the
    units of the per-pixel density loss); or Z = H x W of ``density`` [B, 1, H, W] for ``"pixels"``, the 1/Z
    that HMoDE eq. 3 puts on L_Des. REL is positively homogeneous in the counts, so dividing the loss is REL
    on counts divided by the same number. Neither the paper nor the released code says how REL is balanced
    (the released train.py never calls it); the recipes' cells say which one they use and why."""
    check_rel_normalize(normalize)
    H, W = density.shape[-2], density.shape[-1]
    if normalize == "none":
        return 1.0
    if normalize == "pixels":
        return float(H * W)
    rh, rw = window_size(region, H, W)
    return float(rh * rw)


def hard_region_ranking(target_counts: torch.Tensor, sq_error: torch.Tensor, num_hard: int) -> torch.Tensor:
    """Indices [B, S] of the S = min(num_hard, R) windows with the largest squared error, listed by target
    count, descending. Both orders break ties by the lower (row-major) window index, so the choice is the
    same on every device. No gradient flows through it."""
    with torch.no_grad():
        B, R = sq_error.shape
        S = min(num_hard, R)
        # The S largest errors, ties at the S-th value resolved towards lower window indices. topk alone
        # breaks such ties arbitrarily and a full stable sort of R values is several times slower, so:
        # everything above the S-th value, then the first of the windows equal to it.
        kth = torch.topk(sq_error, S, dim=1).values[:, -1:]
        above = sq_error > kth
        at = sq_error == kth
        chosen = above | (at & (at.cumsum(dim=1) <= S - above.sum(dim=1, keepdim=True)))
        # Exactly S chosen per image; list them in window order (a key that decreases with the index).
        key = chosen * torch.arange(R, 0, -1, device=sq_error.device)
        hard = torch.topk(key, S, dim=1).indices
        by_count = torch.sort(target_counts.gather(1, hard), dim=1, descending=True, stable=True).indices
        return hard.gather(1, by_count)


_PAIR_MASKS: dict = {}


def _pair_mask_as(S: int, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_pair_mask` in `dtype`, built once per (S, T, device, dtype) in eager mode: six small ops fewer per
    loss call (under torch.compile it is simply traced). Callers must not modify it in place."""
    if torch.compiler.is_compiling():
        return _pair_mask(S, T, device).to(dtype)
    key = (S, T, device, dtype)
    mask = _PAIR_MASKS.get(key)
    if mask is None:
        if len(_PAIR_MASKS) >= 64:
            _PAIR_MASKS.clear()
        with torch.no_grad():
            mask = _PAIR_MASKS[key] = _pair_mask(S, T, device).to(dtype)
    return mask


def _pair_mask(S: int, T: int, device) -> torch.Tensor:
    """mask[j, k] is True where k comes after j in the same interleaved sub-list (k - j a positive
    multiple of T): the pairs whose hinge max(0, x_k - x_j) pairs="all" counts."""
    j = torch.arange(S, device=device)
    gap = j[None, :] - j[:, None]
    return (gap > 0) & (gap % T == 0)


def _check_options(num_hard, num_sublists, pairs, edge, reduction) -> None:
    """The checks shared by `relative_local_count_loss` and `RelativeLocalCountLoss` (which checks at
    construction, so a bad option fails where it is written, not at the first forward)."""
    check_positive_int(num_hard, "num_hard")
    check_positive_int(num_sublists, "num_sublists")
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    check_reduction(reduction)


def relative_local_count_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    region: Region = 0.125,
    num_hard: int = 9,
    num_sublists: int = 3,
    pairs: str = "adjacent",
    edge: str = "keep",
    reduction: str = "mean",
) -> torch.Tensor:
    """HMoDE eq. 2, the relative local counting loss.

    The predicted and ground-truth maps are integrated over non-overlapping windows (`local_counts`):
    X (predicted counts), Xg (target counts) and R (window sums of the pixel-wise squared error). The
    S = `num_hard` windows with the largest R are the hard regions (the choice carries no gradient; with
    S > number of windows, all are used). Ranked by target count, descending (ties: lower window index
    first), their predicted counts form L_X = x_1..x_S, split into T = `num_sublists` interleaved
    sub-lists, sub-list i holding x_i, x_{i+T}, x_{i+2T}, ...; a higher-ranked window should not be
    predicted lower than a later one of its sub-list::

        L_Rel = sum_{i=1..T} sum_{x_j in L_X^i} max(0, x_{j+T} - x_j)           (eq. 2, pairs="adjacent")
        L_Rel = sum_{i=1..T} sum_{x_j, x_k in L_X^i, j < k} max(0, x_k - x_j)  (pairs="all")

    summed per image, then reduced over the batch. At x_k == x_j the order is kept (x_j >= x_k, as the paper
    asks), so the hinge passes no gradient there (``torch.relu``; the released code's ``clamp`` passes 1).

    The authors' released code (func.py) uses ``region=16, pairs="all", edge="drop", reduction="sum"``
    (16-pixel AvgPool2d windows, every pair inside each 3-element sub-list, summed over the batch). Its
    ``relloss`` also adds the sum of the S hard windows' squared errors; with this library that term is
    ``local_counts(pred, target, 16, edge="drop")[2].topk(9, dim=1).values.sum()``.

    Args:
        pred, target: ``[B, 1, H, W]`` (or ``[B, H, W]``) predicted and ground-truth density maps.
        region: window size: fraction of (H, W) (0.125 = the paper's 1/8), int pixels, or (rh, rw).
        num_hard: S, the number of hard windows (>= 1).
        num_sublists: T, the number of interleaved sub-lists (>= 1; the paper's best is 3).
        pairs: ``"adjacent"`` (eq. 2) or ``"all"`` (the released code).
        edge: ``"keep"`` partial windows at the right/bottom edge, or ``"drop"`` them (AvgPool2d).
        reduction: ``"mean"`` or ``"sum"`` over images, or ``"none"`` for the ``[B]`` per-image losses.

    Returns:
        A scalar (or ``[B]``) in people (counts), differentiable w.r.t. `pred`.

    Example (any density model)::

        density = model(images)                                   # [B, 1, H, W]
        loss = F.mse_loss(density, gt, reduction="sum") + relative_local_count_loss(density, gt)
        loss.backward()
    """
    _check_options(num_hard, num_sublists, pairs, edge, reduction)
    pred_counts, target_counts, sq_error = local_counts(pred, target, region, edge=edge)
    order = hard_region_ranking(target_counts, sq_error, num_hard)
    x = pred_counts.gather(1, order)  # [B, S], L_X in ranking order
    T = num_sublists
    if pairs == "adjacent":
        # x_j and x_{j+T} are neighbours in the same sub-list, for every j: one shifted difference.
        per_image = torch.relu(x[:, T:] - x[:, :-T]).sum(dim=1)  # empty (0) when S <= T
    else:
        mask = _pair_mask_as(x.shape[1], T, x.device, x.dtype)
        # diff[b, j, k] = x_k - x_j
        per_image = (torch.relu(x[:, None, :] - x[:, :, None]) * mask).sum(dim=(1, 2))
    return reduce(per_image, reduction)


class RelativeLocalCountLoss(nn.Module):
    """HMoDE eq. 2 as a module; see `relative_local_count_loss` for the maths and the arguments.

    ``forward(pred, target)`` takes ``[B, 1, H, W]`` density maps and returns the reduced loss.

    Example, added to any density model::

        rel = RelativeLocalCountLoss()                                     # the paper's eq. 2
        # released code: RelativeLocalCountLoss(region=16, pairs="all", edge="drop", reduction="sum")
        loss = F.mse_loss(model(x), gt, reduction="sum") + rel(model(x), gt)
    """

    def __init__(self, region: Region = 0.125, num_hard: int = 9, num_sublists: int = 3,
                 pairs: str = "adjacent", edge: str = "keep", reduction: str = "mean"):
        super().__init__()
        _check_options(num_hard, num_sublists, pairs, edge, reduction)
        self.region, self.num_hard, self.num_sublists = region, num_hard, num_sublists
        self.pairs, self.edge, self.reduction = pairs, edge, reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return relative_local_count_loss(pred, target, self.region, self.num_hard, self.num_sublists,
                                         self.pairs, self.edge, self.reduction)

    def extra_repr(self) -> str:
        return (f"region={self.region!r}, num_hard={self.num_hard}, num_sublists={self.num_sublists}, "
                f"pairs={self.pairs!r}, edge={self.edge!r}, reduction={self.reduction!r}")
