"""hierarchical_gating (HMoDE eq. 1): every backend against the eager reference written from eq. 1."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import gating as gating_mod
from crowdkernels.ops import reference

MODES = ["nearest", "bilinear"]

# (name, expert sizes, groups or None, gate1 size, gate2 size, output size). Output sizes are deliberately
# not multiples of the inputs'; "down" makes an expert larger than the output (rows/columns skipped).
CASES = [
    ("K3N2", [(10, 12), (5, 6), (3, 4)], None, (4, 5), (4, 5), (75, 90)),
    ("K4N3", [(9, 11), (5, 6), (3, 3), (2, 3)], list(itertools.combinations(range(4), 3)), (3, 4), (5, 3), (23, 29)),
    ("K4N2", [(8, 8), (4, 4), (2, 2), (4, 3)], list(itertools.combinations(range(4), 2)), (2, 2), (2, 2), (17, 19)),
    ("N1", [(6, 7), (3, 4), (2, 2)], [[2], [0], [1], [0]], (3, 3), (2, 5), (13, 15)),
    ("down", [(12, 9), (4, 5)], [[1, 0]], (6, 2), (1, 1), (7, 11)),
]


def make_inputs(experts_hw, groups, g1_hw, g2_hw, B=2, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = len(experts_hw)
    groups = torch.tensor(groups if groups is not None else list(itertools.combinations(range(K), 2)))
    M, N = groups.shape
    experts = [torch.rand(B, 1, h, w, generator=gen, dtype=torch.float64).to(device, dtype) for h, w in experts_hw]
    g1 = (2 * torch.randn(B, M * N, *g1_hw, generator=gen, dtype=torch.float64)).to(device, dtype)
    g2 = (2 * torch.randn(B, M, *g2_hw, generator=gen, dtype=torch.float64)).to(device, dtype)
    return experts, g1, g2, groups.to(device)


def upstream(B, M, N, size, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
        for shape in ((B, 1, *size), (B, M, *size), (B, M, N))
    )


def reference_with_grads(experts, g1, g2, groups, size, mode, grads):
    leaves = [t.detach().clone().requires_grad_() for t in [*experts, g1, g2]]
    K = len(experts)
    out = reference.hierarchical_gating(leaves[:K], leaves[K], leaves[K + 1], groups, size, mode)
    return out, torch.autograd.grad(out, leaves, grads)


def assert_close_all(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- public function


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_reference(device, case, mode):
    _, ehw, groups, g1hw, g2hw, size = case
    experts, g1, g2, groups_t = make_inputs(ehw, groups, g1hw, g2hw, device=device)
    M, N = groups_t.shape
    grads = upstream(2, M, N, size, torch.float64, device)
    want, want_grads = reference_with_grads(experts, g1, g2, groups_t, size, mode, grads)
    leaves = [t.detach().clone().requires_grad_() for t in [*experts, g1, g2]]
    K = len(experts)
    with _ext.poisoned_outputs():
        got = ck.hierarchical_gating(leaves[:K], leaves[K], leaves[K + 1], groups=groups, size=size, upsample=mode)
        got_grads = torch.autograd.grad(got, leaves, grads)
    assert isinstance(got, ck.GatingOutput)
    assert got.final.shape == (2, 1, *size) and got.group_maps.shape == (2, M, *size)
    assert got.importance.shape == (2, M, N)
    assert_close_all(got, want, rtol=1e-12, atol=1e-12)
    assert_close_all(got_grads, want_grads, rtol=1e-10, atol=1e-10)


def test_default_groups_size_and_stacked_experts(device):
    experts, g1, g2, _ = make_inputs([(6, 8)] * 3, None, (3, 4), (3, 4), device=device)
    stacked = torch.cat(experts, dim=1).requires_grad_()
    out = ck.hierarchical_gating(stacked, g1, g2)
    want = reference.hierarchical_gating(experts, g1, g2, torch.tensor([[0, 1], [0, 2], [1, 2]]), (6, 8))
    assert_close_all(out, want, rtol=1e-12, atol=1e-12)
    # Only `final` is used: the other outputs' gradients arrive as None and count as zero.
    (g_stacked,) = torch.autograd.grad(out.final.sum(), stacked)
    leaves = [e.clone().requires_grad_() for e in experts]
    ref = reference.hierarchical_gating(leaves, g1, g2, torch.tensor([[0, 1], [0, 2], [1, 2]]), (6, 8))
    torch.testing.assert_close(g_stacked, torch.cat(torch.autograd.grad(ref[0].sum(), leaves), 1))
    # The importance of a group sums to the number of output pixels.
    torch.testing.assert_close(out.importance.sum(-1), torch.full((2, 3), 48.0, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_is_f_interpolate(device, mode, dtype):
    # With N = 1 every G1 is exactly 1, so group map i is expert i sampled as the kernel samples it.
    # Awkward ratios: float32 index rounding must match ATen's (nearest bit-exactly).
    hw = [(13, 7), (37, 3), (10, 12), (3, 29)]
    size = (100, 75)
    experts = [torch.rand(1, 1, h, w, dtype=dtype, device=device) for h, w in hw]
    g1 = torch.zeros(1, 4, 2, 2, dtype=dtype, device=device)
    out = ck.hierarchical_gating(experts, g1, g1, groups=[[0], [1], [2], [3]], size=size, upsample=mode)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    want = torch.cat([F.interpolate(e, size=size, mode=mode, **kw) for e in experts], dim=1)
    if mode == "nearest":
        assert torch.equal(out.group_maps, want)
    else:
        tol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(out.group_maps, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(device, mode, dtype):
    # The CPU softmax has its own exp (vectorizable, clamped at -87 / -708): gaps of thousands, -inf logits
    # and gaps right at the clamps must still give the softmax torch gives. (-inf only with nearest: bilinear
    # interpolation of -inf with a zero weight is NaN in F.interpolate too.)
    experts, g1, g2, groups = make_inputs([(6, 8), (3, 4), (2, 2)], None, (3, 4), (3, 4), dtype=dtype,
                                          device=device)
    g1 = g1 * 500
    g1[:, 2, 1, :] = g1[:, 3, 1, :] - torch.tensor([86.9, 87.1, 707.9, 708.1], dtype=dtype, device=device)
    g2 = g2 * 500
    if mode == "nearest":
        g1[:, 0, 0, 0] = -float("inf")
        g2[:, 1, 2, 3] = -float("inf")
    got = ck.hierarchical_gating(experts, g1, g2, groups=groups, size=(11, 13), upsample=mode)
    want = reference.hierarchical_gating(experts, g1, g2, groups, (11, 13), mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert all(torch.isfinite(t).all() for t in got)
    assert_close_all(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_cpp(mode):
    experts, g1, g2, groups = make_inputs([(3, 4), (2, 3), (2, 2)], None, (2, 2), (1, 3), B=1)
    leaves = [t.requires_grad_() for t in [*experts, g1, g2]]

    def fn(*xs):
        return tuple(ck.hierarchical_gating(list(xs[:3]), xs[3], xs[4], size=(5, 7), upsample=mode))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_cpu_backward_is_deterministic_across_thread_counts():
    experts, g1, g2, groups = make_inputs([(32, 40), (16, 20), (8, 10)], None, (4, 5), (4, 5), B=3,
                                          dtype=torch.float32)
    packed = torch.cat([e.reshape(3, -1) for e in experts], 1)
    sizes = [s for e in experts for s in e.shape[2:]]
    grads = upstream(3, 3, 2, (97, 121), torch.float32, "cpu")
    old = torch.get_num_threads()
    results = []
    try:
        # B = 3: up to 3 threads each image has its own thread (one pass); with 4, the two-pass schedule
        # runs. Both must give the same bits.
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            for bilinear in (False, True):
                fwd = torch.ops.crowdkernels.gating_forward(packed, sizes, g1, g2, groups, 97, 121, bilinear)
                bwd = torch.ops.crowdkernels.gating_backward(*grads, packed, sizes, g1, g2, groups, 97, 121,
                                                             bilinear)
                results.append((threads, bilinear, fwd + bwd))
    finally:
        torch.set_num_threads(old)
    for bilinear in (False, True):
        runs = [r for t, b, r in results if b == bilinear]
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


LAYOUTS = ["image_major", "expert_major"]


def _pack(experts, layout):
    """The two packings the ops take: [B, S] (each image's planes in turn) or [B * S] (each expert's block)."""
    B = experts[0].shape[0]
    if layout == "image_major":
        return torch.cat([e.reshape(B, -1) for e in experts], 1)
    return torch.cat([e.reshape(-1) for e in experts])


def _op_args(mode="nearest", B=2, size=(7, 9), layout="image_major"):
    experts, g1, g2, groups = make_inputs([(4, 5), (2, 3), (3, 2)], None, (2, 3), (3, 3), B=B)
    sizes = [s for e in experts for s in e.shape[2:]]
    return _pack(experts, layout), sizes, g1, g2, groups, size[0], size[1], mode == "bilinear"


@pytest.mark.parametrize("mode", MODES)
def test_layouts_give_the_same_bits(mode):
    # The same experts packed image-major and expert-major: the same outputs, and the same expert gradients
    # (each in its input's layout).
    experts, g1, g2, groups = make_inputs([(9, 11), (5, 6), (3, 3)], None, (3, 4), (5, 3), B=3)
    grads = upstream(3, 3, 2, (23, 29), torch.float64, "cpu")
    sizes = [s for e in experts for s in e.shape[2:]]
    ops = [(torch.ops.crowdkernels.gating_forward, torch.ops.crowdkernels.gating_backward)]
    if gating_mod.triton_gating is not None and os.environ.get("TRITON_INTERPRET") == "1":
        ops.append((torch.ops.crowdkernels.gating_forward_triton, torch.ops.crowdkernels.gating_backward_triton))
    for fwd, bwd in ops:
        res = {}
        for layout in LAYOUTS:
            packed = _pack(experts, layout)
            args = (packed, sizes, g1, g2, groups, 23, 29, mode == "bilinear")
            with _ext.poisoned_outputs():
                res[layout] = (fwd(*args), bwd(*grads, *args))
        (out_i, (ge_i, g1_i, g2_i)), (out_e, (ge_e, g1_e, g2_e)) = res["image_major"], res["expert_major"]
        assert all(torch.equal(a, b) for a, b in zip(out_i, out_e))
        assert torch.equal(g1_i, g1_e) and torch.equal(g2_i, g2_e)
        splits = [h * w for h, w in zip(sizes[::2], sizes[1::2])]
        per_expert_i = [t.reshape(-1) for t in ge_i.split(splits, dim=1)]
        per_expert_e = list(ge_e.split([3 * n for n in splits]))
        assert all(torch.equal(a, b) for a, b in zip(per_expert_i, per_expert_e))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_cpp(mode, layout):
    packed, sizes, g1, g2, groups, H, W, bil = _op_args(mode, layout=layout)
    fwd = (packed.requires_grad_(), sizes, g1.requires_grad_(), g2.requires_grad_(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_forward.default, fwd)
    grads = upstream(2, 3, 2, (H, W), torch.float64, "cpu")
    base = (packed.detach(), sizes, g1.detach(), g2.detach(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_backward.default, (*grads, *base))
    torch.library.opcheck(torch.ops.crowdkernels.gating_backward.default, (grads[0], None, None, *base))


def test_torch_compile_module():
    # Kept tiny: Inductor's compile time on a 2-core machine dominates this file otherwise.
    class Fuse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g2 = torch.nn.Parameter(torch.randn(1, 3, 2, 2))

        def forward(self, e1, e2, e3, g1):
            return ck.hierarchical_gating([e1, e2, e3], g1, self.g2, size=(12, 16)).final

    torch.manual_seed(0)
    fuse = Fuse()
    args = [torch.rand(1, 1, 12, 16, requires_grad=True), torch.rand(1, 1, 6, 8), torch.rand(1, 1, 3, 4),
            torch.randn(1, 6, 2, 2)]
    want = fuse(*args)
    (want_grad,) = torch.autograd.grad(want.sum(), args[0])
    got = torch.compile(fuse, fullgraph=True)(*args)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    torch.testing.assert_close(args[0].grad, want_grad)
    assert fuse.g2.grad is not None and fuse.g2.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- bad input


def _good():
    experts, g1, g2, _ = make_inputs([(6, 8), (3, 4), (2, 2)], None, (2, 2), (2, 2))
    return dict(experts=experts, gate1_logits=g1, gate2_logits=g2)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(gate1_logits=a["gate1_logits"][:, :5]), ValueError, "gate1_logits"),
        (lambda a: a.update(gate2_logits=a["gate2_logits"][:, :2]), ValueError, "gate2_logits"),
        (lambda a: a.update(groups=[[0, 3], [1, 2]]), ValueError, "groups"),
        (lambda a: a.update(groups=[[0, -1]]), ValueError, "groups"),
        (lambda a: a.update(groups=[[0, 1, 2, 0]]), ValueError, "groups"),
        (lambda a: a.update(groups=torch.tensor([[0.0, 1.0]])), TypeError, "groups"),
        (lambda a: a.update(gate2_logits=a["gate2_logits"][:1]), ValueError, "gate2_logits"),
        (lambda a: a["experts"].__setitem__(1, a["experts"][1][:1]), ValueError, r"experts\[1\]"),
        (lambda a: a.update(upsample="bicubic"), ValueError, "upsample"),
        (lambda a: a["experts"].__setitem__(0, a["experts"][0][0]), ValueError, r"experts\[0\]"),
        (lambda a: a["experts"].__setitem__(2, a["experts"][2].expand(2, 2, 2, 2)), ValueError, r"experts\[2\]"),
        (lambda a: a.update(experts=a["experts"][:1]), ValueError, "experts"),
        (lambda a: a.update(experts=torch.rand(2, 3, 4)), ValueError, "experts"),
        (lambda a: a["experts"].__setitem__(1, a["experts"][1].float()), TypeError, r"experts\[1\]"),
        (lambda a: a.update(gate1_logits=a["gate1_logits"].float()), TypeError, "gate1_logits"),
        (lambda a: a.update(gate2_logits=a["gate2_logits"].to("meta")), ValueError, "gate2_logits"),
        (lambda a: a["experts"].__setitem__(0, a["experts"][0].to("meta")), ValueError, r"experts\[1\]"),
        (lambda a: a.update(size=(0, 5)), ValueError, "size"),
        (lambda a: a.update(size="big"), TypeError, "size"),
        (lambda a: a.update(gate1_logits=a["gate1_logits"].reshape(2, 6, 4)), ValueError, "gate1_logits"),
    ],
)
def test_bad_input(change, exc, match):
    args = _good()
    args["experts"] = list(args["experts"])
    change(args)
    with pytest.raises(exc, match=match):
        ck.hierarchical_gating(**args)


def test_half_precision_is_refused_on_cpu():
    args = _good()
    args = {k: ([e.half() for e in v] if k == "experts" else v.half()) for k, v in args.items()}
    with pytest.raises(TypeError, match="experts"):
        ck.hierarchical_gating(**args)


# ------------------------------------------------------------------------------------- Triton kernels

triton_runs = pytest.mark.skipif(
    not (gating_mod.triton_gating is not None and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 with Triton importable",
)

# Output sizes around the 128-pixel block: partial last blocks, a single partial block, exact multiples.
TRITON_CASES = [
    ("K3N2", [(10, 12), (5, 6), (3, 4)], None, (4, 5), (4, 5), (13, 17)),
    ("K4N3", [(9, 11), (5, 6), (3, 3), (2, 3)], list(itertools.combinations(range(4), 3)), (3, 4), (5, 3), (8, 16)),
    ("K4N2", [(8, 8), (4, 4), (2, 2), (4, 3)], list(itertools.combinations(range(4), 2)), (2, 2), (2, 2), (9, 11)),
    ("N1", [(6, 7), (3, 4), (2, 2)], [[2], [0], [1], [0], [2]], (3, 3), (2, 5), (5, 7)),
    ("down", [(12, 9), (4, 5)], [[1, 0]], (6, 2), (1, 1), (7, 11)),
]


def _triton_run(experts, g1, g2, groups, size, mode, grads):
    B = experts[0].shape[0]
    packed = torch.cat([e.reshape(B, -1) for e in experts], 1).requires_grad_()
    l1, l2 = g1.clone().requires_grad_(), g2.clone().requires_grad_()
    sizes = [s for e in experts for s in e.shape[2:]]
    out = torch.ops.crowdkernels.gating_forward_triton(packed, sizes, l1, l2, groups, *size, mode == "bilinear")
    used = [(o, g) for o, g in zip(out, grads) if g is not None]
    g_packed, g1_, g2_ = torch.autograd.grad([o for o, _ in used], [packed, l1, l2], [g for _, g in used])
    split = torch.split(g_packed, [h * w for h, w in zip(sizes[::2], sizes[1::2])], dim=1)
    g_exp = [g.reshape(e.shape) for g, e in zip(split, experts)]
    return out, (*g_exp, g1_, g2_)


@triton_runs
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case, mode):
    _, ehw, groups, g1hw, g2hw, size = case
    experts, g1, g2, groups_t = make_inputs(ehw, groups, g1hw, g2hw)
    M, N = groups_t.shape
    grads = upstream(2, M, N, size, torch.float64, "cpu")
    want, want_grads = reference_with_grads(experts, g1, g2, groups_t, size, mode, grads)
    with _ext.poisoned_outputs():
        got, got_grads = _triton_run(experts, g1, g2, groups_t, size, mode, grads)
    assert_close_all(got, want, rtol=1e-12, atol=1e-12)
    assert_close_all(got_grads, want_grads, rtol=1e-10, atol=1e-10)


@triton_runs
def test_triton_paper_shape_nearest_float32_only_final_grad():
    # The 75x90-from-10x12 case in float32 (53 blocks, last one partial) with only `final` used.
    experts, g1, g2, groups = make_inputs([(10, 12), (5, 6), (3, 4)], None, (3, 3), (3, 3), B=1,
                                          dtype=torch.float32)
    grads = upstream(1, 3, 2, (75, 90), torch.float32, "cpu")
    grads = (grads[0], None, None)
    got, got_grads = _triton_run(experts, g1, g2, groups, (75, 90), "nearest", grads)
    leaves = [t.detach().clone().requires_grad_() for t in [*experts, g1, g2]]
    want = reference.hierarchical_gating(leaves[:3], leaves[3], leaves[4], groups, (75, 90))
    want_grads = torch.autograd.grad(want[0], leaves, grads[0])
    assert_close_all(got, want, rtol=1e-5, atol=1e-4)
    assert_close_all(got_grads, want_grads, rtol=1e-4, atol=1e-4)


@triton_runs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_accumulates_in_float32(dtype):
    experts, g1, g2, groups = make_inputs([(6, 6), (3, 3), (2, 2)], None, (2, 2), (2, 2), B=1)
    grads = upstream(1, 3, 2, (11, 13), torch.float64, "cpu")
    want, want_grads = reference_with_grads(experts, g1, g2, groups, (11, 13), "bilinear", grads)
    low = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    got, got_grads = _triton_run(low(experts), *low([g1, g2]), groups, (11, 13), "bilinear", low(grads))
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for g, w in zip([*got, *got_grads], [*want, *want_grads]):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


@triton_runs
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_triton(layout):
    # test_aot_dispatch_dynamic is left out: under TRITON_INTERPRET=1 torch's wrap_triton returns the
    # interpreted kernel instead of a traceable wrapper, so AOT tracing cannot record the launch (the ops
    # skip launches on fake tensors there). On a GPU the full opcheck runs (test_opcheck_triton_cuda).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    packed, sizes, g1, g2, groups, H, W, bil = _op_args("bilinear", B=1, size=(5, 6), layout=layout)
    fwd = (packed.requires_grad_(), sizes, g1.requires_grad_(), g2.requires_grad_(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_forward_triton.default, fwd, test_utils=utils)
    grads = upstream(1, 3, 2, (H, W), torch.float64, "cpu")
    base = (packed.detach(), sizes, g1.detach(), g2.detach(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_backward_triton.default, (grads[0], None, grads[2], *base),
                          test_utils=utils)


@pytest.mark.skipif(not torch.cuda.is_available() or gating_mod.triton_gating is None, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_triton_cuda(mode, layout):
    packed, sizes, g1, g2, groups, H, W, bil = _op_args(mode, B=2, size=(37, 41), layout=layout)
    packed, g1, g2, groups = (t.cuda() for t in (packed, g1, g2, groups))
    fwd = (packed.requires_grad_(), sizes, g1.requires_grad_(), g2.requires_grad_(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_forward_triton.default, fwd)
    grads = [g.cuda() for g in upstream(2, 3, 2, (H, W), torch.float64, "cpu")]
    base = (packed.detach(), sizes, g1.detach(), g2.detach(), groups, H, W, bil)
    torch.library.opcheck(torch.ops.crowdkernels.gating_backward_triton.default, (*grads, *base))


# ------------------------------------------------------------------ Triton launches: device, grid, geometry


def _recording_guard(monkeypatch):
    """Replaces the launch helper's device guard and kernel wrapper with recorders that still run the kernels:
    -> a list of (the device of the innermost guard around the launch, or None; grid) per launch."""
    from contextlib import contextmanager

    from crowdkernels.ops.triton import _launch

    active, launches = [], []
    real_wrap = _launch.wrap_triton

    @contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    def wrap(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launches.append((active[-1] if active else None, grid))
                    return real_wrap(kernel)[grid](*args, **kwargs)
                return run
        return Launcher()

    monkeypatch.setattr(_launch, "device_guard", guard)
    monkeypatch.setattr(_launch, "wrap_triton", wrap)
    return launches


@triton_runs
def test_triton_launches_run_inside_the_inputs_device_guard(monkeypatch):
    # Triton launches on the current device: inputs on cuda:1 with device 0 current would run device-1
    # pointers on device 0. Each launch must be inside the guard of the inputs' device, on the flat grid.
    from crowdkernels.ops.triton import gating as tg

    launches = _recording_guard(monkeypatch)
    experts, g1, g2, groups = make_inputs([(4, 5), (2, 3), (3, 2)], None, (2, 3), (3, 3), B=3)
    leaves = [t.requires_grad_() for t in [*experts, g1, g2]]
    packed = torch.cat([e.reshape(-1) for e in leaves[:3]])
    sizes = [s for e in experts for s in e.shape[2:]]
    out = torch.ops.crowdkernels.gating_forward_triton(packed, sizes, leaves[3], leaves[4], groups, 9, 7, True)
    torch.autograd.grad(out[0].sum(), leaves)
    assert len(launches) == 2
    assert launches == [(torch.device("cpu"), tg.grid(3, 9, 7)[0])] * 2


def test_device_guard_makes_the_tensors_device_current():
    from crowdkernels.ops.triton import _launch

    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without touching CUDA
    with _launch.device_guard(torch.device("cpu")):  # the interpreter's CPU tensors: nothing to switch
        pass


@pytest.mark.skipif(gating_mod.triton_gating is None, reason="Triton is not importable")
def test_triton_grid_is_one_axis_within_cuda_limits():
    # The batch used to be grid axis 1, capped at 65,535 by CUDA: 70,000 images could not launch.
    from crowdkernels.ops.triton import _launch
    from crowdkernels.ops.triton import gating as tg

    limits = (2**31 - 1, 65535, 65535)
    for B, H, W in [(70_000, 16, 16), (1, 1, 1), (3, 127, 129), (65_536, 1, 1), (8, 512, 512)]:
        grid, nblk = tg.grid(B, H, W)
        assert nblk == -(-(H * W) // tg._BLOCK)
        assert grid == (B * nblk,) and all(n <= cap for n, cap in zip(grid, limits))
    with pytest.raises(ValueError, match="programs"):
        _launch.flat_grid(2**20, 2**12)


@triton_runs
def test_triton_geometry_is_built_once_per_shape(monkeypatch):
    # The geometry tables used to be built from Python lists at every call: a blocking host-to-device copy
    # on a GPU, and impossible under CUDA-graph capture. A second call with the same shapes builds nothing.
    from crowdkernels.ops.triton import gating as tg

    args = _op_args("bilinear", B=2, size=(6, 5))
    torch.ops.crowdkernels.gating_forward_triton(*args)
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real(*a, **k))
    for _ in range(2):
        torch.ops.crowdkernels.gating_forward_triton(*args)
        torch.ops.crowdkernels.gating_backward_triton(*upstream(2, 3, 2, (6, 5), torch.float64, "cpu"), *args)
    assert built == []
    # Fake tensors (tracing) get their own tables, never cached ones.
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(args[0])
        geo, _, _ = tg._geometry(fake, args[1], mode.from_tensor(args[2]), mode.from_tensor(args[3]), 6, 5, True)
    assert is_fake(geo) and geo is not tg._geometry(args[0], args[1], args[2], args[3], 6, 5, True)[0]


@triton_runs
@pytest.mark.parametrize("change, exc, match", [
    (lambda a: a.__setitem__(4, a[4].int()), TypeError, "groups"),
    (lambda a: a.__setitem__(2, a[2].float()), TypeError, "gate1"),
    (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "experts"),
    (lambda a: a.__setitem__(3, a[3][:, :2]), ValueError, "gate2"),
    (lambda a: a.__setitem__(slice(5, 7), [2**16, 2**16]), ValueError, "plane"),
])
def test_triton_ops_check_their_arguments(change, exc, match):
    # Direct op calls: the kernels would index out of bounds, or compile a configuration never tested.
    args = list(_op_args("nearest", B=2, size=(6, 5)))
    change(args)
    with pytest.raises(exc, match=match):
        torch.ops.crowdkernels.gating_forward_triton(*args)
    grads = upstream(2, 3, 2, (6, 5), torch.float64, "cpu")
    good = list(_op_args("nearest", B=2, size=(6, 5)))
    with pytest.raises(TypeError, match="grad_final"):
        torch.ops.crowdkernels.gating_backward_triton(grads[0].float(), None, None, *good)
    with pytest.raises(ValueError, match="grad_group_maps"):
        torch.ops.crowdkernels.gating_backward_triton(None, grads[1][:, :2], None, *good)
