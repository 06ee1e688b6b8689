"""Property-based tests (hypothesis) of every public op on extreme but valid inputs (issue 14).

Coordinates from 1e-300 to 1e15 (and past the image), bounding boxes of any aspect ratio, one to thousands
of heads, coincident heads, sigmas from 1e-300 to 1e300, scale factors from 1e-30 to 1e30, extreme logits,
windows larger than the image. Every case must return the right answer, checked against an independent
computation (the reference in ops/reference.py, a brute force with math.hypot, sums in float64 or exactly
rounded, or an invariant such as the count), or raise a ValueError/TypeError naming the argument: never a
crash, a hang, an allocation of gigabytes, or a silently wrong value. Each call runs under `guards.bounded`:
an allocation past 512 MiB fails, a call past 60 s aborts with a traceback.

Backends: every property takes a `Backend`, which says which kernels the public ops run (see its
docstring); adding one (the emulated CUDA kernels, say) is one entry in BACKENDS.

Examples per property: CK_PROPERTY_EXAMPLES (default 50); derandomized (the same examples every run) unless
CK_PROPERTY_RANDOM=1, which explores new ones (print_blob then shows how to reproduce a failure).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Callable, Mapping

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels import losses as L
from crowdkernels.ops import reference as R
from crowdkernels.ops.local_count import window_size
from guards import bounded

pytestmark = pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")

EXAMPLES = int(os.environ.get("CK_PROPERTY_EXAMPLES", "50"))
RANDOM = os.environ.get("CK_PROPERTY_RANDOM") == "1"


def profile(scale: float = 1.0):
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None, derandomize=not RANDOM,
                    database=None, print_blob=RANDOM, suppress_health_check=list(HealthCheck))


MEM = 512 << 20  # per call: what an op may allocate beyond the process's size
STYLES = ("exact", "csrnet", "matlab")


# ------------------------------------------------------------------------------------------- backends
@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernels the public ops run while a property holds.

    ops: raw op name -> callable with the same schema, swapped in for ``torch.ops.crowdkernels.<name>``
        (so the public functions, their checks and their autograd formulas run unchanged around it);
        empty: the C++ CPU kernels.
    fused: whether density_maps may take the fused CPU pipeline (density_adaptive); False runs
        density_prepare -> knn_sigma -> density_splat, as every other device does.
    """

    name: str
    ops: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    fused: bool = True
    # whether sums happen in a fixed order (the CPU kernels); the CUDA kernels accumulate with atomics in
    # whatever order threads arrive, so equal calls agree to rounding, bit for bit only with deterministic=True
    ordered: bool = True

    @contextlib.contextmanager
    def active(self):
        ns = torch.ops.crowdkernels
        saved = {name: getattr(ns, name) for name in self.ops}
        backend = _ext.backend
        try:
            for name, fn in self.ops.items():
                setattr(ns, name, fn)
            if not self.fused:
                _ext.backend = lambda device, op: "reference" if op == "density_adaptive" else backend(device, op)
            yield
        finally:
            for name, fn in saved.items():
                setattr(ns, name, fn)
            _ext.backend = backend


@dataclasses.dataclass(frozen=True)
class EmulatedCUDA(Backend):
    """The CUDA kernels (csrc/*/*_cuda.cu) run on the CPU through the emulation (cuda_emulation.py), in place of
    every op that has one, with threads shuffled and grids of at most 64 blocks (so the grid-stride loops
    wrap on the larger inputs). Built on first use; skipped with the reason where it cannot be built."""

    @contextlib.contextmanager
    def active(self):
        from cuda_emulation import cuda_op_names, emulated_ops, emulation

        ns = emulated_ops()
        cuda = Backend(self.name, ops={name: getattr(ns, name) for name in cuda_op_names()}, fused=False, ordered=False)
        with emulation(seed=7, max_grid=64), cuda.active():
            yield


BACKENDS = [
    pytest.param(Backend("cpu"), id="cpu"),
    pytest.param(Backend("cpu-unfused", fused=False), id="cpu-unfused"),
    pytest.param(EmulatedCUDA("cuda-emulated", ordered=False), id="cuda-emulated", marks=pytest.mark.cuda_emulated),
]


@contextlib.contextmanager
def running(backend: Backend):
    """The backend's kernels, a memory budget and a deadline."""
    with backend.active(), bounded(MEM, seconds=60):
        yield


def names(exc: BaseException, *args: str) -> bool:
    return any(a in str(exc) for a in args)


# ------------------------------------------------------------------------------------------- strategies
def log_uniform(lo: float, hi: float):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0 ** e)


seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


def magnitude(dtype, rng, lo_exp: float, hi32: float, hi64: float) -> float:
    """10^e with e uniform in [lo_exp, hi]: values spanning the dtype's range."""
    hi = hi32 if dtype == torch.float32 else hi64
    return 10.0 ** rng.uniform(lo_exp, hi)


