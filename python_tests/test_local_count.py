"""crowdkernels.local_counts (HMoDE sec. III-C): every backend against the plain-PyTorch reference."""
from __future__ import annotations

import os

import pytest
import torch

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import reference
from crowdkernels.ops.local_count import local_counts, window_size

needs_compiled = pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
TRITON_ON_CPU = _ext.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_interp = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton is not importable, or TRITON_INTERPRET=1 is not set (CPU interpreter)"
)


def maps(B, H, W, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return pred, target


def expected(pred, target, region, edge):
    rh, rw = window_size(region, pred.shape[-2], pred.shape[-1])
    return reference.local_counts(pred[:, 0], target[:, 0], rh, rw, edge == "keep")


# 61x77 is odd on both sides: 1/8 gives 8x10 windows with partial ones at the right and bottom.
CASES = [(1, 0.125), (4, 0.125), (4, 16), (1, (7, 9)), (4, (61, 77)), (1, 1), (4, 0.5)]


@pytest.mark.parametrize("edge", ["keep", "drop"])
@pytest.mark.parametrize("B,region", CASES)
def test_values_match_reference(device, B, region, edge):
    pred, target = maps(B, 61, 77, device=device)
    with _ext.poisoned_outputs():
        got = local_counts(pred, target, region, edge=edge)
    want = expected(pred.cpu(), target.cpu(), region, edge)
    for g, w in zip(got, want):
        assert g.device == pred.device and g.dtype == torch.float64
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)


def test_window_grid_and_meaning():
    # 5x7 image of ones, 2x3 windows: keep -> 3x3 windows (partial ones hold fewer pixels), drop -> 2x2.
    ones = torch.ones(1, 1, 5, 7, dtype=torch.float64)
    zeros = torch.zeros_like(ones)
    pc, tc, se = local_counts(ones, zeros, (2, 3), edge="keep")
    assert pc.tolist() == [[6, 6, 2, 6, 6, 2, 3, 3, 1]]
    assert tc.abs().sum() == 0
    assert se.tolist() == pc.tolist()  # the window sum of pixel-wise squared errors, not (count error)^2
    pc, _, _ = local_counts(ones, zeros, (2, 3), edge="drop")
    assert pc.tolist() == [[6, 6, 6, 6]]
    # sq_error is the sum of pixel squared errors: 2 pixels off by 1 and -1 -> 2, while the counts agree.
    pred = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    pc, tc, se = local_counts(pred, target, (1, 2))
    assert pc.item() == tc.item() == 1 and se.item() == 2


def test_window_size():
    assert window_size(0.125, 61, 77) == (8, 10)
    assert window_size(0.1, 30, 30) == (3, 3)  # 0.1 * 30 is 3.0000000000000004 in binary
    assert window_size(16, 512, 512) == (16, 16)
    assert window_size((3, 5), 10, 10) == (3, 5)
    assert window_size(1.0, 9, 11) == (9, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(device, dtype):
    pred, target = maps(2, 61, 77, device=device)
    got = local_counts(pred.to(dtype), target.to(dtype), 0.25)
    want = expected(pred.to(dtype).double().cpu(), target.to(dtype).double().cpu(), 0.25, "keep")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("edge", ["keep", "drop"])
def test_gradients_match_reference(device, edge):
    pred, target = maps(4, 61, 77, device=device, seed=3)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    weights = torch.randn(3, 4, 64 if edge == "keep" else 49, dtype=torch.float64, device=device)
    with _ext.poisoned_outputs():
        out = local_counts(pred, target, 0.125, edge=edge)
        got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), (pred, target))
    p, t = pred.detach().cpu().requires_grad_(), target.detach().cpu().requires_grad_()
    ref = expected(p, t, 0.125, edge)
    want = torch.autograd.grad(sum((o * w.cpu()).sum() for o, w in zip(ref, weights)), (p, t))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)
    if edge == "drop":  # 61 = 7*8 + 5 rows and 77 = 7*10 + 7 columns lie in no window
        assert got[0][..., 56:, :].abs().sum() == 0 and got[0][..., 70:].abs().sum() == 0


