"""Plain-PyTorch / NumPy oracles for every op, written from the papers' equations, readable first.

They are the ground truth the compiled kernels are tested against, and the fallback where no compiled
kernel exists. Speed does not matter here; clarity does.
"""
from __future__ import annotations

import math

import numpy as np
import torch


# ===================================================================================== density (issue 2)
# (filled in below by the density section)


# ===================================================================================== regions (issue 3)


# ===================================================================================== gating (issue 4)


# ===================================================================================== local counts (issue 5)
def local_counts(pred: torch.Tensor, target: torch.Tensor, window_h: int, window_w: int, keep_partial: bool = True):
    """Window sums of pred, of target and of the pixel-wise squared error, for [B, H, W] maps.

    HMoDE sec. III-C: X (local counting map) and Xg integrate the density over non-overlapping windows; the
    local error map R integrates the pixel-wise squared error over the same windows. Windows are row-major;
    `keep_partial` keeps the windows cut by the right/bottom edge, otherwise they are ignored (AvgPool2d).
    Returns three [B, R] tensors in the input dtype (accumulated in float32 at least).
    """
    B, H, W = pred.shape
    acc = torch.promote_types(pred.dtype, torch.float32)
    p, t = pred.to(acc), target.to(acc)
    nh = -(-H // window_h) if keep_partial else H // window_h
    nw = -(-W // window_w) if keep_partial else W // window_w
    out = []
    for image in (p, t, (p - t) ** 2):
        counts = image.new_zeros(B, nh, nw)
        for wr in range(nh):
            for wc in range(nw):
                window = image[:, wr * window_h:(wr + 1) * window_h, wc * window_w:(wc + 1) * window_w]
                counts[:, wr, wc] = window.sum(dim=(1, 2))
        out.append(counts.reshape(B, nh * nw).to(pred.dtype))
    return tuple(out)


def relative_local_count_loss(pred_counts: torch.Tensor, target_counts: torch.Tensor, sq_error: torch.Tensor,
                              num_hard: int, num_sublists: int, pairs: str) -> torch.Tensor:
    """HMoDE eq. 2 per image, one image at a time, from [B, R] window counts. Returns [B].

    The S = min(num_hard, R) windows with the largest squared error are taken (ties: lower window index
    first), ranked by target count, descending (ties: lower window index first), giving the list
    L_X = x_1..x_S of predicted counts. Sub-list i holds x_i, x_{i+T}, x_{i+2T}, ... (T = num_sublists).
    pairs="adjacent": sum over each sub-list of max(0, x_{j+T} - x_j) (eq. 2);
    pairs="all": sum over every pair j < k of a sub-list of max(0, x_k - x_j) (the released code).
    """
    B, R = pred_counts.shape
    S, T = min(num_hard, R), num_sublists
    losses = []
    for b in range(B):
        errors = sq_error[b].tolist()
        hard = sorted(range(R), key=lambda r: (-errors[r], r))[:S]
        targets = target_counts[b].tolist()
        ranked = sorted(hard, key=lambda r: (-targets[r], r))
        x = [pred_counts[b, r] for r in ranked]
        loss = 0 * pred_counts[b].sum()  # stays in the graph when no pair exists (S <= T)
        for i in range(T):
            sub = x[i::T]
            for j in range(len(sub)):
                partners = [j + 1] if pairs == "adjacent" else range(j + 1, len(sub))
                for k in partners:
                    if k < len(sub):
                        loss = loss + torch.relu(sub[k] - sub[j])  # no gradient at x_k == x_j: order kept
        losses.append(loss)
    return torch.stack(losses)
