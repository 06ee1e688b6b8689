"""Fused local counts (HMoDE sec. III-C): per-window sums of a predicted and a ground-truth density map and
of their pixel-wise squared error, in one pass, with its own backward pass.

The C++ kernel (csrc/local_count) runs on the CPU, the Triton kernel (ops/triton/local_count.py) on a GPU,
and the plain-PyTorch reference where neither exists.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple, Union

import torch

from .. import _ext
from . import reference
from ._autograd import register_autograd

try:
    from .triton import local_count as triton_local_count
except ImportError:  # no Triton (or a broken install): the C++ and reference paths still work
    triton_local_count = None

Region = Union[float, int, Tuple[int, int]]

EDGES = ("keep", "drop")


# ----------------------------------------------------------------------------------------------------- checks
def window_size(region: Region, height: int, width: int) -> Tuple[int, int]:
    """The window (rh, rw) in pixels that `region` means on a height x width map.

    A float is a fraction of each side: rh = ceil(height * region), rw = ceil(width * region) (0.125 is
    the paper's 1/8; products within 1e-9 of an integer are not rounded up). An int is a square window in
    pixels, a pair of ints (rh, rw). Raises ValueError when the window is empty or larger than the map.
    """
    if isinstance(region, bool):
        raise TypeError(f"region must be a float fraction, an int or a pair of ints, got {region!r}")
    if isinstance(region, numbers.Integral):
        rh = rw = int(region)
    elif isinstance(region, numbers.Real):
        region = float(region)
        if not (0.0 < region <= 1.0):
            raise ValueError(
                f"region as a fraction of the map must be in (0, 1], got {region} (a window larger than the "
                f"{height}x{width} map)" if region > 1 else f"region must be > 0, got {region}"
            )
        rh = max(1, math.ceil(height * region - 1e-9))
        rw = max(1, math.ceil(width * region - 1e-9))
    elif isinstance(region, (tuple, list)) and len(region) == 2 and all(
        isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in region
    ):
        rh, rw = int(region[0]), int(region[1])
    else:
        raise TypeError(f"region must be a float fraction, an int or a pair of ints, got {region!r}")
    if rh <= 0 or rw <= 0:
        raise ValueError(f"region must be > 0 pixels, got {region!r}")
    if rh > height or rw > width:
        raise ValueError(
            f"region must fit in the {height}x{width} map, got a {rh}x{rw} window (region={region!r})"
        )
    return rh, rw


def _as_maps(pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a Tensor, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if pred.dim() == 4 and pred.shape[1] == 1:
        pass
    elif pred.dim() != 3:
        raise ValueError(f"pred must be [B, 1, H, W] or [B, H, W], got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if not pred.dtype.is_floating_point:
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target must have pred's dtype {pred.dtype}, got {target.dtype}")
    if target.device != pred.device:
        raise ValueError(f"target must be on pred's device {pred.device}, got {target.device}")
    if pred.shape[0] == 0 or pred.shape[-1] == 0 or pred.shape[-2] == 0:
        raise ValueError(f"pred must not be empty, got shape {tuple(pred.shape)}")
    B, H, W = pred.shape[0], pred.shape[-2], pred.shape[-1]
    return pred.reshape(B, H, W), target.reshape(B, H, W)


# ------------------------------------------------------------------------------------------------- public API
def local_counts(pred: torch.Tensor, target: torch.Tensor, region: Region = 0.125, edge: str = "keep"):
    """Per-window sums of `pred`, of `target` and of their pixel-wise squared error, in one fused pass.

    HMoDE sec. III-C: the local counting maps X and Xg integrate the density over evenly partitioned,
    non-overlapping windows; the local error map R integrates the pixel-wise squared error
    (pred - target)^2 over the same windows. So ``sq_error[b, r] = sum over window r of (pred - target)^2``,
    as the paper describes and the authors' released code computes (an MSE map summed by AvgPool2d x area);
    it is not (pred_count - target_count)^2 - that would be ``(pred_counts - target_counts) ** 2``.

    Args:
        pred, target: ``[B, 1, H, W]`` or ``[B, H, W]`` density maps (people per pixel), same shape, dtype
            (float16, bfloat16, float32, float64; half types are accumulated in float32) and device.
        region: the window: a float fraction of (H, W) (rh = ceil(H * region), rw = ceil(W * region);
            0.125 is the paper's 1/8), an int (square window, pixels) or a pair (rh, rw) of ints.
        edge: ``"keep"`` counts the partial windows at the right and bottom edges; ``"drop"`` ignores them
            and the pixels they hold (what ``AvgPool2d(kernel_size=stride=window)`` does).

    Returns:
        ``(pred_counts, target_counts, sq_error)``, each ``[B, R]`` in pred's dtype, with
        R = nh * nw windows in row-major order (nh = ceil(H / rh) with "keep", floor with "drop").

    Gradients flow to `pred`, and to `target` too when it requires grad (a teacher's prediction used as
    the target, for instance): d pred_counts / d pred = 1, d sq_error / d pred = 2 (pred - target) inside
    the window, 0 for pixels in no window. The backward is a kernel of its own (``local_counts_backward``).

    Example::

        pc, tc, se = crowdkernels.local_counts(model(images), gt_density, region=0.125)
        count_loss = ((pc - tc) ** 2).sum(dim=1).mean()
    """
    p, t = _as_maps(pred, target)
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    rh, rw = window_size(region, p.shape[1], p.shape[2])
    keep = edge == "keep"
    backend = _ext.backend(p.device, "local_counts")
    if backend == "triton":
        return torch.ops.crowdkernels.local_counts_triton(p, t, rh, rw, keep)
    if backend == "cpu":
        return torch.ops.crowdkernels.local_counts(p, t, rh, rw, keep)
    return reference.local_counts(p, t, rh, rw, keep)


# ------------------------------------------------------------------------------------------------------- fake
def _num_windows(extent: int, window: int, keep: bool) -> int:
    return -(-extent // window) if keep else extent // window


def _local_counts_fake(pred, target, window_h, window_w, keep_partial):
    B, H, W = pred.shape
    R = _num_windows(H, window_h, keep_partial) * _num_windows(W, window_w, keep_partial)
    return tuple(pred.new_empty(B, R) for _ in range(3))


def _local_counts_backward_fake(gpc, gtc, gse, pred, target, window_h, window_w, keep_partial, output_mask):
    B, H, W = pred.shape
    return pred.new_empty(B if output_mask[0] else 0, H, W), target.new_empty(B if output_mask[1] else 0, H, W)


if _ext.compiled():
    torch.library.register_fake("crowdkernels::local_counts")(_local_counts_fake)
    torch.library.register_fake("crowdkernels::local_counts_backward")(_local_counts_backward_fake)


# --------------------------------------------------------------------------------------------------- autograd
# local_counts_backward(grad_pred_counts, grad_target_counts, grad_sq_error, pred, target, window_h, window_w,
# keep_partial, output_mask) -> (grad_pred, grad_target). Gradients of outputs that did not reach the loss
# stay None and are passed on as None, so the kernel skips them (REL, for one, never differentiates
# sq_error, so pred and target are not even read). The Triton op (the GPU path) has the same formula.
_AUTOGRAD = dict(saved=range(5), grads_of=(0, 1), output_mask=True, materialize_grads=False)
if _ext.compiled():
    register_autograd("crowdkernels::local_counts", torch.ops.crowdkernels.local_counts_backward, **_AUTOGRAD)
if triton_local_count is not None:
    register_autograd("crowdkernels::local_counts_triton", torch.ops.crowdkernels.local_counts_triton_backward,
                      **_AUTOGRAD)
