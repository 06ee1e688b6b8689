"""The CUDA kernels executed on the CPU under AddressSanitizer: out-of-bounds reads and writes of a kernel
abort the process with a report, as compute-sanitizer would report them on a GPU. Each test runs in a
subprocess with libasan preloaded, so that torch's CPU allocations (the tensors the kernels index) get
redzones, and the emulation built with -fsanitize=address (python_tests/cuda_emulation.py)."""
from __future__ import annotations

import pytest

from cuda_emulation import run_under_asan

pytestmark = [pytest.mark.cuda_emulated, pytest.mark.slow]


def _report(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize(
    "kernel, access, function",
    [("fill_past_end", "WRITE of size 4", "fill_kernel"), ("shift_past_end", "READ of size 4", "shift_kernel")],
)
def test_planted_out_of_bounds_access_is_caught(kernel, access, function):
    """A kernel that writes (reads) one float past the end of its tensor: the grid-stride loop's bound is off
    by one. ASan stops at the first bad access and names the kernel."""
    code = (
        "x = torch.arange(100, dtype=torch.float32)\n"
        f"assert torch.equal(ops._selftest({kernel.split('_')[0]!r}, x, 2, 32), x)  # the correct kernel: clean\n"
        "print('correct kernel ran', flush=True)\n"
        f"ops._selftest({kernel!r}, x, 2, 32)\n"
        "print('NOT CAUGHT', flush=True)\n"
    )
    proc = run_under_asan(code)
    assert "correct kernel ran" in proc.stdout, _report(proc)
    assert proc.returncode != 0 and "NOT CAUGHT" not in proc.stdout, _report(proc)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr, _report(proc)
    assert access in proc.stderr and function in proc.stderr, _report(proc)


# Every entry point of every .cu on varied inputs (ragged batches with empty images, points outside the
# image, every style and stride, both dtypes, deterministic mode, overlapping and edge boxes, empty inputs)
# at three geometries, with poisoned outputs; then the bad arguments the shared checks reject.
_REAL_KERNELS = r'''
import math
import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import density as D
from test_cuda_emulated import _ragged, _offsets
from test_regions import SCALE_CASES, _scale_case, _unscale_case

CPU = torch.ops.crowdkernels
calls = 0
with _ext.poisoned_outputs():
    for geometry in ((0, 0), (1, 32), (3, 64)):
        with emulation(seed=sum(geometry), max_grid=geometry[0], max_block=geometry[1]):
            for dtype in (torch.float32, torch.float64):
                pts, off, _ = _ragged(3, (31, 45), dtype)
                for style in ("exact", "csrnet", "matlab"):
                    p, o = pts.double(), off
                    if style != "matlab":
                        p, o, _ = D._prepare_vectorized(p, o, 31, 45, style)
                    sig = ops.knn_sigma(p, o, 3, 0.3, 9.0)
                    assert torch.equal(sig, CPU.knn_sigma(p, o, 3, 0.3, 9.0))
                    for stride in (1, 4):
                        for det in (False, True):
                            out = ops.density_splat(p.to(dtype), o, sig, 31, 45, D._STYLE_CODE[style], 4.0, 15, stride, det)
                            want = CPU.density_splat(p.to(dtype), o, sig, 31, 45, D._STYLE_CODE[style], 4.0, 15, stride, det)
                            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
                            calls += 1
                ops.density_splat(torch.zeros(0, 2, dtype=dtype), _offsets([0, 0]), torch.zeros(0, dtype=torch.float64), 7, 9, 0, 4.0, 15, 2, True)
                for case in SCALE_CASES:
                    f, b, s, canvas = _scale_case(case, "cpu", dtype)
                    out = ops.scale_regions(f, b, s, *canvas)
                    g = torch.randn_like(out)
                    gf, gs = ops.scale_regions_backward(g, f, b, s)
                    torch.testing.assert_close(gf, CPU.scale_regions_backward(g, f, b, s)[0], rtol=1e-4, atol=1e-4)
                    calls += 2
                for canvas in ((14, 16), (9, 8)):
                    p, b, s, base = _unscale_case("cpu", dtype, canvas=canvas)
                    out = ops.unscale_regions(p, b, s, base)
                    gp, gs, gb = ops.unscale_regions_backward(torch.randn_like(base), p, b, s)
                    calls += 2
bad = 0
pts = torch.rand(10, 2, dtype=torch.float64) * 20
for offsets in ([1, 4, 10], [0, 4, 12], [0, 7, 4, 10], [0, -3, 10]):
    for call in (lambda: ops.knn_sigma(pts, torch.tensor(offsets), 3, 0.3, 1.0),
                 lambda: ops.density_splat(pts, torch.tensor(offsets), torch.ones(10, dtype=torch.float64), 20, 20, 0, 4.0, 15, 1, False)):
        try:
            call()
        except RuntimeError:
            bad += 1
f = torch.randn(2, 3, 10, 10, dtype=torch.float64)
for rows, r in (([[0, 6, 5, 5, 5]], 1.5), ([[2, 0, 0, 4, 4]], 1.5), ([[0, 0, 0, 4, 2**62]], 1.5), ([[0, 0, 0, 4, 4]], float("nan"))):
    b, s = torch.tensor(rows), torch.tensor([r], dtype=torch.float64)
    pred = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for call in (lambda: ops.scale_regions(f, b, s, 8, 8), lambda: ops.scale_regions_backward(pred, f, b, s),
                 lambda: ops.unscale_regions(pred, b, s, f), lambda: ops.unscale_regions_backward(f, pred, b, s)):
        try:
            call()
        except RuntimeError:
            bad += 1
print(f"CLEAN {calls} calls, {bad} rejected", flush=True)
'''


def test_every_kernel_clean_under_asan():
    proc = run_under_asan(_REAL_KERNELS)
    assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr, _report(proc)
    assert "CLEAN" in proc.stdout and "rejected" in proc.stdout, _report(proc)
    assert proc.stdout.strip().endswith("24 rejected"), _report(proc)
