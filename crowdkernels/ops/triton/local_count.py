"""Triton kernels of the fused local counts (the GPU path of crowdkernels.local_counts).

Forward: one program per (image, window); it walks its window in BLOCK_H x BLOCK_W tiles, keeping
element-wise partial sums, and reduces them at the end, so the summation order is fixed (deterministic).
Backward: one program per (image, pixel row, column block); every pixel reads its window's three
gradients and applies HMoDE sec. III-C's derivatives (the same maths as csrc/local_count/local_count.h).
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests exercise it here).
"""
from __future__ import annotations

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
    g_pc = tl.load(gpc_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
    g_tc = tl.load(gtc_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
    g_se = tl.load(gse_ptr + g_off, mask=counted, other=0.0).to(acc_dtype)
    offs = row.to(tl.int64) * W + x
    p = tl.load(pred_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
    t = tl.load(target_ptr + offs, mask=counted, other=0.0).to(acc_dtype)
    e = 2.0 * (p - t) * g_se
    tl.store(gp_ptr + offs, (g_pc + e).to(gp_ptr.dtype.element_ty), mask=in_image)
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
    grad_pred_counts: torch.Tensor, grad_target_counts: torch.Tensor, grad_sq_error: torch.Tensor,
    pred: torch.Tensor, target: torch.Tensor, window_h: int, window_w: int, keep_partial: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as crowdkernels::local_counts_backward: -> (grad_pred, grad_target), each [B, H, W]."""
    pred = pred.contiguous()
    target = target.contiguous()
    B, H, W = pred.shape
    nh = _num_windows(H, window_h, keep_partial)
    nw = _num_windows(W, window_w, keep_partial)
    grad_pred = _ext.new_output((B, H, W), dtype=pred.dtype, device=pred.device)
    grad_target = _ext.new_output((B, H, W), dtype=pred.dtype, device=pred.device)
    block_w = _block(W, 1024)
    wrap_triton(_local_counts_bwd)[(B * H, triton.cdiv(W, block_w))](
        grad_pred_counts.contiguous(), grad_target_counts.contiguous(), grad_sq_error.contiguous(),
        pred, target, grad_pred, grad_target, H, W, nh * nw, nh, nw, window_h, window_w,
        BLOCK_W=block_w, ACC_FP64=pred.dtype == torch.float64,
    )
    return grad_pred, grad_target


def _setup_context(ctx, inputs, output):
    pred, target, window_h, window_w, keep_partial = inputs
    ctx.save_for_backward(pred, target)
    ctx.window = (window_h, window_w, keep_partial)


def _backward(ctx, grad_pred_counts, grad_target_counts, grad_sq_error):
    pred, target = ctx.saved_tensors
    window_h, window_w, keep = ctx.window
    R = _num_windows(pred.shape[1], window_h, keep) * _num_windows(pred.shape[2], window_w, keep)
    grads = [g if g is not None else pred.new_zeros(pred.shape[0], R)
             for g in (grad_pred_counts, grad_target_counts, grad_sq_error)]
    grad_pred, grad_target = local_counts_triton_backward(*grads, pred, target, window_h, window_w, keep)
    return grad_pred, grad_target, None, None, None


local_counts_triton.register_autograd(_backward, setup_context=_setup_context)