@pytest.mark.parametrize("edge", ["keep", "drop"])
def test_gradcheck(device, edge):
    pred, target = maps(2, 7, 9, device=device, seed=5)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: local_counts(p, t, (3, 4), edge=edge), (pred, target))


def test_gradient_only_to_pred_when_target_is_data(device):
    pred, target = maps(1, 9, 9, device=device)
    pred.requires_grad_(True)
    pc, tc, se = local_counts(pred, target, 3)
    (pc.sum() + se.sum()).backward()
    assert pred.grad is not None and target.grad is None
    torch.testing.assert_close(pred.grad, 1 + 2 * (pred - target).detach())


@needs_compiled
@pytest.mark.parametrize("keep", [True, False])
def test_opcheck_cpp_ops(keep):
    pred, target = maps(2, 13, 17, seed=7)
    p, t = pred[:, 0].requires_grad_(), target[:, 0]
    torch.library.opcheck(torch.ops.crowdkernels.local_counts.default, (p, t, 4, 5, keep))
    R = (4 * 4 if keep else 3 * 3)
    grads = [torch.randn(2, R, dtype=torch.float64) for _ in range(3)]
    bwd = torch.ops.crowdkernels.local_counts_backward.default
    torch.library.opcheck(bwd, (*grads, p.detach(), t, 4, 5, keep, [True, True]))
    torch.library.opcheck(bwd, (grads[0], None, None, p.detach(), t, 4, 5, keep, [True, False]))


@needs_compiled
@pytest.mark.parametrize("keep", [True, False])
def test_backward_op_absent_gradients_and_output_mask(keep):
    pred, target = maps(2, 13, 17, seed=31)
    p, t = pred[:, 0], target[:, 0]
    R = 16 if keep else 9
    g = torch.randn(3, 2, R, dtype=torch.float64)
    bwd = torch.ops.crowdkernels.local_counts_backward
    with _ext.poisoned_outputs():
        full = bwd(g[0], g[1], g[2], p, t, 4, 5, keep, [True, True])
        for present in [(0,), (1,), (2,), (0, 1), (0, 2), ()]:
            args = [g[i] if i in present else None for i in range(3)]
            zeros = [g[i] if i in present else torch.zeros_like(g[i]) for i in range(3)]
            want = bwd(*zeros, p, t, 4, 5, keep, [True, True])
            got = bwd(*args, p, t, 4, 5, keep, [True, True])
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        only_pred = bwd(g[0], g[1], g[2], p, t, 4, 5, keep, [True, False])
        only_target = bwd(g[0], g[1], g[2], p, t, 4, 5, keep, [False, True])
    assert torch.equal(only_pred[0], full[0]) and only_pred[1].shape == (0, 13, 17)
    assert torch.equal(only_target[1], full[1]) and only_target[0].shape == (0, 13, 17)


