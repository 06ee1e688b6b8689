"""Triton kernels of the fused local counts (the GPU path of crowdkernels.local_counts).

Forward: one program per (image, window); it walks its window in BLOCK_H x BLOCK_W tiles, keeping
element-wise partial sums, and reduces them at the end, so the summation order is fixed (deterministic).
Backward: one program per (image, pixel row, column block); every pixel reads its window's three
gradients and applies HMoDE sec. III-C's derivatives (the same maths as csrc/local_count/local_count.h).
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests exercise it here).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ... import _ext


@triton.jit
def _local_counts_fwd(
    pred_ptr, target_ptr, pc_ptr, tc_ptr, se_ptr,
    H, W, R, nw, window_h, window_w,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // R
    r = pid % R
    y0 = (r // nw) * window_h
    x0 = (r % nw) * window_w
    # Partial windows at the right/bottom edge end at the image border.
    rows = tl.minimum(window_h, H - y0)
    cols = tl.minimum(window_w, W - x0)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc_p = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_dtype)
    acc_t = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_dtype)
    acc_e = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_dtype)
    oy = tl.arange(0, BLOCK_H)
    ox = tl.arange(0, BLOCK_W)
    base = b.to(tl.int64) * H * W
    for dy in range(0, rows, BLOCK_H):
        for dx in range(0, cols, BLOCK_W):
            yy = dy + oy
            xx = dx + ox
            mask = (yy[:, None] < rows) & (xx[None, :] < cols)
            offs = base + (y0 + yy)[:, None].to(tl.int64) * W + (x0 + xx)[None, :]
            p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            d = p - t
            acc_p += p
            acc_t += t
            acc_e += d * d
    out = pid.to(tl.int64)
    tl.store(pc_ptr + out, tl.sum(tl.sum(acc_p, axis=1), axis=0).to(pc_ptr.dtype.element_ty))
    tl.store(tc_ptr + out, tl.sum(tl.sum(acc_t, axis=1), axis=0).to(tc_ptr.dtype.element_ty))
    tl.store(se_ptr + out, tl.sum(tl.sum(acc_e, axis=1), axis=0).to(se_ptr.dtype.element_ty))


@triton.jit
def _local_counts_bwd(
    gpc_ptr, gtc_ptr, gse_ptr, pred_ptr, target_ptr, gp_ptr, gt_ptr,
    H, W, R, nh, nw, window_h, window_w,
    HAS_GPC: tl.constexpr, HAS_GTC: tl.constexpr, HAS_GSE: tl.constexpr,
    WANT_GP: tl.constexpr, WANT_GT: tl.constexpr,
    BLOCK_W: tl.constexpr, ACC_FP64: tl.constexpr,
):
    row = tl.program_id(0)  # b * H + y
    b = row // H
    y = row % H
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    in_image = x < W
    wr = y // window_h
    wc = x // window_w
    # Pixels in no counted window (edge="drop") get zero gradient.
    counted = in_image & (wc < nw) & ((wr + tl.zeros_like(x)) < nh)
    g_off = b.to(tl.int64) * R + wr * nw + wc
    zero = tl.zeros((BLOCK_W,), dtype=acc_dtype)
    g_pc = zero
    g_tc = zero
    e = zero
    if HAS_GPC:
        g_pc = tl.load(gpc_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
    if HAS_GTC:
        g_tc = tl.load(gtc_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
    offs = row.to(tl.int64) * W + x
    if HAS_GSE:
        # pred and target are read only when the squared error has a gradient.
        g_se = tl.load(gse_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
        p = tl.load(pred_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
        t = tl.load(target_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
        e = 2.0 * (p - t) * g_se
    if WANT_GP:
        tl.store(gp_ptr + offs, (g_pc + e).to(gp_ptr.dtype.element_ty), mask=in_image)
    if WANT_GT:
        tl.store(gt_ptr + offs, (g_tc - e).to(gt_ptr.dtype.element_ty), mask=in_image)


def _num_windows(extent: int, window: int, keep: bool) -> int:
    return -(-extent // window) if keep else extent // window


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


@triton_op("crowdkernels::local_counts_triton", mutates_args=())
def local_counts_triton(
    pred: torch.Tensor, target: torch.Tensor, window_h: int, window_w: int, keep_partial: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the C++ op crowdkernels::local_counts: [B, H, W] maps -> three [B, R] sums."""
    pred = pred.contiguous()
    target = target.contiguous()
    B, H, W = pred.shape
    nh = _num_windows(H, window_h, keep_partial)
    nw = _num_windows(W, window_w, keep_partial)
    R = nh * nw
    outs = [_ext.new_output((B, R), dtype=pred.dtype, device=pred.device) for _ in range(3)]
    if B * R > 0:
        wrap_triton(_local_counts_fwd)[(B * R,)](
            pred, target, *outs, H, W, R, nw, window_h, window_w,
            BLOCK_H=_block(window_h, 16), BLOCK_W=_block(window_w, 64),
            ACC_FP64=pred.dtype == torch.float64,
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
    B, H, W = pred.shape
    nh = _num_windows(H, window_h, keep_partial)
    nw = _num_windows(W, window_w, keep_partial)
    want_gp, want_gt = bool(output_mask[0]), bool(output_mask[1])
    grad_pred = _ext.new_output((B if want_gp else 0, H, W), dtype=pred.dtype, device=pred.device)
    grad_target = _ext.new_output((B if want_gt else 0, H, W), dtype=pred.dtype, device=pred.device)
    if not (want_gp or want_gt):
        return grad_pred, grad_target
    pred = pred.contiguous()
    target = target.contiguous()
    # Absent tensors are replaced by pred as a placeholder pointer; the constexpr flags keep it unread.
    gpc, gtc, gse = (g.contiguous() if g is not None else pred
                     for g in (grad_pred_counts, grad_target_counts, grad_sq_error))
    block_w = _block(W, 1024)
    wrap_triton(_local_counts_bwd)[(B * H, triton.cdiv(W, block_w))](
        gpc, gtc, gse, pred, target,
        grad_pred if want_gp else pred, grad_target if want_gt else pred,
        H, W, nh * nw, nh, nw, window_h, window_w,
        HAS_GPC=grad_pred_counts is not None, HAS_GTC=grad_target_counts is not None,
        HAS_GSE=grad_sq_error is not None, WANT_GP=want_gp, WANT_GT=want_gt,
        BLOCK_W=block_w, ACC_FP64=pred.dtype == torch.float64,
    )
    return grad_pred, grad_target


def _setup_context(ctx, inputs, output):
    pred, target, window_h, window_w, keep_partial = inputs
    ctx.save_for_backward(pred, target)
    ctx.window = (window_h, window_w, keep_partial)
    # Unused outputs' gradients stay None (not zero tensors) so the backward kernel can skip them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_pred_counts, grad_target_counts, grad_sq_error):
    pred, target = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_pred, grad_target = local_counts_triton_backward(
        grad_pred_counts, grad_target_counts, grad_sq_error, pred, target, *ctx.window, mask)
    return (grad_pred if mask[0] else None), (grad_target if mask[1] else None), None, None, None


local_counts_triton.register_autograd(_backward, setup_context=_setup_context)
