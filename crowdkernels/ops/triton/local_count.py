"""Triton kernels of the fused local counts (the GPU path of crowdkernels.local_counts).

Forward: one program per (image, window); it walks its window as a flat range of rows * cols pixels in
BLOCK-wide pieces, keeping lane-wise partial sums, and reduces them at the end, so the summation order is
fixed (deterministic). BLOCK is one of `FORWARD_BLOCKS`, chosen from the window's area (`forward_block`).
Backward: one program per BLOCK pixels of one image (BACKWARD_BLOCK); every pixel reads its window's three
gradients and applies HMoDE sec. III-C's derivatives (the same maths as csrc/local_count/local_count.h).
Both grids have one axis (`_launch.flat_grid`), every integer argument is a runtime value, and which gradients
exist is a runtime flag, so `CONFIGURATIONS` lists every compiled variant the ops can launch (CI compiles
them ahead of time for sm_80 and sm_90: `crowdkernels.ops.triton.aot`).
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests exercise it here).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ... import _ext
from . import _launch

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FORWARD_BLOCKS = (128, 256, 512, 1024)
BACKWARD_BLOCK = 1024
# Every constexpr configuration: ("forward", dtype, BLOCK) and ("backward", dtype, BACKWARD_BLOCK).
CONFIGURATIONS = ([("forward", dtype, block) for dtype in _DTYPES for block in FORWARD_BLOCKS]
                  + [("backward", dtype, BACKWARD_BLOCK) for dtype in _DTYPES])
_INT32_MAX = 2**31 - 1


@_launch.jit
def _local_counts_fwd(
    pred_ptr, target_ptr, pc_ptr, tc_ptr, se_ptr,
    H, W, R, nw, window_h, window_w,
    BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // R
    r = pid % R
    y0 = (r // nw) * window_h
    x0 = (r % nw) * window_w
    # Partial windows at the right/bottom edge end at the image border.
    rows = tl.minimum(window_h, H - y0)
    cols = tl.minimum(window_w, W - x0)
    n = rows * cols
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc_p = tl.zeros((BLOCK,), dtype=acc_dtype)
    acc_t = tl.zeros((BLOCK,), dtype=acc_dtype)
    acc_e = tl.zeros((BLOCK,), dtype=acc_dtype)
    base = (b.to(tl.int64) * H + y0) * W + x0
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n
        offs = base + (idx // cols) * W + idx % cols  # int32 within the image: H * W < 2**31
        p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        d = p - t
        acc_p += p
        acc_t += t
        acc_e += d * d
    out = pid.to(tl.int64)
    tl.store(pc_ptr + out, tl.sum(acc_p, axis=0).to(pc_ptr.dtype.element_ty))
    tl.store(tc_ptr + out, tl.sum(acc_t, axis=0).to(tc_ptr.dtype.element_ty))
    tl.store(se_ptr + out, tl.sum(acc_e, axis=0).to(se_ptr.dtype.element_ty))


@_launch.jit
def _local_counts_bwd(
    gpc_ptr, gtc_ptr, gse_ptr, pred_ptr, target_ptr, gp_ptr, gt_ptr,
    H, W, R, nh, nw, window_h, window_w, NBLK,
    HAS_GPC, HAS_GTC, HAS_GSE, WANT_GP, WANT_GT,
    BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
):
    # HAS_*: which output gradients exist (an absent one reads as zeros through masked-off loads, touching no
    # memory); WANT_*: which input gradients to write. Runtime flags, as vectors (the interpreter mishandles a
    # vector mask & a scalar condition).
    pid = tl.program_id(0)
    b = (pid // NBLK).to(tl.int64)
    pix = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    in_image = pix < H * W
    y = pix // W
    x = pix % W
    wr = y // window_h
    wc = x // window_w
    # Pixels in no counted window (edge="drop") get zero gradient.
    counted = in_image & (wc < nw) & (wr < nh)
    g_off = b * R + wr * nw + wc
    zero = tl.zeros_like(pix)
    g_pc = tl.load(gpc_ptr + g_off, mask=counted & ((zero + HAS_GPC) != 0), other=0.0).to(acc_dtype)
    g_tc = tl.load(gtc_ptr + g_off, mask=counted & ((zero + HAS_GTC) != 0), other=0.0).to(acc_dtype)
    offs = b * H * W + pix
    e = tl.zeros((BLOCK,), dtype=acc_dtype)
    if HAS_GSE != 0:
        # pred and target are read only when the squared error has a gradient.
        g_se = tl.load(gse_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
        p = tl.load(pred_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
        t = tl.load(target_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
        e = 2.0 * (p - t) * g_se
    tl.store(gp_ptr + offs, (g_pc + e).to(gp_ptr.dtype.element_ty), mask=in_image & ((zero + WANT_GP) != 0))
    tl.store(gt_ptr + offs, (g_tc - e).to(gt_ptr.dtype.element_ty), mask=in_image & ((zero + WANT_GT) != 0))


def _num_windows(extent: int, window: int, keep: bool) -> int:
    return -(-extent // window) if keep else extent // window


def forward_block(window_h: int, window_w: int) -> int:
    """The forward's BLOCK for a window of window_h x window_w pixels: its area rounded up to a power of two,
    clamped to FORWARD_BLOCKS (so that a small window does not leave most lanes idle)."""
    area = triton.next_power_of_2(max(int(window_h) * int(window_w), 1))
    return min(max(area, FORWARD_BLOCKS[0]), FORWARD_BLOCKS[-1])


def _check(pred, target, window_h, window_w, grads=()):
    """The ops' own argument checks: the kernels index with these shapes, and each dtype is a compiled
    configuration."""
    if pred.dim() != 3:
        raise ValueError(f"pred must be [B, H, W], got shape {tuple(pred.shape)}")
    if pred.dtype not in _DTYPES:
        raise TypeError(f"pred must have a dtype in {_DTYPES}, got {pred.dtype}")
    B, H, W = pred.shape
    for name, t in (("target", target), *grads):
        if t is not None and t.dtype != pred.dtype:
            raise TypeError(f"{name} must have pred's dtype {pred.dtype}, got {t.dtype}")
        if t is not None and t.device != pred.device:
            raise ValueError(f"{name} must be on pred's device {pred.device}, got {t.device}")
    if tuple(target.shape) != (B, H, W):
        raise ValueError(f"target must have pred's shape {(B, H, W)}, got {tuple(target.shape)}")
    if not (1 <= window_h <= max(H, 1) and 1 <= window_w <= max(W, 1)):
        raise ValueError(f"the window must be between 1x1 and the {H}x{W} map, got {window_h}x{window_w}")
    if H * W > _INT32_MAX:
        raise ValueError(f"pred's planes must hold at most {_INT32_MAX} pixels, got {H}x{W}")


@triton_op("crowdkernels::local_counts_triton", mutates_args=())
def local_counts_triton(
    pred: torch.Tensor, target: torch.Tensor, window_h: int, window_w: int, keep_partial: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the C++ op crowdkernels::local_counts: [B, H, W] maps -> three [B, R] sums."""
    _check(pred, target, window_h, window_w)
    pred = pred.contiguous()
    target = target.contiguous()
    B, H, W = pred.shape
    nh = _num_windows(H, window_h, keep_partial)
    nw = _num_windows(W, window_w, keep_partial)
    R = nh * nw
    outs = [_ext.new_output((B, R), dtype=pred.dtype, device=pred.device) for _ in range(3)]
    if B * R > 0:
        _launch.launch(
            _local_counts_fwd, _launch.flat_grid(B, R), pred.device,
            pred, target, *outs, H, W, R, nw, window_h, window_w,
            BLOCK=forward_block(window_h, window_w), ACC_FP64=pred.dtype == torch.float64,
        )
    return outs[0], outs[1], outs[2]