@needs_compiled
def test_deterministic_across_thread_counts():
    pred, target = maps(3, 127, 131, dtype=torch.float32, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = local_counts(pred, target, 0.125)
        torch.set_num_threads(max(2, before))
        many = local_counts(pred, target, 0.125)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_torch_compile(device):
    pred, target = maps(2, 61, 77, device=device, seed=2)
    pred.requires_grad_(True)

    def f(p, t):
        pc, tc, se = local_counts(p, t, 0.125)
        return ((pc - tc) ** 2).sum() + se.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(pred, target)
    (g,) = torch.autograd.grad(got, pred)
    want = f(pred, target)
    (w,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, w)


def test_public_export():
    assert ck.local_counts is local_counts


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(target=torch.zeros(2, 1, 10, 11)), ValueError, "target"),
        (dict(pred=torch.zeros(2, 2, 10, 10), target=torch.zeros(2, 2, 10, 10)), ValueError, "pred"),
        (dict(target=torch.zeros(2, 1, 10, 10, dtype=torch.float64)), TypeError, "target"),
        (dict(region=20), ValueError, "region"),
        (dict(region=(4, 11)), ValueError, "region"),
        (dict(region=1.5), ValueError, "region"),
        (dict(region=0.0), ValueError, "region"),
        (dict(region=-0.1), ValueError, "region"),
        (dict(region=0), ValueError, "region"),
        (dict(region=(0, 3)), ValueError, "region"),
        (dict(region=True), TypeError, "region"),
        (dict(region="big"), TypeError, "region"),
        (dict(edge="pad"), ValueError, "edge"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(pred=torch.zeros(2, 1, 10, 10), target=torch.zeros(2, 1, 10, 10), region=0.5, edge="keep")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        local_counts(**args)


# --------------------------------------------------------------------------- Triton (interpreter on CPU)
@needs_triton_interp
@pytest.mark.parametrize("B,H,W,rh,rw,keep", [(1, 61, 77, 8, 10, True), (2, 61, 77, 8, 10, False),
                                               (2, 19, 70, 19, 70, True), (1, 21, 33, 5, 33, False)])
def test_triton_matches_reference(B, H, W, rh, rw, keep):
    from crowdkernels.ops.triton.local_count import local_counts_triton

    pred, target = maps(B, H, W, seed=13)
    p, t = pred[:, 0].requires_grad_(), target[:, 0].requires_grad_()
    with _ext.poisoned_outputs():
        got = local_counts_triton(p, t, rh, rw, keep)
        weights = [torch.randn_like(o) for o in got]
        g_got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, weights)), (p, t))
    want = reference.local_counts(p, t, rh, rw, keep)
    g_want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), (p, t))
    for g, w in zip(got + g_got, want + g_want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_triton_interp
def test_triton_backward_absent_gradients_and_output_mask():
    from crowdkernels.ops.triton.local_count import local_counts_triton_backward

    pred, target = maps(2, 13, 17, seed=37)
    p, t = pred[:, 0], target[:, 0]
    g = torch.randn(3, 2, 9, dtype=torch.float64)
    with _ext.poisoned_outputs():
        for present, mask in [((0, 1, 2), [True, True]), ((0,), [True, False]), ((1, 2), [False, True]),
                              ((), [True, True])]:
            args = [g[i] if i in present else None for i in range(3)]
            zeros = [g[i] if i in present else torch.zeros_like(g[i]) for i in range(3)]
            got = local_counts_triton_backward(*args, p, t, 4, 5, False, mask)
            p_, t_ = p.clone().requires_grad_(), t.clone().requires_grad_()
            out = reference.local_counts(p_, t_, 4, 5, False)
            want = torch.autograd.grad(sum((o * z).sum() for o, z in zip(out, zeros)), (p_, t_))
            for m, a, b in zip(mask, got, want):
                if m:
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                else:
                    assert a.shape == (0, 13, 17)


@needs_triton_interp
def test_triton_float32_and_half():
    from crowdkernels.ops.triton.local_count import local_counts_triton

    pred, target = maps(1, 13, 17, seed=17)
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-3)]:
        p, t = pred[:, 0].to(dtype), target[:, 0].to(dtype)
        got = local_counts_triton(p, t, 4, 4, True)
        want = reference.local_counts(p.double(), t.double(), 4, 4, True)
        for g, w in zip(got, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


@needs_triton_interp
def test_triton_gradcheck():
    from crowdkernels.ops.triton.local_count import local_counts_triton

    pred, target = maps(1, 5, 7, seed=19)
    p, t = pred[:, 0].requires_grad_(), target[:, 0].requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: local_counts_triton(a, b, 3, 4, True), (p, t))


@needs_triton_interp
def test_triton_opcheck():
    # The interpreter reads real data pointers, so FakeTensor tracing (test_faketensor, aot_dispatch) can
    # only run on a GPU: the `device` fixture's cuda case covers it through torch.compile there.
    from crowdkernels.ops.triton.local_count import local_counts_triton, local_counts_triton_backward

    pred, target = maps(1, 7, 9, seed=23)
    p, t = pred[:, 0].requires_grad_(), target[:, 0]
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(local_counts_triton, (p, t, 3, 4, False), test_utils=checks)
    grads = [torch.randn(1, 4, dtype=torch.float64) for _ in range(3)]
    torch.library.opcheck(local_counts_triton_backward, (*grads, p.detach(), t, 3, 4, False, [True, True]),
                          test_utils=checks)
    torch.library.opcheck(local_counts_triton_backward, (grads[0], None, None, p.detach(), t, 3, 4, False,
                                                         [True, False]), test_utils=checks)


