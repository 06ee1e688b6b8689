"""Triton kernels of the hierarchical gating fusion (HMoDE eq. 1): the GPU path of
`crowdkernels.hierarchical_gating`, registered as `crowdkernels::gating_forward_triton` /
`crowdkernels::gating_backward_triton` (same arguments as the C++ ops `gating_forward` / `gating_backward`).

One program handles BLOCK output pixels of one image. A pixel's (group i, member j) pairs form a
[BLOCK, MP, NP] tile (M and N padded to powers of two), so both softmaxes and both sums of eq. 1 are
reductions over tile axes. Inputs are read at their native resolution and sampled with F.interpolate's
index maths (the same as csrc/gating/gating.h); nothing upsampled is stored. The backward recomputes the
samples and softmaxes, and adds its gradients into native-resolution accumulators (float32, float64 for
float64 inputs) with atomics: fast, but the order of the additions, hence the last bits, may vary from run
to run on a GPU. The importance sums are reduced per program and then summed by torch in a fixed order.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ... import _ext

_BLOCK = 128


@triton.jit
def _axis(dst, size_in, scale, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Source taps of output index `dst` along one axis: (i0, i1, lambda), weights (1 - lambda, lambda)."""
    if BILINEAR:
        # area_pixel_compute_source_index (align_corners=False) + guard_index_and_lambda, in ACC.
        real = tl.maximum(scale.to(ACC) * (dst.to(ACC) + 0.5) - 0.5, 0.0)
        i0 = tl.minimum(real.to(tl.int32), size_in - 1)  # real >= 0: truncation is floor
        lam = tl.minimum(tl.maximum(real - i0.to(ACC), 0.0), 1.0)
        i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    else:
        # nearest_idx: floor(dst * scale) in float32, scale = float32(in) / out computed on the host.
        i0 = tl.minimum((dst.to(tl.float32) * scale.to(tl.float32)).to(tl.int32), size_in - 1)
        i1 = i0
        lam = tl.zeros_like(dst).to(ACC)
    return i0, i1, lam


