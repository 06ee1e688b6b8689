"""Hierarchical gating fusion (HMoDE eq. 1): K multi-scale density experts mixed in two levels.

Level 1 mixes each group of N experts with a pixel-wise softmax gate G1, level 2 mixes the M group maps
with a pixel-wise softmax gate G2. The fused kernels (C++ on the CPU, Triton on a GPU) read the experts and
the gate logits at their own, lower resolutions and sample them at every output pixel exactly as
`F.interpolate` would, so no upsampled copy, softmax or product is ever materialized; the backward kernels
recompute the softmaxes and return gradients at the inputs' native resolutions.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import torch

from .. import _ext
from . import reference
from ._autograd import register_autograd

try:
    from .triton import gating as triton_gating
except ImportError:  # no Triton (or a broken install): the C++ and reference paths still work
    triton_gating = None

__all__ = ["GatingOutput", "hierarchical_gating"]

_MODES = ("nearest", "bilinear")
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------- checks
def _check_experts(experts):
    """-> (planes or None, packed [B, S] or None, sizes [h0, w0, h1, w1, ...])."""
    if isinstance(experts, torch.Tensor):
        if experts.dim() != 4:
            raise ValueError(f"experts must be a list of [B, 1, h, w] tensors or one [B, K, h, w] tensor, "
                             f"got a {experts.dim()}-D tensor of shape {tuple(experts.shape)}")
        B, K, h, w = experts.shape
        if K < 2:
            raise ValueError(f"experts must hold K >= 2 experts, got a tensor with K = {K} channels")
        _check_float("experts", experts)
        return None, experts.reshape(B, K * h * w), [s for _ in range(K) for s in (h, w)]
    if not isinstance(experts, Sequence) or isinstance(experts, str):
        raise TypeError(f"experts must be a list of tensors or a tensor, got {type(experts).__name__}")
    if len(experts) < 2:
        raise ValueError(f"experts must hold K >= 2 experts, got {len(experts)}")
    sizes = []
    for k, e in enumerate(experts):
        name = f"experts[{k}]"
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(e).__name__}")
        if e.dim() != 4 or e.shape[1] != 1:
            raise ValueError(f"{name} must be [B, 1, h, w] (4-D, one channel), got shape {tuple(e.shape)}")
        _check_float(name, e)
        if e.shape[0] != experts[0].shape[0]:
            raise ValueError(f"{name} must have batch size {experts[0].shape[0]} (that of experts[0]), "
                             f"got {e.shape[0]}")
        if e.dtype != experts[0].dtype:
            raise TypeError(f"{name} must have dtype {experts[0].dtype} (that of experts[0]), got {e.dtype}")
        if e.device != experts[0].device:
            raise ValueError(f"{name} must be on {experts[0].device} (that of experts[0]), got {e.device}")
        if e.shape[2] < 1 or e.shape[3] < 1:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(e.shape)}")
        sizes += [e.shape[2], e.shape[3]]  # ints, or symbolic sizes while a model is exported
    return list(experts), None, sizes


def _check_float(name, t):
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


_DEFAULT_GROUPS: dict = {}


def _default_groups(K, device):
    # Built once per (K, device): a fresh tensor (and a host-to-device copy) on every call would cost more
    # than the CPU kernel's checks. Callers never write to it.
    key = (K, device)
    if key not in _DEFAULT_GROUPS:
        _DEFAULT_GROUPS[key] = torch.tensor(list(itertools.combinations(range(K), 2)), dtype=torch.long,
                                            device=device)
    return _DEFAULT_GROUPS[key]


def _check_groups(groups, K, device):
    if groups is None:
        return _default_groups(K, device)
    if not isinstance(groups, torch.Tensor):
        try:
            groups = torch.tensor(groups)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"groups must be a [M, N] integer tensor or nested sequence, got {groups!r}") from exc
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise TypeError(f"groups must hold integer expert indices, got dtype {groups.dtype}")
    if groups.dim() != 2 or groups.shape[0] < 1:
        raise ValueError(f"groups must be [M, N] with M >= 1, got shape {tuple(groups.shape)}")
    N = groups.shape[1]
    if not 1 <= N <= K:
        raise ValueError(f"groups must have 1 <= N <= K = {K} columns, got N = {N}")
    if not torch.compiler.is_exporting():  # an exported model's groups are traced: they hold no values to check
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"groups must index experts 0..{K - 1}, got values in [{lo}, {hi}]")
    return groups.to(device=device, dtype=torch.long).contiguous()


def _check_gate(name, t, B, channels, what, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, {what}, h, w], got shape {tuple(t.shape)}")
    if t.shape[0] != B:
        raise ValueError(f"{name} must have the experts' batch size {B}, got {t.shape[0]}")
    if t.shape[1] != channels:
        raise ValueError(f"{name} must have {what} = {channels} channels, got {t.shape[1]}")
    if t.shape[2] < 1 or t.shape[3] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the experts' dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the experts' device {device}, got {t.device}")


def _check_size(size, sizes):
    if size is None:
        hw = [(sizes[i], sizes[i + 1]) for i in range(0, len(sizes), 2)]
        return max(hw, key=lambda s: s[0] * s[1])
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if isinstance(size, tuple) and len(size) == 2 and any(isinstance(s, torch.SymInt) for s in size):
        return size  # the experts' own symbolic sizes, while a model is exported: int() would fix them
    try:
        H, W = (int(s) for s in size)
        if (H, W) != tuple(size):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"size must be None, an int or (H, W) ints, got {size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got {(H, W)}")
    return H, W


# ------------------------------------------------------------------------------------------------- public API
class GatingOutput(NamedTuple):
    """What `hierarchical_gating` returns.

    final: [B, 1, H, W], the fused density map (E_out of eq. 1; density per output pixel).
    group_maps: [B, M, H, W], sum_j G1_ij * E_ij for each group i.
    importance: [B, M, N], the sum over output pixels of G1_ij (the importance score of sec. III-B-2,
        input of the expert importance loss, eq. 6); unitless, between 0 and H*W.
    """

    final: torch.Tensor
    group_maps: torch.Tensor
    importance: torch.Tensor


def hierarchical_gating(
    experts,
    gate1_logits: torch.Tensor,
    gate2_logits: torch.Tensor,
    groups=None,
    size=None,
    upsample: str = "nearest",
) -> GatingOutput:
    """Fuse K density experts with HMoDE's two-level pixel-wise soft gating (eq. 1):

        E_out = sum_{i<M} G2_i * sum_{j<N} G1_ij * E[groups[i, j]]

    Args:
        experts: a list of K >= 2 tensors [B, 1, h_k, w_k] (sizes may differ), or one tensor [B, K, h, w].
        gate1_logits: [B, M*N, hg, wg]; group i owns channels i*N .. i*N+N-1, softmaxed over those N at each
            pixel to give G1_i.
        gate2_logits: [B, M, hg2, wg2]; softmaxed over the M channels at each pixel to give G2.
        groups: [M, N] expert indices (LongTensor or nested sequence), 1 <= N <= K; default all
            C(K, 2) pairs, `itertools.combinations(range(K), 2)`. Groups may overlap.
        size: output (H, W) (an int means square); default the largest expert's (h, w).
        upsample: "nearest" (F.interpolate's "nearest", as the released HMoDE code uses) or "bilinear"
            (align_corners=False). Every input is sampled at the output pixels as F.interpolate would do,
            inside the kernel. The gates are interpolated as logits, then softmaxed; for "nearest" this is
            the same as softmax-then-upsample.

    Returns:
        GatingOutput(final [B, 1, H, W], group_maps [B, M, H, W], importance [B, M, N]) in the inputs'
        dtype. Differentiable w.r.t. the experts and both gate logits.

    dtypes: float32/float64 everywhere; float16/bfloat16 on CUDA (accumulated in float32). Backend: the
    Triton kernels for CUDA tensors, the C++ kernels for CPU tensors, `reference.hierarchical_gating`
    where neither is available.
    """
    planes, packed, sizes = _check_experts(experts)
    B = planes[0].shape[0] if planes else packed.shape[0]
    K = len(sizes) // 2
    dtype, device = (planes[0] if planes else packed).dtype, (planes[0] if planes else packed).device
    groups = _check_groups(groups, K, device)
    M, N = groups.shape
    _check_gate("gate1_logits", gate1_logits, B, M * N, "M*N", dtype, device)
    _check_gate("gate2_logits", gate2_logits, B, M, "M", dtype, device)
    H, W = _check_size(size, sizes)
    if not isinstance(upsample, str) or upsample not in _MODES:
        raise ValueError(f"upsample must be one of {_MODES}, got {upsample!r}")
    backend = _ext.backend(device, "gating_forward")
    allowed = _GPU_DTYPES if device.type == "cuda" else _CPU_DTYPES
    if dtype not in allowed:
        raise TypeError(f"experts must have a dtype in {allowed} on {device.type}, got {dtype}")

    if backend == "reference":
        if planes is None:
            planes = [packed_e.unsqueeze(1) for packed_e in experts.unbind(1)]
        return GatingOutput(*reference.hierarchical_gating(planes, gate1_logits, gate2_logits, groups, (H, W), upsample))
    if packed is None:
        # Expert-major ([B * S]: each expert's [B, h, w] block in turn): autograd hands each expert's gradient
        # back as a contiguous slice of the op's, which the leaves then take without a copy. An image-major
        # [B, S] packing would leave three strided slices to copy at every backward.
        packed = torch.cat([p.reshape(-1) for p in planes])
    op = torch.ops.crowdkernels.gating_forward_triton if backend == "triton" else torch.ops.crowdkernels.gating_forward
    final, group_maps, importance = op(
        packed, sizes, gate1_logits, gate2_logits, groups, H, W, upsample == "bilinear"
    )
    return GatingOutput(final, group_maps, importance)


# ------------------------------------------------------------------------------------------------------- fake
def _gating_forward_fake(experts, expert_sizes, gate1, gate2, groups, height, width, bilinear):
    B = gate1.shape[0]  # experts may be [B * S] (expert-major)
    M, N = groups.shape
    return (
        experts.new_empty(B, 1, height, width),
        experts.new_empty(B, M, height, width),
        experts.new_empty(B, M, N),
    )


def _gating_backward_fake(grad_final, grad_group_maps, grad_importance, experts, expert_sizes, gate1, gate2,
                          groups, height, width, bilinear):
    return torch.empty_like(experts), torch.empty_like(gate1), torch.empty_like(gate2)


_COMPILED = _ext.compiled() and hasattr(torch.ops.crowdkernels, "gating_forward")
if _COMPILED:
    torch.library.register_fake("crowdkernels::gating_forward")(_gating_forward_fake)
    torch.library.register_fake("crowdkernels::gating_backward")(_gating_backward_fake)


# --------------------------------------------------------------------------------------------------- autograd
# gating_backward(grad_final, grad_group_maps, grad_importance, *the forward's inputs) -> the gradients of
# the experts, gate1 and gate2. Gradients of unused outputs stay None: the kernels treat them as zero without
# a full-size zero tensor. The Triton ops (the GPU path; they run on CPU tensors too under TRITON_INTERPRET=1,
# which is how the tests exercise them without a GPU) have the same formula.
_AUTOGRAD = dict(saved=range(8), grads_of=(0, 2, 3), materialize_grads=False)
if _COMPILED:
    register_autograd("crowdkernels::gating_forward", torch.ops.crowdkernels.gating_backward, **_AUTOGRAD)
if triton_gating is not None:
    register_autograd("crowdkernels::gating_forward_triton", torch.ops.crowdkernels.gating_backward_triton,
                      **_AUTOGRAD)