@pytest.mark.skipif(not torch.cuda.is_available() or not _ext.triton_available(), reason="needs a CUDA GPU")
def test_triton_opcheck_on_gpu():
    from crowdkernels.ops.triton.local_count import local_counts_triton, local_counts_triton_backward

    pred, target = maps(2, 61, 77, device="cuda", seed=29)
    p, t = pred[:, 0].requires_grad_(), target[:, 0]
    torch.library.opcheck(local_counts_triton, (p, t, 8, 10, True))
    grads = [torch.randn(2, 64, dtype=torch.float64, device="cuda") for _ in range(3)]
    torch.library.opcheck(local_counts_triton_backward, (*grads, p.detach(), t, 8, 10, True, [True, True]))
    torch.library.opcheck(local_counts_triton_backward, (grads[0], None, None, p.detach(), t, 8, 10, True,
                                                         [True, False]))


# ------------------------------------------------------------------ Triton launches: device, grid, configurations
@needs_triton_interp
def test_triton_launches_run_inside_the_inputs_device_guard(monkeypatch):
    # Triton launches on the current CUDA device: each launch must be inside the guard of the inputs' device
    # (see test_gating.py for the guard itself), on a one-axis grid.
    from test_gating import _recording_guard

    from crowdkernels.ops.triton.local_count import BACKWARD_BLOCK, local_counts_triton

    launches = _recording_guard(monkeypatch)
    pred, target = maps(3, 13, 17, seed=41)
    p = pred[:, 0].requires_grad_()
    out = local_counts_triton(p, target[:, 0], 4, 5, True)
    torch.autograd.grad(out[0].sum() + out[2].sum(), p)
    cpu = torch.device("cpu")
    assert launches == [(cpu, (3 * 16,)), (cpu, (3 * -(-13 * 17 // BACKWARD_BLOCK),))]


def test_triton_forward_block_is_a_declared_configuration():
    # Every window gets one of the compiled BLOCKs (test_gpu_compile.py compiles exactly those).
    pytest.importorskip("triton")
    from crowdkernels.ops.triton.local_count import FORWARD_BLOCKS, forward_block

    seen = {forward_block(h, w) for h in range(1, 70) for w in range(1, 70)}
    seen |= {forward_block(h, w) for h in (1, 255, 4096, 2**16) for w in (1, 7, 4096, 2**16)}
    assert seen == set(FORWARD_BLOCKS)
    assert forward_block(8, 10) == 128 and forward_block(16, 16) == 256 and forward_block(64, 64) == 1024


@needs_triton_interp
def test_triton_ops_check_their_arguments():
    from crowdkernels.ops.triton.local_count import local_counts_triton, local_counts_triton_backward

    pred, target = maps(2, 13, 17, seed=43)
    p, t = pred[:, 0], target[:, 0]
    with pytest.raises(TypeError, match="target"):
        local_counts_triton(p, t.float(), 4, 5, True)
    with pytest.raises(ValueError, match="target"):
        local_counts_triton(p, t[:, :-1], 4, 5, True)
    with pytest.raises(ValueError, match="window"):
        local_counts_triton(p, t, 14, 5, True)
    with pytest.raises(TypeError, match="pred"):
        local_counts_triton(p.to(torch.int32), t.to(torch.int32), 4, 5, True)
    g = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_sq_error"):
        local_counts_triton_backward(g, None, g[:, :9], p, t, 4, 5, True, [True, True])
    with pytest.raises(TypeError, match="grad_pred_counts"):
        local_counts_triton_backward(g.float(), None, None, p, t, 4, 5, True, [True, True])