@triton_op("crowdkernels::local_counts_triton_backward", mutates_args=())
def local_counts_triton_backward(
    grad_pred_counts: Optional[torch.Tensor], grad_target_counts: Optional[torch.Tensor],
    grad_sq_error: Optional[torch.Tensor], pred: torch.Tensor, target: torch.Tensor,
    window_h: int, window_w: int, keep_partial: bool, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as crowdkernels::local_counts_backward: -> (grad_pred, grad_target), each [B, H, W]
    ([0, H, W] where output_mask is False); a None gradient counts as zeros and is not read."""
    grads = (("grad_pred_counts", grad_pred_counts), ("grad_target_counts", grad_target_counts),
             ("grad_sq_error", grad_sq_error))
    _check(pred, target, window_h, window_w, grads)
    B, H, W = pred.shape
    nh = _num_windows(H, window_h, keep_partial)
    nw = _num_windows(W, window_w, keep_partial)
    for name, g in grads:
        if g is not None and tuple(g.shape) != (B, nh * nw):
            raise ValueError(f"{name} must have shape {(B, nh * nw)}, got {tuple(g.shape)}")
    want_gp, want_gt = bool(output_mask[0]), bool(output_mask[1])
    grad_pred = _ext.new_output((B if want_gp else 0, H, W), dtype=pred.dtype, device=pred.device)
    grad_target = _ext.new_output((B if want_gt else 0, H, W), dtype=pred.dtype, device=pred.device)
    if not (want_gp or want_gt):
        return grad_pred, grad_target
    pred = pred.contiguous()
    target = target.contiguous()
    # Absent tensors are replaced by pred as a placeholder pointer (same dtype, so the same compiled kernel);
    # the runtime flags keep it unread and unwritten.
    gpc, gtc, gse = (g.contiguous() if g is not None else pred for _, g in grads)
    nblk = triton.cdiv(H * W, BACKWARD_BLOCK)
    if B > 0:
        _launch.launch(
            _local_counts_bwd, _launch.flat_grid(B, nblk), pred.device,
            gpc, gtc, gse, pred, target,
            grad_pred if want_gp else pred, grad_target if want_gt else pred,
            H, W, nh * nw, nh, nw, window_h, window_w, nblk,
            int(grad_pred_counts is not None), int(grad_target_counts is not None), int(grad_sq_error is not None),
            int(want_gp), int(want_gt),
            BLOCK=BACKWARD_BLOCK, ACC_FP64=pred.dtype == torch.float64,
        )
    return grad_pred, grad_target