@triton.jit
def _sample(ptr, h, w, y, x, sy, sx, mask, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """The plane(s) starting at `ptr`, of size [h, w], sampled at output pixel (y, x)."""
    y0, y1, ly = _axis(y, h, sy, BILINEAR, ACC)
    x0, x1, lx = _axis(x, w, sx, BILINEAR, ACC)
    v = tl.load(ptr + y0 * w + x0, mask=mask, other=0.0).to(ACC)
    if BILINEAR:
        v01 = tl.load(ptr + y0 * w + x1, mask=mask, other=0.0).to(ACC)
        v10 = tl.load(ptr + y1 * w + x0, mask=mask, other=0.0).to(ACC)
        v11 = tl.load(ptr + y1 * w + x1, mask=mask, other=0.0).to(ACC)
        v = (1.0 - ly) * ((1.0 - lx) * v + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    return v


@triton.jit
def _scatter(ptr, h, w, y, x, sy, sx, g, mask, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Adjoint of `_sample`: adds g to the source taps of (y, x) in the accumulator plane(s) at `ptr`."""
    y0, y1, ly = _axis(y, h, sy, BILINEAR, ACC)
    x0, x1, lx = _axis(x, w, sx, BILINEAR, ACC)
    if BILINEAR:
        tl.atomic_add(ptr + y0 * w + x0, g * (1.0 - ly) * (1.0 - lx), mask=mask)
        tl.atomic_add(ptr + y0 * w + x1, g * (1.0 - ly) * lx, mask=mask)
        tl.atomic_add(ptr + y1 * w + x0, g * ly * (1.0 - lx), mask=mask)
        tl.atomic_add(ptr + y1 * w + x1, g * ly * lx, mask=mask)
    else:
        tl.atomic_add(ptr + y0 * w + x0, g, mask=mask)


@triton.jit
def _pixel_state(E, GEO, SCL, G1, G2, GROUPS, b, pix, H, W,
                 K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
                 BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Everything eq. 1 needs at BLOCK output pixels: sampled experts E_ij and G1 ([BLOCK, MP, NP]), G2 and
    the group maps ([BLOCK, MP]), plus the tile geometry the backward reuses for its scatters."""
    pmask = pix < H * W
    y = pix // W
    x = pix % W
    ii = tl.arange(0, MP)[None, :, None]
    jj = tl.arange(0, NP)[None, None, :]
    cmask = (ii < M) & (jj < N)
    m3 = pmask[:, None, None] & cmask
    y3 = y[:, None, None]
    x3 = x[:, None, None]
    # Expert of each (i, j): its geometry (h, w, offset of image 0's plane in the packed experts, batch
    # stride) and scales.
    k = tl.load(GROUPS + ii * N + jj, mask=cmask, other=0)
    eh = tl.load(GEO + k * 4)
    ew = tl.load(GEO + k * 4 + 1)
    eoff = tl.load(GEO + k * 4 + 2).to(tl.int64)
    ebs = tl.load(GEO + k * 4 + 3).to(tl.int64)
    esy = tl.load(SCL + k * 2)
    esx = tl.load(SCL + k * 2 + 1)
    e_off = b * ebs + eoff
    e = _sample(E + e_off, eh, ew, y3, x3, esy, esx, m3, BILINEAR, ACC)
    # G1: softmax over each group's N channels (padding -> weight 0).
    h1 = tl.load(GEO + K * 4)
    w1 = tl.load(GEO + K * 4 + 1)
    s1y = tl.load(SCL + K * 2)
    s1x = tl.load(SCL + K * 2 + 1)
    c = ii * N + jj
    g1_off = (b * (M * N) + c).to(tl.int64) * (h1 * w1)
    l1 = _sample(G1 + g1_off, h1, w1, y3, x3, s1y, s1x, m3, BILINEAR, ACC)
    l1 = tl.where(cmask, l1, -1.0e30)
    p1 = tl.exp(l1 - tl.max(l1, axis=2)[:, :, None])
    p1 = tl.where(cmask, p1, 0.0)
    s1 = tl.sum(p1, axis=2)
    g1 = p1 / tl.where(s1 > 0.0, s1, 1.0)[:, :, None]  # padded groups (i >= M) have no members: G1 = 0
    # G2: softmax over the M groups.
    i2 = tl.arange(0, MP)[None, :]
    mask2 = i2 < M
    m2 = pmask[:, None] & mask2
    h2 = tl.load(GEO + (K + 1) * 4)
    w2 = tl.load(GEO + (K + 1) * 4 + 1)
    s2y = tl.load(SCL + (K + 1) * 2)
    s2x = tl.load(SCL + (K + 1) * 2 + 1)
    g2_off = (b * M + i2).to(tl.int64) * (h2 * w2)
    l2 = _sample(G2 + g2_off, h2, w2, y[:, None], x[:, None], s2y, s2x, m2, BILINEAR, ACC)
    l2 = tl.where(mask2, l2, -1.0e30)
    p2 = tl.exp(l2 - tl.max(l2, axis=1)[:, None])
    p2 = tl.where(mask2, p2, 0.0)
    g2 = p2 / tl.sum(p2, axis=1)[:, None]
    gm = tl.sum(g1 * e, axis=2)  # eq. 1, inner sum
    return (pmask, y, x, y3, x3, m3, m2, e, g1, g2, gm, eh, ew, e_off, esy, esx, h1, w1, g1_off, s1y, s1x,
            h2, w2, g2_off, s2y, s2x)


@triton.jit
def _gating_fwd_kernel(E, GEO, SCL, G1, G2, GROUPS, OUT, GM, IMP, H, W, NBLK,
                       K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
                       BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    (pmask, y, x, y3, x3, m3, m2, e, g1, g2, gm, eh, ew, e_off, esy, esx, h1, w1, g1_off, s1y, s1x,
     h2, w2, g2_off, s2y, s2x) = _pixel_state(E, GEO, SCL, G1, G2, GROUPS, b, pix, H, W,
                                              K, M, N, MP, NP, BILINEAR, ACC)
    final = tl.sum(g2 * gm, axis=1)  # eq. 1, outer sum
    HW = H * W
    tl.store(OUT + b * HW + pix, final.to(OUT.dtype.element_ty), mask=pmask)
    i2 = tl.arange(0, MP)[None, :]
    tl.store(GM + (b * M + i2) * HW + pix[:, None], gm.to(GM.dtype.element_ty), mask=m2)
    # Per-program importance partials; every [MP, NP] entry is written (padding holds 0).
    imp = tl.sum(tl.where(m3, g1, 0.0), axis=0)
    ii = tl.arange(0, MP)[:, None]
    jj = tl.arange(0, NP)[None, :]
    tl.store(IMP + (b * NBLK + pid) * (MP * NP) + ii * NP + jj, imp)


@triton.jit
def _gating_bwd_kernel(GF, GGM, GIMP, E, GEO, SCL, G1, G2, GROUPS, DE, DG1, DG2, H, W,
                       HAS_GF: tl.constexpr, HAS_GGM: tl.constexpr, HAS_GIMP: tl.constexpr,
                       K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
                       BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    (pmask, y, x, y3, x3, m3, m2, e, g1, g2, gm, eh, ew, e_off, esy, esx, h1, w1, g1_off, s1y, s1x,
     h2, w2, g2_off, s2y, s2x) = _pixel_state(E, GEO, SCL, G1, G2, GROUPS, b, pix, H, W,
                                              K, M, N, MP, NP, BILINEAR, ACC)
    HW = H * W
    i2 = tl.arange(0, MP)[None, :]
    if HAS_GF:
        gf = tl.load(GF + b * HW + pix, mask=pmask, other=0.0).to(ACC)
    else:
        gf = tl.zeros_like(pix).to(ACC)
    dgm = gf[:, None] * g2
    if HAS_GGM:
        dgm += tl.load(GGM + (b * M + i2) * HW + pix[:, None], mask=m2, other=0.0).to(ACC)
    # level 2: dG2_i = gf * gm_i, softmax backward dl = g * (dg - sum g * dg)
    dot2 = tl.sum(g2 * gm, axis=1)
    dl2 = g2 * gf[:, None] * (gm - dot2[:, None])
    # level 1: dG1_ij = dgm_i * E_ij (+ d importance_ij, which every pixel's G1_ij receives whole)
    dg1 = dgm[:, :, None] * e
    if HAS_GIMP:
        ii = tl.arange(0, MP)[None, :, None]
        jj = tl.arange(0, NP)[None, None, :]
        dg1 += tl.load(GIMP + b * (M * N) + ii * N + jj, mask=(ii < M) & (jj < N), other=0.0).to(ACC)
    dot1 = tl.sum(g1 * dg1, axis=2)
    dl1 = g1 * (dg1 - dot1[:, :, None])
    de = dgm[:, :, None] * g1
    # Native-resolution gradients: DE/DG1/DG2 are the ACC-typed accumulators, laid out like the inputs.
    _scatter(DE + e_off, eh, ew, y3, x3, esy, esx, de, m3, BILINEAR, ACC)
    _scatter(DG1 + g1_off, h1, w1, y3, x3, s1y, s1x, dl1, m3, BILINEAR, ACC)
    _scatter(DG2 + g2_off, h2, w2, y[:, None], x[:, None], s2y, s2x, dl2, m2, BILINEAR, ACC)


# Under TRITON_INTERPRET=1, torch's wrap_triton hands back the interpreted kernel itself instead of a
# traceable wrapper, so a fake-tensor trace of these ops would run the interpreter on storage-less tensors.
# Only then are launches on fake tensors skipped: shapes and dtypes (all a fake kernel gives) are unchanged.
# With compiled Triton this is never true and wrap_triton records the launch in the graph as usual.
_INTERPRETED = type(_axis).__name__ == "InterpretedFunction"


def _can_launch(t: torch.Tensor) -> bool:
    return not (_INTERPRETED and (is_fake(t) or t.device.type == "meta"))


def _geometry(experts, expert_sizes, gate1, gate2, height, width, bilinear):
    """GEO [K+2, 4] int32 (h, w, offset of image 0's plane, batch stride; see `crowdkernels::gating_forward`
    for the two packings) and SCL [K+2, 2] (row, column scale) for the K experts, gate1, gate2.
    Scales are in/out as ATen computes them: in float32 for nearest (whatever the dtype), in the op-maths
    type for bilinear (float64 for float64 inputs, float32 otherwise)."""
    hw = [(expert_sizes[2 * k], expert_sizes[2 * k + 1]) for k in range(len(expert_sizes) // 2)]
    offsets = np.cumsum([0] + [h * w for h, w in hw])[:-1].tolist()
    S, B = sum(h * w for h, w in hw), gate1.shape[0]
    if experts.dim() == 1:  # expert-major [B * S]
        offsets, bstrides = [B * o for o in offsets], [h * w for h, w in hw]
    else:  # image-major [B, S]
        bstrides = [S] * len(hw)
    hw += [(gate1.shape[2], gate1.shape[3]), (gate2.shape[2], gate2.shape[3])]
    offsets += [0, 0]
    bstrides += [0, 0]
    geo = torch.tensor([[h, w, o, s] for (h, w), o, s in zip(hw, offsets, bstrides)], dtype=torch.int32,
                       device=experts.device)
    acc = torch.float64 if experts.dtype == torch.float64 else torch.float32
    if bilinear:
        ftype = np.float64 if acc == torch.float64 else np.float32
    else:
        ftype = np.float32
    scl = [[float(ftype(h) / ftype(height)), float(ftype(w) / ftype(width))] for h, w in hw]
    scl = torch.tensor(scl, dtype=acc, device=experts.device)
    return geo, scl, acc


def _pad(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton_op("crowdkernels::gating_forward_triton", mutates_args=())
def gating_forward_triton(experts: torch.Tensor, expert_sizes: list[int], gate1: torch.Tensor,
                          gate2: torch.Tensor, groups: torch.Tensor, height: int, width: int,
                          bilinear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of eq. 1; arguments and results as `crowdkernels::gating_forward`."""
    experts, gate1, gate2, groups = (t.contiguous() for t in (experts, gate1, gate2, groups))
    B = gate1.shape[0]
    M, N = groups.shape
    K = len(expert_sizes) // 2
    H, W = height, width
    geo, scl, acc = _geometry(experts, expert_sizes, gate1, gate2, H, W, bilinear)
    MP, NP = _pad(M), _pad(N)
    nblk = triton.cdiv(H * W, _BLOCK)
    final = _ext.new_output((B, 1, H, W), dtype=experts.dtype, device=experts.device)
    group_maps = _ext.new_output((B, M, H, W), dtype=experts.dtype, device=experts.device)
    partial = _ext.new_output((B, nblk, MP, NP), dtype=acc, device=experts.device)
    if _can_launch(experts):
        wrap_triton(_gating_fwd_kernel)[(nblk, B)](
            experts, geo, scl, gate1, gate2, groups, final, group_maps, partial, H, W, nblk,
            K=K, M=M, N=N, MP=MP, NP=NP, BILINEAR=bool(bilinear),
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_BLOCK,
        )
    importance = partial.sum(dim=1)[:, :M, :N].to(experts.dtype).contiguous()
    return final, group_maps, importance


@triton_op("crowdkernels::gating_backward_triton", mutates_args=())
def gating_backward_triton(grad_final: torch.Tensor | None, grad_group_maps: torch.Tensor | None,
                           grad_importance: torch.Tensor | None, experts: torch.Tensor, expert_sizes: list[int],
                           gate1: torch.Tensor, gate2: torch.Tensor, groups: torch.Tensor, height: int,
                           width: int, bilinear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward of eq. 1; arguments and results as `crowdkernels::gating_backward`."""
    experts, gate1, gate2, groups = (t.contiguous() for t in (experts, gate1, gate2, groups))
    B = gate1.shape[0]
    M, N = groups.shape
    K = len(expert_sizes) // 2
    H, W = height, width
    geo, scl, acc = _geometry(experts, expert_sizes, gate1, gate2, H, W, bilinear)
    # Accumulators for the atomics: they must start at zero (every element is then final).
    d_e = torch.zeros(experts.shape, dtype=acc, device=experts.device)
    d_1 = torch.zeros(gate1.shape, dtype=acc, device=experts.device)
    d_2 = torch.zeros(gate2.shape, dtype=acc, device=experts.device)
    gf = grad_final.contiguous() if grad_final is not None else experts
    ggm = grad_group_maps.contiguous() if grad_group_maps is not None else experts
    gimp = grad_importance.contiguous() if grad_importance is not None else experts
    if _can_launch(experts):
        wrap_triton(_gating_bwd_kernel)[(triton.cdiv(H * W, _BLOCK), B)](
            gf, ggm, gimp, experts, geo, scl, gate1, gate2, groups, d_e, d_1, d_2, H, W,
            HAS_GF=grad_final is not None, HAS_GGM=grad_group_maps is not None,
            HAS_GIMP=grad_importance is not None,
            K=K, M=M, N=N, MP=_pad(M), NP=_pad(N), BILINEAR=bool(bilinear),
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_BLOCK,
        )
    return d_e.to(experts.dtype), d_1.to(gate1.dtype), d_2.to(gate2.dtype)