def scattered_points(rng, n: int, offset_x: float, offset_y: float, sx: float, sy: float, integral: bool):
    u = rng.integers(0, 30, size=(n, 2)).astype(np.float64) if integral else rng.random((n, 2))
    return np.stack([offset_x + sx * u[:, 0], offset_y + sy * u[:, 1]], axis=1)


OFFSETS = [0.0, 1e-300, 1.0, 777.25, 1e15, -1e15, -3.5]
SCALES = log_uniform(1e-300, 1e15)


# ------------------------------------------------------------------------------------------- knn_sigma
def knn_oracle(pts: np.ndarray, k: int, beta: float) -> np.ndarray:
    """beta * mean of the k smallest hypot distances to other points (rows in chunks: O(chunk * N))."""
    n = len(pts)
    kk = min(k, n - 1)
    out = np.full(n, np.nan)
    if kk < 1:
        return out
    for a in range(0, n, 256):
        d = np.hypot(pts[a:a + 256, None, 0] - pts[None, :, 0], pts[a:a + 256, None, 1] - pts[None, :, 1])
        d[np.arange(d.shape[0]), np.arange(a, a + d.shape[0])] = np.inf
        near = np.sort(np.partition(d, kk - 1, axis=1)[:, :kk], axis=1)
        with np.errstate(over="ignore"):
            out[a:a + 256] = beta * (near.sum(axis=1) / kk)
    return out


