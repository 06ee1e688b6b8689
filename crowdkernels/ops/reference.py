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
def hierarchical_gating(experts, gate1_logits, gate2_logits, groups, size, upsample="nearest"):
    """HMoDE eq. 1, eagerly: E_out = sum_i G2_i * sum_j G1_ij * E_ij.

    experts: list of K tensors [B, 1, h_k, w_k]; gate1_logits: [B, M*N, hg, wg] (group i owns channels
    i*N .. i*N+N-1); gate2_logits: [B, M, hg', wg']; groups: LongTensor [M, N] of expert indices; size: (H, W).
    Every input is first brought to (H, W) by F.interpolate(mode=upsample) (the gates as logits, so with
    "bilinear" the softmax is taken of the interpolated logits; with "nearest" the order does not matter).
    Returns (final [B, 1, H, W], group_maps [B, M, H, W], importance [B, M, N]): importance[b, i, j] is the
    sum over the output pixels of G1_ij, the expert-importance surrogate of sec. III-B-2.
    """
    H, W = size
    kwargs = {"align_corners": False} if upsample == "bilinear" else {}

    def up(t):
        return torch.nn.functional.interpolate(t, size=(H, W), mode=upsample, **kwargs)

    E = [up(e) for e in experts]  # K x [B, 1, H, W]
    M, N = groups.shape
    B = E[0].shape[0]
    # G1: softmax over the N maps of each group; G2: softmax over the M groups (pixel-wise, sec. III-B-1).
    G1 = torch.softmax(up(gate1_logits).reshape(B, M, N, H, W), dim=2)
    G2 = torch.softmax(up(gate2_logits), dim=1)
    E_ij = torch.stack([torch.cat([E[int(k)] for k in row], dim=1) for row in groups], dim=1)  # [B, M, N, H, W]
    group_maps = (G1 * E_ij).sum(dim=2)  # eq. 1, inner sum over j
    final = (G2 * group_maps).sum(dim=1, keepdim=True)  # eq. 1, outer sum over i
    importance = G1.sum(dim=(-2, -1))
    return final, group_maps, importance



# ===================================================================================== local counts (issue 5)
