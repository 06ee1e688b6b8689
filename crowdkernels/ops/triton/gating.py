"""Triton kernels of the hierarchical gating fusion (HMoDE eq. 1): the GPU path of
`crowdkernels.hierarchical_gating`, registered as `crowdkernels::gating_forward_triton` /
`crowdkernels::gating_backward_triton` (same arguments as the C++ ops `gating_forward` / `gating_backward`).

One program handles BLOCK output pixels of one image, one pixel per lane, and loops over the M groups and,
inside a group, over its N members (K, M and N are runtime arguments). Each lane therefore holds a handful of
scalars whatever K, M and N are: no register tile grows with the group shape, nothing spills, and the only
compile-time configurations are the dtype and the upsampling mode (`CONFIGURATIONS`), which CI compiles ahead
of time for sm_80 and sm_90 (`crowdkernels.ops.triton.aot`). The softmaxes are computed as torch computes
them, max first, then the exponentials and their sum, so each loops over its channels twice (the inputs are
low-resolution planes, read again from cache) before the values are used.

Inputs are read at their native resolution and sampled with F.interpolate's index maths (the same as
csrc/gating/gating.h); nothing upsampled is stored. The backward recomputes the samples and softmaxes, and adds
its gradients into native-resolution accumulators (float32, float64 for float64 inputs) with atomics: the order
of the additions, hence the last bits, may vary from run to run on a GPU. The importance sums are reduced per
program and then summed by torch in a fixed order.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from ... import _ext
from . import _launch

_BLOCK = 128  # output pixels per program: one per lane of the 4 warps
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Every constexpr configuration the two kernels can be launched with: (dtype of the tensors, bilinear).
CONFIGURATIONS = [(dtype, bilinear) for dtype in _DTYPES for bilinear in (False, True)]
_INT32_MAX = 2**31 - 1


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
def _taps(y, x, h, w, sy, sx, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Where output pixels (y, x) read an [h, w] plane: the offsets of the four taps in the plane (int32:
    planes hold fewer than 2**31 elements) and the weights (ly, lx); with nearest, the four are one."""
    y0, y1, ly = _axis(y, h, sy, BILINEAR, ACC)
    x0, x1, lx = _axis(x, w, sx, BILINEAR, ACC)
    return y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1, ly, lx