@st.composite
def knn_cases(draw, max_n=80):
    rng = np.random.default_rng(draw(seeds))
    n = draw(st.integers(1, max_n))
    sx, sy = draw(SCALES), draw(SCALES)
    ox, oy = draw(st.sampled_from(OFFSETS)), draw(st.sampled_from(OFFSETS))
    pts = scattered_points(rng, n, ox, oy, sx, sy, draw(st.booleans()))
    if n > 4 and draw(st.booleans()):  # a second cluster at another scale and offset
        m = n // 3
        pts[:m] = scattered_points(rng, m, draw(st.sampled_from(OFFSETS)), draw(st.sampled_from(OFFSETS)),
                                   draw(SCALES), draw(SCALES), draw(st.booleans()))
    if n > 2 and draw(st.booleans()):
        pts[rng.integers(0, n, size=n // 3)] = pts[0]  # coincident heads
    return pts, draw(st.integers(1, 64)), draw(log_uniform(1e-300, 1e300)), draw(dtypes)


def check_knn_sigma(backend: Backend, pts: np.ndarray, k: int, beta: float, dtype) -> None:
    points = torch.from_numpy(pts).to(dtype)
    exact = points.double().numpy()  # what the op sees: float32 points are rounded first
    want = knn_oracle(exact, k, beta)
    out_max = torch.finfo(dtype).max
    try:
        with running(backend):
            got = ck.knn_sigma(points, k=k, beta=beta)
    except ValueError as exc:
        assert names(exc, "beta"), exc
        assert len(pts) > 1 and np.nanmax(want) > out_max * 0.999, (exc, np.nanmax(want))
        return
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (len(pts),)
    if len(pts) == 1:
        assert torch.isnan(got).all()
        return
    assert np.nanmax(want) <= out_max * 1.001, "beta x distance overflows the dtype: must raise, got a value"
    if dtype == torch.float64:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-318)
    else:
        np.testing.assert_allclose(got.double().numpy(), want.astype(np.float32), rtol=2e-7, atol=2e-45)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(1.5)
@given(case=knn_cases())
@example(case=(np.array([[0, 0], [1000, 1e-35], [500, 0]]), 3, 0.3, torch.float64))  # the review's segfault
@example(case=(np.array([[1e15, 0], [1e15, 1e-300], [1e15, 2e-300], [0, 0]]), 2, 1.0, torch.float64))
@example(case=(np.array([[0, 0], [1e200, 0], [0, 3e200]]), 1, 0.3, torch.float64))
def test_knn_sigma_any_scale_and_aspect_ratio(backend, case):
    check_knn_sigma(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(0.12)
@given(case=knn_cases(max_n=3000))
def test_knn_sigma_thousands_of_heads(backend, case):
    pts, k, beta, dtype = case
    check_knn_sigma(backend, pts, k, min(beta, 1e3), dtype)


# ------------------------------------------------------------------------------------------- density maps
@st.composite
def density_cases(draw, max_n=24, max_side=40):
    rng = np.random.default_rng(draw(seeds))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    style = draw(st.sampled_from(STYLES))
    dtype = draw(dtypes)
    B = draw(st.integers(1, 3))
    plist = []
    for _ in range(B):
        n = draw(st.integers(0, max_n))
        kind = rng.integers(0, 6, size=n)
        p = rng.random((n, 2)) * [W, H]  # 0: anywhere inside
        p[kind == 1] = np.floor(p[kind == 1])  # on pixel corners: coincident heads
        p[kind == 2] = rng.choice([0.0, 1e-300, 5e-324], size=(int((kind == 2).sum()), 2))  # the corner, tiny
        edge = kind == 3  # on and just past the right/bottom borders
        p[edge] = np.stack([rng.choice([W, np.nextafter(W, 0), W - 0.5], size=int(edge.sum())),
                            rng.choice([H, np.nextafter(H, 0), 0.0], size=int(edge.sum()))], axis=1)
        far = kind == 4  # far outside (float32 points cannot hold 1e300: +-3e38 there)
        huge = 1e300 if dtype == torch.float64 else 3e38
        p[far] = rng.choice([1e15, -1e15, huge, -huge, -0.25, 1e5], size=(int(far.sum()), 2))
        if n and draw(st.booleans()):
            p[rng.integers(0, n, size=max(1, n // 2))] = p[0]  # exact duplicates
        plist.append(torch.from_numpy(p).to(dtype))
    counts = [len(p) for p in plist]
    sigma_kind = draw(st.sampled_from(["adaptive", "fixed", "per_point"]))
    sig_values = log_uniform(1e-300, 1e300)
    if sigma_kind == "adaptive":
        sigma = "adaptive"
    elif sigma_kind == "fixed":
        sigma = draw(st.one_of(sig_values, log_uniform(0.05, 60.0)))
    else:
        lo, hi = draw(st.sampled_from([(1e-300, 1e300), (0.05, 60.0), (1e-3, 1e7)]))
        sigma = [torch.from_numpy(10.0 ** rng.uniform(math.log10(lo), math.log10(hi), size=n)) for n in counts]
    opts = dict(
        k=draw(st.integers(1, 64)),
        beta=draw(st.one_of(st.just(0.3), log_uniform(1e-300, 1e300))),
        truncate=draw(st.sampled_from([4.0, 1.0, 0.3, 1e-6, 50.0, 1e300])),
        kernel_size=draw(st.sampled_from([1, 3, 7, 15, 31, 2**61 + 1])),
        stride=draw(st.sampled_from([1, 1, 2, 3, 7, 64, 2**62])),
        deterministic=draw(st.booleans()),
    )
    return plist, (H, W), style, sigma, opts


def check_density(backend: Backend, plist, size, style, sigma, opts) -> None:
    H, W = size
    with running(backend):
        got = ck.density_maps(plist, size, sigma=sigma, style=style, **opts)
        single = ck.density_map(plist[0], size, sigma=sigma[0] if isinstance(sigma, list) else sigma, style=style,
                                **opts)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in plist) else torch.float32
    s = opts["stride"]
    assert got.dtype == dtype and got.shape == (len(plist), 1, -(-H // s), -(-W // s))
    if backend.ordered or opts["deterministic"]:
        assert torch.equal(single, got[0, 0]), "density_map is density_maps of one image"
    assert torch.isfinite(got).all() and torch.isfinite(single).all()
    ref_opts = {key: v for key, v in opts.items() if key != "deterministic"}
    for b, p in enumerate(plist):
        sig = sigma[b] if isinstance(sigma, list) else sigma
        want = R.density_map_reference(p, size, sigma=sig, style=style, **ref_opts)
        n = len(p)
        m = got[b, 0].double()
        # Every weight is positive, so each pixel is compared relatively: float64 weights come from a
        # recurrence (~d^2 / 2 ulp at distance d <= H + W) and are summed in float64; float32 maps round
        # each weight and accumulate in float32 (the classic script's precision); an output pixel sums up
        # to min(s^2, H W) full-resolution ones. The absolute part covers subnormal values and matlab
        # weights at fspecial's eps threshold (<= 2.2e-16 of the kernel's sum).
        # (float32: up to n x blocks float32 additions into one output pixel, each off by 2^-24 of the sum)
        blocks = min(s * s, H * W)
        if dtype == torch.float64:
            rtol, tol = 1e-10 + 2.0**-52 * blocks, 1e-15 * (1 + n)
        else:
            rtol, tol = 2.0**-24 * (4 + n * blocks), 1e-12 * (1 + n)
        if not backend.ordered and opts["deterministic"]:
            # the CUDA kernels' deterministic mode adds in 2^-40 fixed point: each contribution rounds by 2^-41
            tol += 2.0**-41 * (1 + n * blocks)
        torch.testing.assert_close(m, want, rtol=rtol, atol=tol)
        if b == 0 and not (backend.ordered or opts["deterministic"]):
            # the same sums in another order: both within the bound of the reference, and of each other
            torch.testing.assert_close(single.double(), m, rtol=2 * rtol, atol=2 * tol)
        assert m.min().item() >= 0
        pd = p.double()
        inside = ((pd[:, 0] >= 0) & (pd[:, 0] < W) & (pd[:, 1] >= 0) & (pd[:, 1] < H)) if n else torch.zeros(0, dtype=torch.bool)
        total = m.sum().item()
        # float32 maps: each pixel is off by at most rtol of itself (above), so the count by rtol of it
        count_tol = 1e-10 * (1 + n) if dtype == torch.float64 else rtol * (1 + n) + tol * H * W
        if not backend.ordered and opts["deterministic"]:
            count_tol += 2.0**-41 * n * H * W  # a fixed-point rounding per contribution (above)
        if style == "exact":  # every in-image point counts 1
            assert total == pytest.approx(int(inside.sum()), abs=count_tol)
        elif style == "matlab":  # every point counts 1, clipped to the border
            assert total == pytest.approx(n, abs=count_tol)
        else:  # scipy's normalization loses what lies past the border: at most one per head's pixel
            pixels = {(math.floor(x), math.floor(y)) for x, y in pd[inside].tolist()}
            assert total <= len(pixels) + count_tol


_TWO_HEADS = [torch.tensor([[10.5, 20.5], [30.0, 40.0]], dtype=torch.float64)]
_OPTS = dict(k=3, beta=0.3, truncate=4.0, kernel_size=15, stride=1, deterministic=False)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(2)
@given(case=density_cases())
@example(case=(_TWO_HEADS, (64, 64), "csrnet", 1e19, _OPTS))  # the review's map summing to 8192
@example(case=(_TWO_HEADS, (64, 64), "csrnet", 1e9, _OPTS))  # billions of serial steps
@example(case=([torch.tensor([[0.2, 0.7], [39.5, 0.0]])], (40, 40), "matlab", 1e-3, _OPTS))  # even border windows
def test_density_maps_extreme_inputs(backend, case):
    check_density(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(0.12)
@given(case=density_cases(max_n=2000, max_side=160))
def test_density_maps_thousands_of_heads(backend, case):
    check_density(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(0.6)
@given(seed=seeds, H=st.integers(1, 30), W=st.integers(1, 30), style=st.sampled_from(STYLES),
       bad=st.sampled_from(["nan", "inf", "shape", "sigma_zero", "sigma_nan", "k", "size", "stride", "kernel"]))
def test_density_map_invalid_inputs_name_the_argument(backend, seed, H, W, style, bad):
    """The other side of the contract: an invalid argument raises ValueError/TypeError naming it, on
    every path (fused C++ check included), never a crash or a wrong map."""
    rng = np.random.default_rng(seed)
    pts = torch.from_numpy(rng.random((5, 2)) * [W, H])
    kwargs, name = dict(style=style), "points"
    if bad in ("nan", "inf"):
        pts[rng.integers(0, 5)] = float(bad)
    elif bad == "shape":
        pts = pts.reshape(2, 5)
    elif bad == "sigma_zero":
        kwargs["sigma"], name = 0.0, "sigma"
    elif bad == "sigma_nan":
        kwargs["sigma"], name = torch.tensor([1.0, 2.0, float("nan"), 1.0, 1.0]), "sigma"
    elif bad == "k":
        kwargs["k"], name = 65, "k"
    elif bad == "size":
        H, name = 2**31, "size"
    elif bad == "stride":
        kwargs["stride"], name = 0, "stride"
    else:
        kwargs["kernel_size"], name = 2**63, "kernel_size"
    with running(backend), pytest.raises((ValueError, TypeError)) as info:
        ck.density_map(pts, (H, W), **kwargs)
    assert str(info.value).startswith(name), info.value


# ------------------------------------------------------------------------------------------- regions
@st.composite
def grid_cases(draw):
    h = draw(st.one_of(st.integers(1, 100), st.integers(1, 2**62)))
    w = draw(st.one_of(st.integers(1, 100), st.integers(1, 2**62)))
    return h, w, draw(st.integers(1, 70))


@given(case=grid_cases())
@profile()
def test_grid_boxes_tile_any_image(case):
    h, w, k = case
    with bounded(MEM, seconds=60):
        if k > min(h, w):
            with pytest.raises(ValueError, match="k"):
                ck.grid_boxes(h, w, k)
            return
        boxes = ck.grid_boxes(h, w, k)
    assert torch.equal(boxes, R.grid_boxes_reference(h, w, k))
    rows = boxes.tolist()
    assert sum(bh * bw for _, _, bh, bw in rows) == h * w and all(bh >= 1 and bw >= 1 for _, _, bh, bw in rows)
    assert all(y0 + bh <= h and x0 + bw <= w for y0, x0, bh, bw in rows)


@st.composite
def region_cases(draw, overlapping: bool):
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(dtypes)
    B, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    if overlapping:
        n = draw(st.integers(0, 5))
        rows = []
        for _ in range(n):
            y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
            rows.append([int(rng.integers(0, B)), y0, x0, int(rng.integers(1, H - y0 + 1)), int(rng.integers(1, W - x0 + 1))])
    else:  # cells of a grid, each of one image: never overlapping
        k = draw(st.integers(1, min(H, W)))
        cells = ck.grid_boxes(H, W, k).tolist()
        pick = rng.permutation(len(cells))[: draw(st.integers(0, len(cells)))]
        rows = [[int(rng.integers(0, B))] + cells[i] for i in pick]
    boxes = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)
    scale = torch.tensor([draw(st.one_of(log_uniform(1e-30, 1e30), log_uniform(0.1, 10.0))) for _ in rows],
                         dtype=dtype)
    mag = magnitude(dtype, rng, -30, 25, 200)  # gradients multiply by up to ~1e3: room left below the max
    return B, C, H, W, boxes, scale, (draw(st.integers(1, 16)), draw(st.integers(1, 16))), mag, dtype, rng


def _or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g


def _close(got, want, dtype, scale_of_terms):
    tol = (2e-6 if dtype == torch.float32 else 1e-12) * scale_of_terms
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol, equal_nan=False)


def _fixed_region_case(r: float, dtype=torch.float64):
    boxes = torch.tensor([[0, 0, 0, 4, 5], [0, 4, 5, 5, 6]])
    return 1, 2, 9, 11, boxes, torch.tensor([r, r], dtype=dtype), (6, 7), 1.0, dtype, np.random.default_rng(0)


@pytest.mark.parametrize("backend", BACKENDS)
@profile(1.5)
@given(case=region_cases(overlapping=True))
@example(case=_fixed_region_case(1e30))  # the canvas came out all 0
@example(case=_fixed_region_case(1e30, torch.float32))
def test_scale_regions_any_factor(backend, case):
    B, C, H, W, boxes, scale, out_size, mag, dtype, rng = case
    features = (torch.from_numpy(rng.standard_normal((B, C, H, W))) * mag).to(dtype).requires_grad_()
    r = scale.clone().requires_grad_()
    with running(backend):
        got = ck.scale_regions(features, boxes, r, out_size)
        grad = torch.from_numpy(rng.standard_normal(got.shape)).to(dtype)
        if not len(boxes):
            assert got.shape == (0, C, *out_size)
            return
        gf, gr = torch.autograd.grad(got, (features, r), grad, allow_unused=True)
    f64, r64 = features.detach().double().requires_grad_(), scale.double().requires_grad_()
    want = R.scale_regions_reference(f64, boxes, r64, out_size)
    wf, wr = torch.autograd.grad(want, (f64, r64), grad.double(), allow_unused=True)
    fmax = float(features.detach().abs().max())
    _close(got, want, dtype, fmax)
    assert torch.isfinite(got).all()
    # |d out / d r| <= 2 max|f| (Sh + Sw) / r^2 per canvas sample; the valid part is empty below r = 1/h
    gsum = float(grad.abs().sum())
    _close(_or_zeros(gf, f64), _or_zeros(wf, f64), dtype, gsum)
    if len(scale):
        bound = 2 * fmax * gsum * sum(out_size) / float(scale.detach().double().min()) ** 2
        _close(gr, wr, dtype, min(bound, 1e300))


@pytest.mark.parametrize("backend", BACKENDS)
@profile(1.5)
@given(case=region_cases(overlapping=False))
@example(case=_fixed_region_case(1e20))  # (d + 0.5) r - 0.5 overflowed its int64 cast
@example(case=_fixed_region_case(1e20, torch.float32))  # r^2 overflows float32: must raise
def test_unscale_regions_any_factor(backend, case):
    B, C, H, W, boxes, scale, (Sh, Sw), mag, dtype, rng = case
    N = len(boxes)
    pred = (torch.from_numpy(rng.standard_normal((N, C, Sh, Sw))) * mag).to(dtype)  # mag <= 1e25 (f32)
    pred[..., 0, 0] = 0.0  # zeros, which r**2 = inf would turn to NaN
    base = (torch.from_numpy(rng.standard_normal((B, C, H, W))) * mag).to(dtype)
    r64 = scale.double()
    empty = [(math.floor(float(r) * h) < 1 or math.floor(float(r) * w) < 1) for r, (_, _, _, h, w) in zip(r64, boxes.tolist())]
    too_big = [float(r) > math.sqrt(torch.finfo(dtype).max) for r in r64]
    p, s, b = pred.clone().requires_grad_(), scale.clone().requires_grad_(), base.clone().requires_grad_()
    try:
        with running(backend):
            got = ck.unscale_regions(p, boxes, s, b)
            grad = torch.from_numpy(rng.standard_normal(got.shape)).to(dtype)
            gp, gs, gb = torch.autograd.grad(got, (p, s, b), grad, allow_unused=True)
    except ValueError as exc:
        assert names(exc, "scale") and (any(empty) or any(too_big)), exc
        return
    assert not any(empty) and not any(too_big), "must raise naming scale"
    p64, s64, b64 = pred.double().requires_grad_(), r64.clone().requires_grad_(), base.double().requires_grad_()
    want = R.unscale_regions_reference(p64, boxes, s64, b64)
    wp, ws, wb = torch.autograd.grad(want, (p64, s64, b64), grad.double(), allow_unused=True)
    rmax = float(r64.max()) if N else 1.0
    pmax = max(float(pred.abs().max()) if pred.numel() else 0.0, float(base.abs().max()))
    if dtype == torch.float64 or pmax * rmax**2 < 1e38:
        _close(got, want.to(dtype), dtype, pmax * max(1.0, rmax) ** 2)
    gsum = float(grad.abs().sum())
    _close(gb, wb, dtype, gsum)
    if dtype == torch.float64 or rmax**2 * gsum < 1e38:
        _close(_or_zeros(gp, p64), _or_zeros(wp, p64), dtype, gsum * max(1.0, rmax) ** 2)
    if N and (dtype == torch.float64 or rmax**3 * gsum * pmax * 30 < 1e38):
        hmax = max(h for _, _, _, h, _ in boxes.tolist()) + max(w for _, _, _, _, w in boxes.tolist())
        _close(gs, ws, dtype, 4 * pmax * gsum * max(1.0, rmax) * (1 + rmax * hmax))


@st.composite
def map_pairs(draw, max_side=24):
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(dtypes)
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    # from subnormals up to where a window's sum of squared errors still fits the dtype (1e17 in float32:
    # squares of 4e34, 576 of them; 1e150 in float64): 61 and 470 orders of magnitude
    lo, hi = (-44, 17) if dtype == torch.float32 else (-320, 150)
    mags = 10.0 ** rng.uniform(lo, hi, size=(B, 1, H, W))
    signs = rng.choice([-1.0, 1.0, 0.0], size=(B, 1, H, W), p=[0.3, 0.6, 0.1])
    a = torch.from_numpy(signs * mags).to(dtype)
    b = torch.from_numpy(rng.choice([-1.0, 1.0], size=a.shape) * 10.0 ** rng.uniform(lo, hi, size=a.shape)).to(dtype)
    return a, b, dtype, rng


def fsum_windows(x: torch.Tensor, rh: int, rw: int, keep: bool) -> np.ndarray:
    """Exactly rounded float64 sums of every window (row-major), [B, R]."""
    B, H, W = x.shape
    nh = -(-H // rh) if keep else H // rh
    nw = -(-W // rw) if keep else W // rw
    a = x.double().numpy()
    return np.array([[math.fsum(a[bi, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].ravel().tolist())
                      for i in range(nh) for j in range(nw)] for bi in range(B)]).reshape(B, nh * nw)


@given(case=map_pairs(), k=st.integers(1, 24))
@profile()
def test_region_means_extreme_densities(case, k):
    density, _, dtype, _ = case
    H, W = density.shape[-2:]
    with bounded(MEM, seconds=60):
        if k > min(H, W):
            with pytest.raises(ValueError, match="k"):
                ck.region_means(density, k)
            return
        got = ck.region_means(density, k)
    boxes = ck.grid_boxes(H, W, k).tolist()
    a = density.double().numpy()[:, 0]
    want = np.array([[math.fsum(a[b, y0:y0 + h, x0:x0 + w].ravel().tolist()) / (h * w) for y0, x0, h, w in boxes]
                     for b in range(len(a))])
    want = torch.from_numpy(want).to(dtype).double()
    scale = torch.from_numpy(np.abs(a).max(axis=(1, 2), keepdims=True)[:, :, 0]).double()
    assert torch.isfinite(got).all()
    tol = (1e-6 if dtype == torch.float32 else 1e-13) * scale + (1e-44 if dtype == torch.float32 else 1e-320)
    assert bool(((got.double() - want).abs() <= tol).all()), (got, want)


# ------------------------------------------------------------------------------------------- gating
@st.composite
def gating_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(dtypes)
    mode = draw(st.sampled_from(["nearest", "bilinear"]))
    B, K = draw(st.integers(1, 2)), draw(st.integers(2, 4))
    sizes = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(K)]
    if draw(st.booleans()):
        groups = None
        M, N = K * (K - 1) // 2, 2
    else:
        M, N = draw(st.integers(1, 3)), draw(st.integers(1, K))
        groups = torch.from_numpy(np.stack([rng.choice(K, size=N, replace=False) for _ in range(M)]))
    big = float(torch.finfo(dtype).max)
    # nearest copies the logits exactly: any finite magnitude; bilinear's interpolation rounds them, and a
    # softmax of logits of 1e38 is then decided by that rounding, so there up to 1e2 (f32) / 1e3 (f64):
    # past exp's range either way
    lmax = big if mode == "nearest" else (1e2 if dtype == torch.float32 else 1e3)
    lmag = 10.0 ** rng.uniform(-30, math.log10(lmax))
    emag = magnitude(dtype, rng, -30, 30, 300)
    experts = [torch.from_numpy(rng.random((B, 1, h, w)) * emag).to(dtype) for h, w in sizes]
    g1 = torch.from_numpy(np.clip(rng.standard_normal((B, M * N, draw(st.integers(1, 6)), draw(st.integers(1, 6)))) * lmag,
                                  -lmax, lmax)).to(dtype)
    g2 = torch.from_numpy(np.clip(rng.standard_normal((B, M, draw(st.integers(1, 6)), draw(st.integers(1, 6)))) * lmag,
                                  -lmax, lmax)).to(dtype)
    size = draw(st.one_of(st.none(), st.tuples(st.integers(1, 12), st.integers(1, 12))))
    return experts, g1, g2, groups, size, mode, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@profile(1.5)
@given(case=gating_cases())
def test_hierarchical_gating_extreme_logits(backend, case):
    experts, g1, g2, groups, size, mode, dtype = case
    with running(backend):
        out = ck.hierarchical_gating(experts, g1, g2, groups=groups, size=size, upsample=mode)
    K = len(experts)
    grp = groups if groups is not None else torch.tensor([[i, j] for i in range(K) for j in range(i + 1, K)])
    H, W = out.final.shape[-2:]
    want = R.hierarchical_gating([e.double() for e in experts], g1.double(), g2.double(), grp, (H, W), mode)
    emax = max(float(e.abs().max()) for e in experts)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    for got, ref, scale in zip(out, want, (emax, emax, H * W)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol * max(scale, 1e-300))


# ------------------------------------------------------------------------------------------- local counts
@st.composite
def regions_arg(draw, H, W):
    return draw(st.one_of(log_uniform(1e-300, 1.0), st.floats(1.0001, 1e300), st.integers(1, max(H, W) + 3),
                          st.tuples(st.integers(1, H + 2), st.integers(1, W + 2)).map(list)))


@pytest.mark.parametrize("backend", BACKENDS)
@profile(1.5)
@given(case=map_pairs(), data=st.data(), edge=st.sampled_from(["keep", "drop"]))
def test_local_counts_extreme_values_and_windows(backend, case, data, edge):
    pred, target, dtype, _ = case
    H, W = pred.shape[-2:]
    region = data.draw(regions_arg(H, W))
    try:
        with running(backend):
            pc, tc, se = ck.local_counts(pred, target, region, edge=edge)
    except ValueError as exc:
        assert names(exc, "region"), exc
        with pytest.raises(ValueError):
            window_size(region, H, W)
        return
    rh, rw = window_size(region, H, W)
    keep = edge == "keep"
    p, t = pred[:, 0], target[:, 0]
    sq = (p.double() - t.double()) ** 2
    for got, x in ((pc, p.double()), (tc, t.double()), (se, sq)):
        want = torch.from_numpy(fsum_windows(x, rh, rw, keep))
        bound = torch.from_numpy(fsum_windows(x.abs(), rh, rw, keep))
        eps, tiny = (2.0**-24, 2.0**-149) if dtype == torch.float32 else (2.0**-53, 2.0**-1074)
        tol = (rh * rw + 3) * (eps * bound + 4 * tiny)
        expected = want.to(dtype).double()  # honest overflow: past the dtype's max the sum is inf
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isinf(got.double()), ~finite), "inf exactly where the true sum overflows"
        assert bool(((got.double() - want).abs() <= tol)[finite].all()), (got, want)


# ------------------------------------------------------------------------------------------- losses
@st.composite
def exact_map_pairs(draw):
    """Maps of small integers times 2^e: window sums and squared errors are exact in any order, so the
    choice of hard windows cannot depend on rounding."""
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(dtypes)
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(2, 24)), draw(st.integers(2, 24))
    e = draw(st.integers(-60, 50) if dtype == torch.float32 else st.integers(-480, 450))
    a = torch.from_numpy(rng.integers(0, 40, size=(B, 1, H, W)) * 2.0**e).to(dtype)
    b = torch.from_numpy(rng.integers(0, 40, size=(B, 1, H, W)) * 2.0**e).to(dtype)
    return a, b, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@profile()
@given(case=exact_map_pairs(), num_hard=st.integers(1, 30), num_sublists=st.integers(1, 6),
       pairs=st.sampled_from(["adjacent", "all"]), edge=st.sampled_from(["keep", "drop"]),
       region=st.sampled_from([0.125, 0.5, 1.0, 1e-300, 3, (2, 5)]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_relative_local_count_loss_extreme_scales(backend, case, num_hard, num_sublists, pairs, edge, region, reduction):
    pred, target, dtype = case
    H, W = pred.shape[-2:]
    if not isinstance(region, float) and max(region if isinstance(region, tuple) else (region,)) > min(H, W):
        region = 0.5
    with running(backend):
        got = L.relative_local_count_loss(pred, target, region, num_hard, num_sublists, pairs, edge, reduction)
    rh, rw = window_size(region, H, W)
    counts = R.local_counts(pred[:, 0].double(), target[:, 0].double(), rh, rw, edge == "keep")
    per_image = R.relative_local_count_loss(*counts, num_hard, num_sublists, pairs)
    want = per_image.mean() if reduction == "mean" else per_image.sum() if reduction == "sum" else per_image
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=1e-6 if dtype == torch.float32 else 1e-13,
                               atol=0)


@given(case=map_pairs(), reduction=st.sampled_from(["mean", "sum", "none"]))
@profile()
def test_density_loss_extreme_values(case, reduction):
    pred, target, dtype, _ = case
    with bounded(MEM, seconds=60):
        got = L.density_loss(pred, target, reduction)
    sq = ((pred.double() - target.double()) ** 2).numpy().reshape(len(pred), -1)
    per = np.array([math.fsum(r.tolist()) / r.size for r in sq])
    want = {"mean": math.fsum(sq.ravel().tolist()) / sq.size, "sum": math.fsum(sq.ravel().tolist()), "none": per}[reduction]
    want = torch.as_tensor(want, dtype=torch.float64)
    expected = want.to(dtype).double()
    assert torch.equal(torch.isinf(got.double()), torch.isinf(expected)), (got, want)
    eps, tiny = (2.0**-24, 2.0**-149) if dtype == torch.float32 else (2.0**-53, 2.0**-1074)
    tol = (sq.size + 3) * (eps * want.abs() + 4 * tiny)  # a rounded difference, square and sum
    fin = torch.isfinite(expected)
    assert bool(((got.double() - want).abs() <= tol)[fin].all()), (got, want)


@given(seed=seeds, dtype=dtypes, B=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8), up=st.integers(1, 3),
       threshold=st.sampled_from([1e-5, 0.0, 1e-300, 1e30]), reduction=st.sampled_from(["mean", "sum", "none"]))
@profile()
def test_attention_loss_saturated_maps(seed, dtype, B, h, w, up, threshold, reduction):
    """Attention exactly 0 or 1 (saturated sigmoids) and tiny or huge target densities: finite, eq. 5 with
    logs clamped at -100."""
    rng = np.random.default_rng(seed)
    att = torch.from_numpy(rng.choice([0.0, 1.0, 1e-45, 0.5, 1 - 2**-24, rng.random()], size=(B, 1, h, w))).to(dtype)
    tgt = torch.from_numpy(rng.choice([-1e30, 0.0, 1e-300, 1e-5, 2e-5, 1e30], size=(B, 1, h * up, w * up))).to(dtype)
    with bounded(MEM, seconds=60):
        got = L.attention_loss(att, tgt, threshold=threshold, reduction=reduction)
    a = torch.nn.functional.interpolate(att.double(), size=(h * up, w * up), mode="nearest")
    g = (tgt > threshold).double()  # the comparison is the op's definition: in the map's dtype
    bce = -(g * torch.log(a).clamp(min=-100) + (1 - g) * torch.log(1 - a).clamp(min=-100))
    per = bce.flatten(1).mean(1)
    want = {"mean": per.mean(), "sum": bce.sum(), "none": per}[reduction]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


@given(seed=seeds, dtype=dtypes, B=st.integers(1, 3), M=st.integers(1, 4), N=st.integers(1, 5),
       per_image=st.booleans(), top=st.sampled_from([0.0, 1e-30, 1.0, 1e6, 1e12]))
@profile()
def test_expert_importance_loss_any_importance(seed, dtype, B, M, N, per_image, top):
    """Importances are sums of gate weights over pixels: 0 up to H*W (1e12: a megapixel squared)."""
    rng = np.random.default_rng(seed)
    imp = torch.from_numpy(rng.random((B, M, N)) * top * rng.choice([0.0, 1.0], size=(B, M, N), p=[0.2, 0.8])).to(dtype)
    with bounded(MEM, seconds=60):
        got = L.expert_importance_loss(imp, per_image=per_image)
    x = imp.double().numpy()

    def cv2(w):
        if w.shape[-1] < 2:
            return np.zeros(w.shape[:-1])
        return w.var(axis=-1, ddof=1) / (w.mean(axis=-1) ** 2 + 1e-10)

    want = cv2(x).sum(axis=1).mean() if per_image else cv2(x.sum(axis=0)).sum()
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(float(want), rel=1e-4 if dtype == torch.float32 else 1e-10, abs=1e-6)


@given(seed=seeds, dtype=dtypes, n=st.integers(0, 20), C=st.integers(1, 4))
@profile()
@example(seed=5, dtype=torch.float32, n=20, C=1)
def test_multipolar_center_loss_any_scale(seed, dtype, n, C):
    """Scale factors r from 1e-30 to 1e30: d = D / r^2 is computed without r^2 under- or overflowing
    (r = 1e-30 in float32 squares to 0, and 0 / 0 = NaN)."""
    rng = np.random.default_rng(seed)
    D = torch.from_numpy(rng.choice([0.0, 1.0], size=n) * 10.0 ** rng.uniform(-30, 30, size=n)).to(dtype)
    r = torch.from_numpy(10.0 ** rng.uniform(-30, 30, size=n)).to(dtype)
    idx = torch.from_numpy(rng.integers(-1, C, size=n))
    centers = torch.from_numpy(rng.random(C)).to(dtype)
    with bounded(MEM, seconds=60):
        got = L.multipolar_center_loss(D, r, idx, centers)
    terms = [(float(d) / float(s) / float(s) - float(centers[c])) ** 2 if c >= 0 else 0.0
             for d, s, c in zip(D.double(), r.double(), idx.tolist())]
    want = math.fsum(terms) if all(math.isfinite(t) for t in terms) else math.inf
    expected = float(torch.tensor(want, dtype=torch.float64).to(dtype))
    assert not math.isnan(float(got))
    if math.isinf(expected):
        assert math.isinf(float(got))
    else:
        assert float(got) == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-12)