@triton.jit
def _gather(ptr, o00, o01, o10, o11, ly, lx, mask, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """The plane at `ptr` sampled at the taps from `_taps`, in ACC."""
    v = tl.load(ptr + o00, mask=mask, other=0.0).to(ACC)
    if BILINEAR:
        v01 = tl.load(ptr + o01, mask=mask, other=0.0).to(ACC)
        v10 = tl.load(ptr + o10, mask=mask, other=0.0).to(ACC)
        v11 = tl.load(ptr + o11, mask=mask, other=0.0).to(ACC)
        v = (1.0 - ly) * ((1.0 - lx) * v + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    return v


@triton.jit
def _scatter(ptr, o00, o01, o10, o11, ly, lx, g, mask, BILINEAR: tl.constexpr):
    """Adjoint of `_gather`: adds g to the taps in the accumulator plane at `ptr`."""
    if BILINEAR:
        tl.atomic_add(ptr + o00, g * (1.0 - ly) * (1.0 - lx), mask=mask)
        tl.atomic_add(ptr + o01, g * (1.0 - ly) * lx, mask=mask)
        tl.atomic_add(ptr + o10, g * ly * (1.0 - lx), mask=mask)
        tl.atomic_add(ptr + o11, g * ly * lx, mask=mask)
    else:
        tl.atomic_add(ptr + o00, g, mask=mask)


@triton.jit
def _softmax_stats(ptr, stride, n, o00, o01, o10, o11, ly, lx, mask,
                   BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Max and sum of exp(l - max) over the n logit planes ptr, ptr + stride, ... sampled at the taps: the
    softmax's normalizers, in torch's order (max first)."""
    mx = tl.full([BLOCK], float("-inf"), ACC)
    for c in range(n):
        mx = tl.maximum(mx, _gather(ptr + c * stride, o00, o01, o10, o11, ly, lx, mask, BILINEAR, ACC))
    total = tl.zeros([BLOCK], ACC)
    for c in range(n):
        total += tl.exp(_gather(ptr + c * stride, o00, o01, o10, o11, ly, lx, mask, BILINEAR, ACC) - mx)
    return mx, total


@triton.jit
def _expert_taps(GEO, SCL, GROUPS, c, b, y, x, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Expert k = groups.flat[c] at the output pixels: offset of its plane for image b, and its taps. GEO row
    k is (h, w, offset of image 0's plane in the packed experts, batch stride), SCL row k its two scales."""
    k = tl.load(GROUPS + c)
    eh = tl.load(GEO + k * 4).to(tl.int32)
    ew = tl.load(GEO + k * 4 + 1).to(tl.int32)
    base = tl.load(GEO + k * 4 + 2) + b * tl.load(GEO + k * 4 + 3)
    o00, o01, o10, o11, ly, lx = _taps(y, x, eh, ew, tl.load(SCL + k * 2), tl.load(SCL + k * 2 + 1), BILINEAR, ACC)
    return base, o00, o01, o10, o11, ly, lx


@triton.jit
def _gate_taps(GEO, SCL, row, y, x, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """A gate (row K: gate1, K + 1: gate2) at the output pixels: its plane size and its taps (every channel
    of a gate has the same geometry)."""
    h = tl.load(GEO + row * 4).to(tl.int32)
    w = tl.load(GEO + row * 4 + 1).to(tl.int32)
    o00, o01, o10, o11, ly, lx = _taps(y, x, h, w, tl.load(SCL + row * 2), tl.load(SCL + row * 2 + 1), BILINEAR, ACC)
    return (h * w).to(tl.int64), o00, o01, o10, o11, ly, lx


@triton.jit
def _group_map(E, GEO, SCL, G1, GROUPS, g1_base, p1, i, N, b, y, x, t1, pmask,
               BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Group i's map at the output pixels (eq. 1, inner sum): sum_j G1_ij * E_ij, G1_i the softmax over the
    group's N channels of gate1 (planes g1_base + (i*N + j) * p1)."""
    o00, o01, o10, o11, ly, lx = t1
    m1, s1 = _softmax_stats(G1 + g1_base + i * N * p1, p1, N, o00, o01, o10, o11, ly, lx, pmask, BILINEAR, ACC, BLOCK)
    gm = tl.zeros([BLOCK], ACC)
    for j in range(N):
        c = i * N + j
        g1 = tl.exp(_gather(G1 + g1_base + c * p1, o00, o01, o10, o11, ly, lx, pmask, BILINEAR, ACC) - m1) / s1
        eb, e00, e01, e10, e11, ely, elx = _expert_taps(GEO, SCL, GROUPS, c, b, y, x, BILINEAR, ACC)
        gm += g1 * _gather(E + eb, e00, e01, e10, e11, ely, elx, pmask, BILINEAR, ACC)
    return gm


@_launch.jit
def _gating_fwd_kernel(E, GEO, SCL, G1, G2, GROUPS, OUT, GM, IMP, K, M, N, H, W, NBLK,
                       BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // NBLK).to(tl.int64)
    blk = pid % NBLK
    pix = blk * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    pmask = pix < HW
    y = pix // W
    x = pix % W
    p1, a00, a01, a10, a11, aly, alx = _gate_taps(GEO, SCL, K, y, x, BILINEAR, ACC)
    p2, c00, c01, c10, c11, cly, clx = _gate_taps(GEO, SCL, K + 1, y, x, BILINEAR, ACC)
    g1_base = b * M * N * p1
    g2_base = b * M * p2
    m2, s2 = _softmax_stats(G2 + g2_base, p2, M, c00, c01, c10, c11, cly, clx, pmask, BILINEAR, ACC, BLOCK)
    final = tl.zeros([BLOCK], ACC)
    imp_base = (b * NBLK + blk) * M * N
    for i in range(M):
        m1, s1 = _softmax_stats(G1 + g1_base + i * N * p1, p1, N, a00, a01, a10, a11, aly, alx, pmask,
                                BILINEAR, ACC, BLOCK)
        gm = tl.zeros([BLOCK], ACC)
        for j in range(N):
            c = i * N + j
            g1 = tl.exp(_gather(G1 + g1_base + c * p1, a00, a01, a10, a11, aly, alx, pmask, BILINEAR, ACC) - m1) / s1
            eb, e00, e01, e10, e11, ely, elx = _expert_taps(GEO, SCL, GROUPS, c, b, y, x, BILINEAR, ACC)
            gm += g1 * _gather(E + eb, e00, e01, e10, e11, ely, elx, pmask, BILINEAR, ACC)  # eq. 1, inner sum
            # This program's importance partial: the sum over its pixels of G1_ij, one value per (i, j).
            tl.store(IMP + imp_base + c, tl.sum(tl.where(pmask, g1, 0.0), axis=0))
        tl.store(GM + (b * M + i) * HW + pix, gm.to(GM.dtype.element_ty), mask=pmask)
        g2 = tl.exp(_gather(G2 + g2_base + i * p2, c00, c01, c10, c11, cly, clx, pmask, BILINEAR, ACC) - m2) / s2
        final += g2 * gm  # eq. 1, outer sum
    tl.store(OUT + b * HW + pix, final.to(OUT.dtype.element_ty), mask=pmask)


@_launch.jit
def _gating_bwd_kernel(GF, GGM, GIMP, E, GEO, SCL, G1, G2, GROUPS, DE, DG1, DG2, K, M, N, H, W, NBLK,
                       HAS_GF, HAS_GGM, HAS_GIMP,
                       BILINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # HAS_*: whether each output's gradient was given (runtime flags: an absent one reads as zeros through
    # masked-off loads, which touch no memory).
    pid = tl.program_id(0)
    b = (pid // NBLK).to(tl.int64)
    blk = pid % NBLK
    pix = blk * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    pmask = pix < HW
    y = pix // W
    x = pix % W
    p1, a00, a01, a10, a11, aly, alx = _gate_taps(GEO, SCL, K, y, x, BILINEAR, ACC)
    p2, c00, c01, c10, c11, cly, clx = _gate_taps(GEO, SCL, K + 1, y, x, BILINEAR, ACC)
    o1 = (a00, a01, a10, a11, aly, alx)
    g1_base = b * M * N * p1
    g2_base = b * M * p2
    # (flags as vectors: the interpreter mishandles a vector mask & a scalar condition)
    gf = tl.load(GF + b * HW + pix, mask=pmask & ((tl.zeros_like(pix) + HAS_GF) != 0), other=0.0).to(ACC)
    ggm_mask = pmask & ((tl.zeros_like(pix) + HAS_GGM) != 0)
    m2, s2 = _softmax_stats(G2 + g2_base, p2, M, c00, c01, c10, c11, cly, clx, pmask, BILINEAR, ACC, BLOCK)
    # Level 2 needs final = sum_i G2_i * group map i before any of its gradients (softmax backward:
    # dl_i = G2_i * (d_i - sum_k G2_k d_k), d_i = gf * gm_i): a first pass recomputes it, when gf is given.
    dot2 = tl.zeros([BLOCK], ACC)
    if HAS_GF != 0:
        for i in range(M):
            gm = _group_map(E, GEO, SCL, G1, GROUPS, g1_base, p1, i, N, b, y, x, o1, pmask, BILINEAR, ACC, BLOCK)
            g2 = tl.exp(_gather(G2 + g2_base + i * p2, c00, c01, c10, c11, cly, clx, pmask, BILINEAR, ACC) - m2) / s2
            dot2 += g2 * gm
    for i in range(M):
        g2 = tl.exp(_gather(G2 + g2_base + i * p2, c00, c01, c10, c11, cly, clx, pmask, BILINEAR, ACC) - m2) / s2
        m1, s1 = _softmax_stats(G1 + g1_base + i * N * p1, p1, N, a00, a01, a10, a11, aly, alx, pmask,
                                BILINEAR, ACC, BLOCK)
        dgm = gf * g2 + tl.load(GGM + (b * M + i) * HW + pix, mask=ggm_mask, other=0.0).to(ACC)
        # level 1, first pass over the members: the group map, dot1 = sum_j G1_ij dG1_ij with
        # dG1_ij = dgm_i * E_ij (+ d importance_ij, which every pixel's G1_ij receives whole), and the
        # experts' gradients dgm_i * G1_ij.
        gm = tl.zeros([BLOCK], ACC)
        dot1 = tl.zeros([BLOCK], ACC)
        for j in range(N):
            c = i * N + j
            g1 = tl.exp(_gather(G1 + g1_base + c * p1, a00, a01, a10, a11, aly, alx, pmask, BILINEAR, ACC) - m1) / s1
            eb, e00, e01, e10, e11, ely, elx = _expert_taps(GEO, SCL, GROUPS, c, b, y, x, BILINEAR, ACC)
            e = _gather(E + eb, e00, e01, e10, e11, ely, elx, pmask, BILINEAR, ACC)
            gm += g1 * e
            dg1 = dgm * e + tl.load(GIMP + b * M * N + c, mask=HAS_GIMP != 0, other=0.0).to(ACC)
            dot1 += g1 * dg1
            _scatter(DE + eb, e00, e01, e10, e11, ely, elx, dgm * g1, pmask, BILINEAR)
        if HAS_GF != 0:
            _scatter(DG2 + g2_base + i * p2, c00, c01, c10, c11, cly, clx, g2 * gf * (gm - dot2), pmask, BILINEAR)
        # second pass: the gate1 logits' gradients G1_ij * (dG1_ij - dot1), recomputing G1_ij and E_ij
        # (cache reads) rather than keeping N of them per lane.
        for j in range(N):
            c = i * N + j
            g1 = tl.exp(_gather(G1 + g1_base + c * p1, a00, a01, a10, a11, aly, alx, pmask, BILINEAR, ACC) - m1) / s1
            eb, e00, e01, e10, e11, ely, elx = _expert_taps(GEO, SCL, GROUPS, c, b, y, x, BILINEAR, ACC)
            e = _gather(E + eb, e00, e01, e10, e11, ely, elx, pmask, BILINEAR, ACC)
            dg1 = dgm * e + tl.load(GIMP + b * M * N + c, mask=HAS_GIMP != 0, other=0.0).to(ACC)
            _scatter(DG1 + g1_base + c * p1, a00, a01, a10, a11, aly, alx, g1 * (dg1 - dot1), pmask, BILINEAR)


# Under TRITON_INTERPRET=1, torch's wrap_triton hands back the interpreted kernel itself instead of a
# traceable wrapper, so a fake-tensor trace of these ops would run the interpreter on storage-less tensors.
# Only then are launches on fake tensors skipped: shapes and dtypes (all a fake kernel gives) are unchanged.
# With compiled Triton this is never true and wrap_triton records the launch in the graph as usual.
_INTERPRETED = type(_axis).__name__ == "InterpretedFunction"


def _can_launch(t: torch.Tensor) -> bool:
    return not (_INTERPRETED and (is_fake(t) or t.device.type == "meta"))


def grid(batch: int, height: int, width: int) -> tuple[tuple[int], int]:
    """(grid, blocks per image) of both kernels: one axis of batch * ceil(H*W / BLOCK) programs, so the
    batch is not capped by the 65,535 programs of CUDA's grid axes 1 and 2."""
    nblk = triton.cdiv(height * width, _BLOCK)
    return _launch.flat_grid(batch, nblk), nblk


def _geometry(experts, expert_sizes, gate1, gate2, height, width, bilinear):
    """GEO [K+2, 4] int64 (h, w, offset of image 0's plane, batch stride; see `crowdkernels::gating_forward`
    for the two packings) and SCL [K+2, 2] (row, column scale) for the K experts, gate1, gate2, and the
    accumulation dtype. Built once per geometry and device (`_geometry_tensors`): a fresh tensor from Python
    lists on every call would be a blocking host-to-device copy, which CUDA-graph capture forbids. Fake and
    meta tensors (tracing) get fresh ones, never cached."""
    key = (tuple(int(s) for s in expert_sizes), experts.dim(), int(gate1.shape[0]), tuple(gate1.shape[2:]),
           tuple(gate2.shape[2:]), int(height), int(width), bool(bilinear), experts.dtype == torch.float64)
    if is_fake(experts) or experts.device.type == "meta":
        return _geometry_tensors.__wrapped__(*key, experts.device)
    return _geometry_tensors(*key, experts.device)


@functools.lru_cache(maxsize=256)
def _geometry_tensors(sizes, experts_dim, B, g1_hw, g2_hw, height, width, bilinear, fp64, device):
    hw = [(sizes[2 * k], sizes[2 * k + 1]) for k in range(len(sizes) // 2)]
    offsets = np.cumsum([0] + [h * w for h, w in hw])[:-1].tolist()
    S = sum(h * w for h, w in hw)
    if experts_dim == 1:  # expert-major [B * S]
        offsets, bstrides = [B * o for o in offsets], [h * w for h, w in hw]
    else:  # image-major [B, S]
        bstrides = [S] * len(hw)
    hw += [tuple(g1_hw), tuple(g2_hw)]
    offsets += [0, 0]
    bstrides += [0, 0]
    geo = torch.tensor([[h, w, o, s] for (h, w), o, s in zip(hw, offsets, bstrides)], dtype=torch.int64,
                       device=device)
    acc = torch.float64 if fp64 else torch.float32
    # Scales are in/out as ATen computes them: in float32 for nearest (whatever the dtype), in the op-maths
    # type for bilinear (float64 for float64 inputs, float32 otherwise).
    ftype = np.float64 if (bilinear and fp64) else np.float32
    scl = [[float(ftype(h) / ftype(height)), float(ftype(w) / ftype(width))] for h, w in hw]
    scl = torch.tensor(scl, dtype=acc, device=device)
    return geo, scl, acc


def _check(experts, expert_sizes, gate1, gate2, groups, height, width, grads=()):
    """The ops' own argument checks (the public function checks more, e.g. the values in `groups`): the
    kernels index with these shapes, and each dtype combination is a compiled configuration."""
    if experts.dtype not in _DTYPES:
        raise TypeError(f"experts must have a dtype in {_DTYPES}, got {experts.dtype}")
    for name, t in (("gate1", gate1), ("gate2", gate2), *grads):
        if t is not None and t.dtype != experts.dtype:
            raise TypeError(f"{name} must have the experts' dtype {experts.dtype}, got {t.dtype}")
    if groups.dtype != torch.int64:
        raise TypeError(f"groups must be int64, got {groups.dtype}")
    for name, t in (("gate1", gate1), ("gate2", gate2), ("groups", groups), *grads):
        if t is not None and t.device != experts.device:
            raise ValueError(f"{name} must be on the experts' device {experts.device}, got {t.device}")
    if len(expert_sizes) < 4 or len(expert_sizes) % 2 or min(expert_sizes) < 1:
        raise ValueError(f"expert_sizes must hold positive (h, w) of K >= 2 experts, got {list(expert_sizes)}")
    if gate1.dim() != 4 or gate2.dim() != 4 or groups.dim() != 2:
        raise ValueError(f"gate1 and gate2 must be 4-D and groups 2-D, got shapes {tuple(gate1.shape)}, "
                         f"{tuple(gate2.shape)}, {tuple(groups.shape)}")
    K, (M, N), B = len(expert_sizes) // 2, groups.shape, gate1.shape[0]
    if not (M >= 1 and 1 <= N <= K):
        raise ValueError(f"groups must be [M, N] with M >= 1 and 1 <= N <= K = {K}, got {tuple(groups.shape)}")
    S = sum(expert_sizes[2 * k] * expert_sizes[2 * k + 1] for k in range(K))
    want = (B * S,) if experts.dim() == 1 else (B, S)
    if tuple(experts.shape) != want:
        raise ValueError(f"experts must have shape {want} (B = {B}, {S} elements per image), "
                         f"got {tuple(experts.shape)}")
    if gate1.shape[1] != M * N or gate2.shape[0] != B or gate2.shape[1] != M:
        raise ValueError(f"gate1 must be [{B}, {M * N}, h, w] and gate2 [{B}, {M}, h, w], got "
                         f"{tuple(gate1.shape)} and {tuple(gate2.shape)}")
    planes = [expert_sizes[2 * k] * expert_sizes[2 * k + 1] for k in range(K)]
    planes += [gate1.shape[2] * gate1.shape[3], gate2.shape[2] * gate2.shape[3], height * width]
    if height < 1 or width < 1 or max(planes) > _INT32_MAX:
        raise ValueError(f"every plane (experts, gates, output {height}x{width}) must be non-empty and hold "
                         f"at most {_INT32_MAX} elements, got {max(planes)}")
    shapes = {"grad_final": (B, 1, height, width), "grad_group_maps": (B, M, height, width),
              "grad_importance": (B, M, N)}
    for name, t in grads:
        if t is not None and tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]}, got {tuple(t.shape)}")


def _acc_tl(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


@triton_op("crowdkernels::gating_forward_triton", mutates_args=())
def gating_forward_triton(experts: torch.Tensor, expert_sizes: list[int], gate1: torch.Tensor,
                          gate2: torch.Tensor, groups: torch.Tensor, height: int, width: int,
                          bilinear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward of eq. 1; arguments and results as `crowdkernels::gating_forward`."""
    _check(experts, expert_sizes, gate1, gate2, groups, height, width)
    experts, gate1, gate2, groups = (t.contiguous() for t in (experts, gate1, gate2, groups))
    B = gate1.shape[0]
    M, N = groups.shape
    K = len(expert_sizes) // 2
    H, W = height, width
    geo, scl, acc = _geometry(experts, expert_sizes, gate1, gate2, H, W, bilinear)
    launch_grid, nblk = grid(B, H, W)
    final = _ext.new_output((B, 1, H, W), dtype=experts.dtype, device=experts.device)
    group_maps = _ext.new_output((B, M, H, W), dtype=experts.dtype, device=experts.device)
    partial = _ext.new_output((B, nblk, M, N), dtype=acc, device=experts.device)
    if B > 0 and _can_launch(experts):
        _launch.launch(
            _gating_fwd_kernel, launch_grid, experts.device,
            experts, geo, scl, gate1, gate2, groups, final, group_maps, partial, K, M, N, H, W, nblk,
            BILINEAR=bool(bilinear), ACC=_acc_tl(acc), BLOCK=_BLOCK,
        )
    importance = partial.sum(dim=1).to(experts.dtype)
    return final, group_maps, importance


@triton_op("crowdkernels::gating_backward_triton", mutates_args=())
def gating_backward_triton(grad_final: torch.Tensor | None, grad_group_maps: torch.Tensor | None,
                           grad_importance: torch.Tensor | None, experts: torch.Tensor, expert_sizes: list[int],
                           gate1: torch.Tensor, gate2: torch.Tensor, groups: torch.Tensor, height: int,
                           width: int, bilinear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward of eq. 1; arguments and results as `crowdkernels::gating_backward`."""
    grads = (("grad_final", grad_final), ("grad_group_maps", grad_group_maps), ("grad_importance", grad_importance))
    _check(experts, expert_sizes, gate1, gate2, groups, height, width, grads)
    experts, gate1, gate2, groups = (t.contiguous() for t in (experts, gate1, gate2, groups))
    B = gate1.shape[0]
    M, N = groups.shape
    K = len(expert_sizes) // 2
    H, W = height, width
    geo, scl, acc = _geometry(experts, expert_sizes, gate1, gate2, H, W, bilinear)
    launch_grid, nblk = grid(B, H, W)
    # Accumulators for the atomics: they must start at zero (every element is then final).
    d_e = torch.zeros(experts.shape, dtype=acc, device=experts.device)
    d_1 = torch.zeros(gate1.shape, dtype=acc, device=experts.device)
    d_2 = torch.zeros(gate2.shape, dtype=acc, device=experts.device)
    # An absent gradient is passed as `experts` (same dtype, so the same compiled kernel), never read.
    gf, ggm, gimp = (g.contiguous() if g is not None else experts for _, g in grads)
    if B > 0 and _can_launch(experts):
        _launch.launch(
            _gating_bwd_kernel, launch_grid, experts.device,
            gf, ggm, gimp, experts, geo, scl, gate1, gate2, groups, d_e, d_1, d_2, K, M, N, H, W, nblk,
            int(grad_final is not None), int(grad_group_maps is not None), int(grad_importance is not None),
            BILINEAR=bool(bilinear), ACC=_acc_tl(acc), BLOCK=_BLOCK,
        )
    return d_e.to(experts.dtype), d_1.to(gate1.dtype), d_2.to(gate2.dtype)
