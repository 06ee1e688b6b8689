"""The CUDA kernels (csrc/*/*_cuda.cu) executed on the CPU through csrc/common/cuda_emulation.h (docs/definitions.md,
"Testing the GPU code"), against the C++ CPU kernels and the references: every CUDA entry point, random and
real-sample inputs, float32 and float64, ragged batches, empty inputs, strides, every density style,
deterministic mode, the gradients of the regions ops, shuffled thread orders, and launch geometries forced
small enough that the grid- and block-stride loops wrap. The planted bugs of csrc/emulated/selftest_kernels.cpp
show what the emulation catches; test_cuda_emulated_asan.py runs the kernels under AddressSanitizer."""
from __future__ import annotations

import math
import re

import pytest
import torch

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import density as D
from crowdkernels.ops import reference as R
from cuda_emulation import (
    BUILD,
    CSRC,
    EMULATED_DIR,
    SOURCES,
    cuda_op_names,
    cuda_sources,
    emulated_ops,
    emulation,
    kernel_counts,
)
from test_density import _all_real_samples, _clustered_points, _random_points
from test_regions import SCALE_CASES, _scale_case, _unscale_case

pytestmark = pytest.mark.cuda_emulated

CPU = torch.ops.crowdkernels
STYLES = ("exact", "csrnet", "matlab")
# (max_grid, max_block): as the sources launch; one block of 32 threads; three blocks of 64 (every
# grid-stride loop wraps, and the splat's one-block-per-point loop too)
GEOMETRIES = [pytest.param((0, 0), id="as-launched"), pytest.param((1, 32), id="1x32"), pytest.param((3, 64), id="3x64")]


@pytest.fixture(scope="module")
def ops():
    ops = emulated_ops()
    yield ops
    # what ran, for the record (build/ is ignored by git): one line per kernel instantiation
    BUILD.mkdir(parents=True, exist_ok=True)
    lines = [f"{n}\t{name}\t{sig}" for (name, sig), n in sorted(kernel_counts().items())]
    (BUILD / "kernel_launches.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def _default_emulation(ops):
    with emulation():
        yield


def _geometry(geometry, seed=0):
    return emulation(seed=seed, max_grid=geometry[0], max_block=geometry[1])


def _offsets(counts):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64)


def _ragged(seed, size, dtype=torch.float64):
    """Five images: clustered heads with coincident ones, an empty image, a lone point, points partly
    outside the image, and two points."""
    plist = [
        _clustered_points(150, size, seed),
        torch.zeros(0, 2, dtype=torch.float64),
        _random_points(1, size, seed + 1),
        _random_points(60, size, seed + 2, outside=8),
        _random_points(2, size, seed + 3),
    ]
    return torch.cat(plist).to(dtype), _offsets([len(p) for p in plist]), plist


def _launch_sites(cu_text):
    """The kernel named by each CK_LAUNCH(grid, block, stream, kernel) of a source."""
    names = []
    for m in re.finditer(r"CK_LAUNCH\(", cu_text):
        depth, i, args, start = 1, m.end(), [], m.end()
        while depth:
            c = cu_text[i]
            if c in "(<":
                depth += 1
            elif c in ")>":
                depth -= 1
            elif c == "," and depth == 1:
                args.append(cu_text[start:i])
                start = i + 1
            i += 1
        args.append(cu_text[start : i - 1])
        names.append(",".join(args[3:]).strip())
    return names


# ------------------------------------------------------------------------------------ the emulation itself


def test_every_cuda_source_and_op_is_emulated(ops):
    """Each .cu is compiled into the emulation (through its wrapper), launches only through CK_LAUNCH, and
    each op it registers exists as crowdkernels_cuda_emulated::<op> with the real op's schema."""
    wrapped = {src: (EMULATED_DIR / src).read_text() for src in SOURCES}
    for cu in cuda_sources():
        rel = cu.relative_to(CSRC).as_posix()
        assert any(f'#include "{rel}"' in text for text in wrapped.values()), f"{rel} has no wrapper in csrc/emulated"
        text = cu.read_text()
        assert "<<<" not in text, f"{rel} launches with <<<...>>>: use CK_LAUNCH so that the emulation runs it"
        assert _launch_sites(text), rel
    names = cuda_op_names()
    assert {"knn_sigma", "density_splat", "scale_regions", "unscale_regions"} <= set(names)
    for name in names:
        real = getattr(CPU, name).default._schema
        emulated = getattr(ops, name).default._schema
        assert str(emulated).split("::", 1)[1] == str(real).split("::", 1)[1]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"crowdkernels_cuda_emulated::{name}", "CPU")


def test_planted_missing_barrier_changes_with_the_seed(ops):
    """A block sum whose tree reads slots before the other threads wrote them: right with its barriers for
    every seed and geometry, wrong without them for some seed (the thread order is shuffled between barriers)."""
    blocks, threads = 4, 64
    x = torch.randn(blocks * threads, generator=torch.Generator().manual_seed(0))
    want = x.view(blocks, threads).double().sum(1)
    wrong, unwritten = 0, 0
    for seed in range(6):
        with emulation(seed=seed):
            torch.testing.assert_close(ops._selftest("block_sum", x, blocks, threads).double(), want, atol=1e-5, rtol=0)
            broken = ops._selftest("block_sum_no_barrier", x, blocks, threads).double()
        wrong += not torch.allclose(broken, want, atol=1e-5, rtol=0)
        unwritten += int(broken.isnan().sum())  # a slot read before any thread wrote it: the block's poison
    assert wrong > 0 and unwritten > 0


def test_shared_memory_is_found_and_poisoned(ops):
    """The __shared__ arrays of the kernels (density's grid_kernel: 4 x 256 doubles, regions' block_sum: 256
    doubles, the selftests' 1024 floats) are all found in the library's symbol table, to be filled with
    NaN before each block."""
    assert ops._shared_bytes() >= 4 * 256 * 8 + 256 * 8 + 1024 * 4


def test_planted_order_dependent_sum_changes_with_the_seed(ops):
    """float atomicAdd of values whose rounded sum depends on their order: the shuffled thread order of the
    emulation makes the bits change with the seed, as the order of arrival does on a GPU."""
    x = torch.tensor([1e8, 1.0, -1e8, 1.0] * 64, dtype=torch.float32) * torch.rand(256, generator=torch.Generator().manual_seed(1))
    sums = set()
    for seed in range(8):
        with emulation(seed=seed):
            sums.add(ops._selftest("atomic_sum", x, 4, 64).item())
    assert len(sums) > 1


def test_planted_partial_barrier_is_reported(ops):
    x = torch.zeros(2 * 32)
    x[0] = 5  # threads 0..4 of each block wait at a barrier the other 27 skip
    with pytest.raises(RuntimeError, match=r"partial_barrier_kernel.*__syncthreads\(\) at selftest_kernels.cpp:\d+ reached by 5 of 32 threads"):
        ops._selftest("partial_barrier", x, 2, 32)
    x[0] = 32  # every thread: fine
    assert torch.equal(ops._selftest("partial_barrier", x, 2, 32), torch.ones(64))


def test_planted_divergent_barriers_are_reported(ops):
    with pytest.raises(RuntimeError, match=r"wait at different __syncthreads\(\)"):
        ops._selftest("divergent_barrier", torch.zeros(64), 2, 32)


@pytest.mark.parametrize(
    "blocks, threads, what",
    [(0, 32, "grid"), (2**31, 32, "grid"), (2**32 + 1, 32, "grid"), (1, 0, "block"), (1, 2048, "block")],
)
def test_invalid_launch_configurations_are_rejected(ops, blocks, threads, what):
    """What CUDA rejects (cudaErrorInvalidConfiguration), before any narrowing: 2^32 + 1 blocks must not
    become 1."""
    with pytest.raises(RuntimeError, match=rf"invalid configuration argument: kernel fill_kernel .*{what}"):
        ops._selftest("fill", torch.zeros(8), blocks, threads)


def test_grids_too_large_to_emulate_are_refused(ops):
    """A valid CUDA grid of 2^31 - 1 blocks would take the emulation hours and 16 GiB of indices: refused
    with the way out (a forced smaller grid), which then runs."""
    with pytest.raises(RuntimeError, match=r"more blocks than the emulation runs .*max_grid"):
        ops._selftest("fill", torch.zeros(8), 2**31 - 1, 32)
    with emulation(max_grid=4):
        assert torch.equal(ops._selftest("fill", torch.zeros(8), 2**31 - 1, 32), torch.arange(8.0))


def test_missing_compiler_skips_with_the_reason(monkeypatch):
    import cuda_emulation

    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "no C++ compiler ('no-such-compiler' not on PATH)" in cuda_emulation.compiler_missing()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_grid_stride_fill(ops, geometry):
    """The selftest's grid-stride loop, as the sources' are, under every forced geometry."""
    with _geometry(geometry):
        out = ops._selftest("fill", torch.zeros(1000), 8, 256)
    assert torch.equal(out, torch.arange(1000, dtype=torch.float32))


def test_configuration_is_checked(ops):
    with pytest.raises(RuntimeError, match="max_block must be 0 .* or a power of two"):
        ops._configure(0, 0, 48)
    with pytest.raises(RuntimeError, match="max_grid must be >= 0"):
        ops._configure(0, -1, 0)
    with emulation(seed=7, max_grid=2, max_block=16):
        assert list(ops._config()) == [7, 2, 16]
    assert list(ops._config()) == [0, 0, 0]


# ----------------------------------------------------------------------------------------------- knn_sigma


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_sigma_equals_cpu_ragged(ops, geometry, k):
    """The same bits as the CPU kernel (both sum the K distances in ascending order), and the brute-force
    reference per image."""
    pts, off, plist = _ragged(k, (47, 61))
    with _geometry(geometry, seed=k), _ext.poisoned_outputs():
        got = ops.knn_sigma(pts, off, k, 0.3, 9.5)
    assert got.dtype == torch.float64 and got.shape == (pts.shape[0],)
    assert torch.equal(got, CPU.knn_sigma(pts, off, k, 0.3, 9.5))
    for a, b, p in zip(off[:-1].tolist(), off[1:].tolist(), plist):
        torch.testing.assert_close(got[a:b], R.knn_sigma_reference(p, k, 0.3, 9.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["collinear", "coincident", "integer_grid", "tiny"])
def test_knn_sigma_degenerate_layouts(ops, layout):
    if layout == "collinear":
        pts = torch.stack([torch.linspace(0, 99, 80, dtype=torch.float64), torch.full((80,), 5.0, dtype=torch.float64)], 1)
    elif layout == "coincident":
        pts = torch.full((20, 2), 7.5, dtype=torch.float64)
    elif layout == "integer_grid":  # ties: 4 neighbours at exactly distance 1
        yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(9.0), indexing="ij")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1).double()
    else:  # 0..4 points per image
        pts = _random_points(10, (20, 20), seed=3)
    off = _offsets([0, 1, 2, 3, 4]) if layout == "tiny" else _offsets([len(pts)])
    for seed in range(3):
        with emulation(seed=seed, max_grid=2, max_block=32):
            got = ops.knn_sigma(pts, off, 3, 0.3, float("nan"))
        torch.testing.assert_close(got, CPU.knn_sigma(pts, off, 3, 0.3, float("nan")), rtol=0, atol=0, equal_nan=True)


def test_knn_sigma_empty_and_float32(ops):
    assert ops.knn_sigma(torch.zeros(0, 2, dtype=torch.float64), _offsets([]), 3, 0.3, 1.0).shape == (0,)
    assert ops.knn_sigma(torch.zeros(0, 2, dtype=torch.float64), _offsets([0, 0]), 3, 0.3, 1.0).shape == (0,)
    pts, off, _ = _ragged(5, (30, 30), torch.float32)  # the kernel reads any float dtype, computes in float64
    assert torch.equal(ops.knn_sigma(pts, off, 3, 0.3, 2.0), CPU.knn_sigma(pts, off, 3, 0.3, 2.0))


def test_knn_sigma_strided_points(ops):
    pts, off, _ = _ragged(2, (40, 50))
    strided = torch.stack([pts[:, 1], pts[:, 0]]).t().flip(1)  # the same values in a transposed layout
    assert not strided.is_contiguous() and torch.equal(strided, pts)
    assert torch.equal(ops.knn_sigma(strided, off, 3, 0.3, 1.0), CPU.knn_sigma(pts, off, 3, 0.3, 1.0))


# -------------------------------------------------------------------------------------------- density_splat


def _splat_inputs(style, seed=0, dtype=torch.float64, size=(37, 53)):
    """The points a style splats (the GPU path's preparation, density._prepare_vectorized), their offsets
    and kNN sigmas, of a ragged batch."""
    pts, off, _ = _ragged(seed, size)
    if style != "matlab":
        pts, off, _ = D._prepare_vectorized(pts, off, *size, style)
    sig = CPU.knn_sigma(pts, off, 3, 0.3, (size[0] + size[1]) / 8.0)
    return pts.to(dtype).contiguous(), off, sig, size


def _splat_tol(dtype, deterministic):
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    # float atomics reorder float64 sums (1e-16); deterministic mode rounds each weight to 2^-40
    return dict(rtol=0, atol=1e-10 if deterministic else 1e-13)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("style", STYLES)
def test_density_splat_matches_cpu(ops, style, stride, dtype, deterministic):
    pts, off, sig, size = _splat_inputs(style, seed=stride, dtype=dtype)
    code = D._STYLE_CODE[style]
    with _ext.poisoned_outputs():
        got = ops.density_splat(pts, off, sig, *size, code, 4.0, 15, stride, deterministic)
    want = CPU.density_splat(pts, off, sig, *size, code, 4.0, 15, stride, deterministic)
    assert got.dtype == dtype and got.shape == want.shape == (5, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(got, want, **_splat_tol(dtype, deterministic))


@pytest.mark.parametrize("geometry", GEOMETRIES[1:])
@pytest.mark.parametrize("style", STYLES)
def test_density_splat_small_geometries(ops, style, geometry):
    pts, off, sig, size = _splat_inputs(style, seed=11)
    code = D._STYLE_CODE[style]
    want = CPU.density_splat(pts, off, sig, *size, code, 4.0, 15, 2, False)
    for deterministic in (False, True):
        with _geometry(geometry, seed=3), _ext.poisoned_outputs():
            got = ops.density_splat(pts, off, sig, *size, code, 4.0, 15, 2, deterministic)
        torch.testing.assert_close(got, want, **_splat_tol(torch.float64, deterministic))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("style", STYLES)
def test_deterministic_mode_is_bit_identical_across_shuffles(ops, style, dtype):
    """deterministic=True sums in fixed point with integer atomics: the same bits whatever the order in
    which the threads and blocks run, and whatever the geometry."""
    pts, off, sig, size = _splat_inputs(style, seed=4, dtype=dtype)
    code = D._STYLE_CODE[style]
    runs = []
    for seed, geometry in [(0, (0, 0)), (1, (0, 0)), (2, (0, 0)), (3, (1, 32)), (4, (3, 64)), (5, (5, 128))]:
        with _geometry(geometry, seed=seed):
            runs.append(ops.density_splat(pts, off, sig, *size, code, 4.0, 15, 1, True))
    for other in runs[1:]:
        assert torch.equal(runs[0], other)


def test_density_splat_strided_inputs(ops):
    pts, off, sig, size = _splat_inputs("exact", seed=6)
    strided_pts = torch.cat([pts, pts], 1)[:, :2]  # rows 4 apart
    strided_sig = torch.stack([sig, sig], 1)[:, 0]
    assert not strided_pts.is_contiguous() and not strided_sig.is_contiguous()
    got = ops.density_splat(strided_pts, off, strided_sig, *size, 0, 4.0, 15, 1, False)
    torch.testing.assert_close(got, CPU.density_splat(pts, off, sig, *size, 0, 4.0, 15, 1, False), rtol=0, atol=1e-13)


def test_density_splat_empty_inputs(ops):
    for counts in ([], [0], [0, 0, 0]):
        pts = torch.zeros(0, 2, dtype=torch.float64)
        with _ext.poisoned_outputs():
            out = ops.density_splat(pts, _offsets(counts), torch.zeros(0, dtype=torch.float64), 9, 7, 0, 4.0, 15, 2, True)
        assert out.shape == (len(counts), 5, 4) and not out.any()
    # points whose windows are all empty (outside the image in style exact)
    pts = torch.tensor([[-5.0, 3.0], [100.0, 2.0]], dtype=torch.float64)
    out = ops.density_splat(pts, _offsets([2]), torch.ones(2, dtype=torch.float64), 9, 7, 0, 4.0, 15, 1, False)
    assert out.shape == (1, 9, 7) and not out.any()


# ------------------------------------------------------------------------------- density_maps, the GPU path


@pytest.fixture
def gpu_path(ops, monkeypatch):
    """crowdkernels.density_maps run as on a GPU: the backend choice of a CUDA build (the CUDA kernels where
    they exist, the tensor-op preparation where none does), with the emulated kernels."""
    cuda = set(cuda_op_names())
    monkeypatch.setattr(_ext, "backend", lambda device, op: "cuda" if op in cuda else "reference")
    monkeypatch.setattr(D, "_knn_sigma", lambda p, o, k, b, lone: ops.knn_sigma(p, o, k, b, lone))
    monkeypatch.setattr(
        D, "_density_splat", lambda p, o, s, h, w, style, t, ks, st, det: ops.density_splat(p, o, s, h, w, D._STYLE_CODE[style], t, ks, st, det)
    )


_REAL_BACKEND, _REAL_KNN, _REAL_SPLAT = _ext.backend, D._knn_sigma, D._density_splat


def _cpu_density_maps(*args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:  # the CPU kernels, whatever gpu_path patched
        mp.setattr(_ext, "backend", _REAL_BACKEND)
        mp.setattr(D, "_knn_sigma", _REAL_KNN)
        mp.setattr(D, "_density_splat", _REAL_SPLAT)
        return ck.density_maps(*args, **kwargs)


@pytest.mark.parametrize("style", STYLES)
def test_density_maps_gpu_path_random(ops, gpu_path, style):
    size = (41, 57)
    _, _, plist = _ragged(8, size)
    for kwargs in (dict(), dict(stride=4), dict(sigma=2.5), dict(deterministic=True)):
        want = _cpu_density_maps(plist, size, style=style, **kwargs)
        with _ext.poisoned_outputs():
            got = ck.density_maps(plist, size, style=style, **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    pts32 = plist[0].float()  # (the clustered points reach W - 1e-6, which rounds to W in float32: outside)
    one = ck.density_map(pts32, size, style=style)
    torch.testing.assert_close(one.double(), R.density_map_reference(pts32.double(), size, style=style), rtol=1e-5, atol=1e-6)


def test_density_maps_gpu_path_real_samples(ops, gpu_path):
    """Every real sample (ShanghaiTech A and B, UCF_CC_50) against the CPU kernels, float32 maps as training
    uses: the styles in turn (each on a third of the samples), deterministic mode on every other sample, a
    forced small geometry on every fourth."""
    for i, (name, pts, size) in enumerate(_all_real_samples()):
        t = torch.from_numpy(pts).float()
        style = STYLES[i % 3]
        want = _cpu_density_maps([t], size, style=style)
        with _geometry((7, 64) if i % 4 == 0 else (0, 0), seed=i):
            got = ck.density_maps([t], size, style=style, deterministic=i % 2 == 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} ({style}): {m}")


def test_knn_sigma_real_samples(ops):
    """The kNN of every real sample, all images in one ragged batch: the CPU kernel's bits."""
    plist = [torch.from_numpy(pts) for _, pts, _ in _all_real_samples()]
    pts, off = torch.cat(plist), _offsets([len(p) for p in plist])
    assert torch.equal(ops.knn_sigma(pts, off, 3, 0.3, 7.0), CPU.knn_sigma(pts, off, 3, 0.3, 7.0))


# --------------------------------------------------------------------------------------- bad offsets (review)


BAD_OFFSETS = [
    pytest.param([1, 4, 10], id="not-from-0"),
    pytest.param([0, 4, 12], id="past-the-end"),
    pytest.param([0, 4, 9], id="short"),
    pytest.param([0, 7, 4, 10], id="decreasing"),
    pytest.param([0, -3, 10], id="negative"),
]


@pytest.mark.parametrize("offsets", BAD_OFFSETS)
def test_bad_offsets_rejected_like_the_cpu(ops, offsets):
    """Review fix: the CUDA ops check offsets' values as the CPU ops do (one shared function), instead of
    reading and writing out of bounds, or launching zero blocks."""
    pts = _random_points(10, (20, 20), seed=1)
    off = torch.tensor(offsets)
    sig = torch.ones(10, dtype=torch.float64)
    for backend in (CPU, ops):
        with pytest.raises(RuntimeError, match="offsets must"):
            backend.knn_sigma(pts, off, 3, 0.3, 1.0)
        with pytest.raises(RuntimeError, match="offsets must"):
            backend.density_splat(pts, off, sig, 20, 20, 0, 4.0, 15, 1, False)


# -------------------------------------------------------------------------------------------------- regions


def _regions_tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scale_regions_matches_cpu(ops, case, dtype, geometry):
    features, boxes, scale, canvas = _scale_case(case, "cpu", dtype, seed=2)
    grad = torch.randn(boxes.shape[0], features.shape[1], *canvas, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with _geometry(geometry, seed=5), _ext.poisoned_outputs():
        out = ops.scale_regions(features, boxes, scale, *canvas)
        grads = ops.scale_regions_backward(grad, features, boxes, scale)
    torch.testing.assert_close(out, CPU.scale_regions(features, boxes, scale, *canvas), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    for a, b in zip(grads, CPU.scale_regions_backward(grad, features, boxes, scale)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **_regions_tol(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(out, R.scale_regions_reference(features, boxes, scale, canvas), rtol=0, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("canvas", [(14, 16), (9, 8)])
def test_unscale_regions_matches_cpu(ops, canvas, dtype, geometry):
    pred, boxes, scale, base = _unscale_case("cpu", dtype, seed=4, canvas=canvas)
    grad = torch.randn(base.shape, dtype=dtype, generator=torch.Generator().manual_seed(6))
    with _geometry(geometry, seed=2), _ext.poisoned_outputs():
        out = ops.unscale_regions(pred, boxes, scale, base)
        grads = ops.unscale_regions_backward(grad, pred, boxes, scale)
    torch.testing.assert_close(out, CPU.unscale_regions(pred, boxes, scale, base), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    for a, b in zip(grads, CPU.unscale_regions_backward(grad, pred, boxes, scale)):
        torch.testing.assert_close(a, b, **_regions_tol(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(out, R.unscale_regions_reference(pred, boxes, scale, base), rtol=0, atol=1e-12)


# forced geometries only: as launched, gradcheck's thousands of calls take 13 s, and the gradients at that
# geometry are checked against the CPU kernels' above
@pytest.mark.parametrize("geometry", GEOMETRIES[1:])
def test_regions_gradcheck(ops, geometry):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64).requires_grad_()
    boxes = torch.tensor([[0, 0, 0, 5, 6], [1, 3, 2, 6, 7], [0, 2, 3, 7, 7], [0, 4, 4, 5, 6]])
    scale = torch.tensor([1.37, 0.67, 1.73, 2.47], dtype=torch.float64, requires_grad=True)
    pred, uboxes, uscale, base = (t.clone() for t in _unscale_case("cpu", canvas=(13, 11)))
    uins = (pred[:, :2].contiguous().requires_grad_(), uscale.requires_grad_(), base[:, :2].contiguous().requires_grad_())
    with _geometry(geometry, seed=1):
        assert torch.autograd.gradcheck(lambda f, s: ops.scale_regions(f, boxes, s, 11, 12), (features, scale))
        assert torch.autograd.gradcheck(lambda p, s, b: ops.unscale_regions(p, uboxes, s, b), uins)


def test_regions_opcheck(ops):
    features, boxes, scale, canvas = _scale_case("edges", "cpu")
    torch.library.opcheck(ops.scale_regions, (features.requires_grad_(), boxes, scale.requires_grad_(), *canvas))
    grad = torch.randn(boxes.shape[0], features.shape[1], *canvas, dtype=features.dtype)
    torch.library.opcheck(ops.scale_regions_backward, (grad, features.detach(), boxes, scale.detach()))
    pred, uboxes, uscale, base = _unscale_case("cpu")
    torch.library.opcheck(ops.unscale_regions, (pred.requires_grad_(), uboxes, uscale.requires_grad_(), base.requires_grad_()))
    torch.library.opcheck(ops.unscale_regions_backward, (torch.randn_like(base), pred.detach(), uboxes, uscale.detach()))


def test_density_opcheck(ops):
    pts, off, sig, size = _splat_inputs("exact", seed=1)
    torch.library.opcheck(ops.knn_sigma, (pts, off, 3, 0.3, 2.0))
    torch.library.opcheck(ops.density_splat, (pts, off, sig, *size, 0, 4.0, 15, 2, True))


def test_regions_strided_inputs(ops):
    """channels_last features and pred, transposed gradients: the kernels read any strides."""
    features, boxes, scale, canvas = _scale_case("many", "cpu")
    grad = torch.randn(boxes.shape[0], features.shape[1], canvas[1], canvas[0], dtype=features.dtype).transpose(2, 3)
    cl = features.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.scale_regions(cl, boxes, scale, *canvas), CPU.scale_regions(features, boxes, scale, *canvas))
    for a, b in zip(ops.scale_regions_backward(grad, cl, boxes, scale), CPU.scale_regions_backward(grad.contiguous(), features, boxes, scale)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    pred, uboxes, uscale, base = _unscale_case("cpu")
    ug = torch.randn_like(base).to(memory_format=torch.channels_last)
    got = ops.unscale_regions_backward(ug, pred.to(memory_format=torch.channels_last), uboxes, uscale)
    for a, b in zip(got, CPU.unscale_regions_backward(ug.contiguous(), pred, uboxes, uscale)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_regions_empty_inputs(ops):
    features = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    boxes = torch.zeros(0, 5, dtype=torch.int64)
    scale = torch.zeros(0, dtype=torch.float64)
    with _ext.poisoned_outputs():
        assert ops.scale_regions(features, boxes, scale, 5, 5).shape == (0, 3, 5, 5)
        gf, gs = ops.scale_regions_backward(torch.zeros(0, 3, 5, 5, dtype=torch.float64), features, boxes, scale)
        assert not gf.any() and gs.shape == (0,)
        assert torch.equal(ops.unscale_regions(torch.zeros(0, 3, 5, 5, dtype=torch.float64), boxes, scale, features), features)
        gp, gs, gb = ops.unscale_regions_backward(features, torch.zeros(0, 3, 5, 5, dtype=torch.float64), boxes, scale)
        assert gp.shape == (0, 3, 5, 5) and gs.shape == (0,) and torch.equal(gb, features)
    # no channels: N * C == 0 launches nothing
    empty_c = torch.zeros(1, 0, 6, 6)
    one = torch.tensor([[0, 1, 1, 3, 3]])
    assert ops.scale_regions(empty_c, one, torch.tensor([1.5]), 4, 4).shape == (1, 0, 4, 4)
    gf, gs = ops.scale_regions_backward(torch.zeros(1, 0, 4, 4), empty_c, one, torch.tensor([1.5]))
    assert gf.shape == (1, 0, 6, 6) and torch.equal(gs, torch.zeros(1))


def _grad_scale_magnitude(op, *args):
    """Per box, the sum over its channels and pixels of |g * dO/dr|: the magnitude of the terms that
    grad_scale adds up, from the float64 reference (forward-mode derivative in r)."""
    if op == "scale":
        grad, features, boxes, scale, canvas = args
        fn = lambda s: R.scale_regions_reference(features.double(), boxes, s, canvas)  # noqa: E731
        _, d_out = torch.func.jvp(fn, (scale.double(),), (torch.ones_like(scale, dtype=torch.float64),))
        return (grad.double() * d_out).abs().sum((1, 2, 3))
    grad, pred, boxes, scale = args
    base = torch.zeros(grad.shape, dtype=torch.float64)
    fn = lambda s: R.unscale_regions_reference(pred.double(), boxes, s, base)  # noqa: E731
    _, d_out = torch.func.jvp(fn, (scale.double(),), (torch.ones_like(scale, dtype=torch.float64),))
    terms = (grad.double() * d_out).abs()
    return torch.stack([terms[b, :, y0 : y0 + h, x0 : x0 + w].sum() for b, y0, x0, h, w in boxes.tolist()])


def _grad_scale_cases():
    g = torch.Generator().manual_seed(0)
    # random features and gradients, two large boxes, 48 channels
    features = torch.randn(1, 48, 96, 96, generator=g)
    yield "scale", (torch.randn(2, 48, 170, 170, generator=g), features, torch.tensor([[0, 0, 0, 96, 96], [0, 8, 16, 64, 72]]), torch.tensor([1.7, 2.3]), (170, 170))
    # cancellation: channel pairs with opposite gradients, a result ~1e-7 of the terms' magnitude
    features = torch.randn(1, 128, 40, 40, generator=g)
    features[:, 1::2] = features[:, 0::2] * 1.0001
    grad = torch.randn(1, 128, 70, 70, generator=g)
    grad[:, 1::2] = -grad[:, 0::2]
    yield "scale", (grad, features, torch.tensor([[0, 0, 0, 40, 40]]), torch.tensor([1.75]), (70, 70))
    # a smooth map under a count loss (gradient 1 everywhere): terms of one sign, a large box
    yy, xx = torch.meshgrid(torch.arange(300.0), torch.arange(300.0), indexing="ij")
    yield "scale", (torch.ones(1, 1, 600, 600), ((yy + xx) / 10)[None, None], torch.tensor([[0, 0, 0, 300, 300]]), torch.tensor([2.0]), (600, 600))
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    ramps = torch.stack([(yy + (c % 3 + 1) * xx) / 10 for c in range(16)])[None]
    yield "unscale", (torch.ones(1, 16, 384, 384), ramps, torch.tensor([[0, 0, 0, 384, 384]]), torch.tensor([1 / 1.5]))
    # a large offset under a zero-mean gradient: the 2 r S terms cancel
    grad = torch.randn(1, 64, 120, 120, generator=g)
    grad -= grad.mean((2, 3), keepdim=True)
    yield "unscale", (grad, 1000 + torch.randn(1, 64, 200, 200, generator=g), torch.tensor([[0, 0, 0, 120, 120]]), torch.tensor([1.6]))


# float32 grad_scale of the regions backward against the float64 one of the same inputs, relative to the
# magnitude of its terms (_grad_scale_magnitude): the CUDA kernels sum the float32 products in float64, so
# only the products' rounding remains; the CPU kernels sum each row of a box in float32 first.
GRAD_SCALE_RTOL_CUDA = 1e-7
GRAD_SCALE_RTOL_CPU = 1e-6


@pytest.mark.parametrize("case", range(5))
def test_grad_scale_float32_large_boxes_many_channels(ops, case):
    """Review fix: the CUDA backward summed grad_scale in float32 (each thread's terms, the block's tree and
    the channels), the CPU in float64 past each row. Both now stay within their documented tolerance of the
    float64 result, on large boxes, many channels, cancelling terms and one-signed ones."""
    op, args = list(_grad_scale_cases())[case]
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.float32]

    def run(backend, dtype):
        cast = [a.to(dtype) if any(a is t for t in tensors) else a for a in args]
        if op == "scale":
            return backend.scale_regions_backward(*cast[:4])[1]
        return backend.unscale_regions_backward(*cast)[1]

    want = run(CPU, torch.float64)
    magnitude = _grad_scale_magnitude(op, *args)
    for backend, rtol in ((ops, GRAD_SCALE_RTOL_CUDA), (CPU, GRAD_SCALE_RTOL_CPU)):
        got = run(backend, torch.float32)
        assert got.dtype == torch.float32
        err = ((got.double() - want).abs() / magnitude).max().item()
        assert err <= rtol, (backend, err)


@pytest.mark.parametrize(
    "boxes, scale, match",
    [
        ([[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]], [1.5, 0.0], "scale"),
        ([[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]], [float("nan"), 1.0], "scale"),
        ([[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]], [-1.0, 1.0], "scale"),
        ([[0, 0, 0, 4, 4], [1, 6, 5, 5, 5]], [1.5, 1.2], "outside"),
        ([[0, 0, -1, 4, 4], [1, 5, 5, 5, 5]], [1.5, 1.2], "outside"),
        ([[0, 9, 0, 2**62, 4]], [1.5], "outside"),
        ([[0, 0, 0, 4, 4], [2, 5, 5, 5, 5]], [1.5, 1.2], "batch index"),
        ([[-1, 0, 0, 4, 4]], [1.5], "batch index"),
        ([[0, 0, 0, 0, 4]], [1.5], "empty"),
    ],
)
def test_bad_boxes_and_scale_rejected_like_the_cpu(ops, boxes, scale, match):
    """Review fix: the CUDA ops check the boxes and scale values as the CPU ops do (shared functions)."""
    features = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    pred = torch.randn(len(boxes), 3, 8, 8, dtype=torch.float64)
    b = torch.tensor(boxes, dtype=torch.int64)
    s = torch.tensor(scale, dtype=torch.float64)
    for backend in (CPU, ops):
        calls = [
            lambda: backend.scale_regions(features, b, s, 8, 8),
            lambda: backend.scale_regions_backward(pred, features, b, s),
            lambda: backend.unscale_regions(pred, b, s, features),
            lambda: backend.unscale_regions_backward(features, pred, b, s),
        ]
        for call in calls:
            with pytest.raises(RuntimeError, match=match):
                call()


# -------------------------------------------------------------------------------------------- coverage


def test_every_kernel_runs(ops):
    """Every kernel of every .cu, in each dtype it is instantiated for, is launched by these entry points."""
    before = kernel_counts()
    pts, off, sig, size = _splat_inputs("exact", seed=9)
    ops.knn_sigma(pts, off, 3, 0.3, 1.0)
    for dtype in (torch.float32, torch.float64):
        for det in (False, True):
            ops.density_splat(pts.to(dtype), off, sig, *size, 0, 4.0, 15, 1, det)
        features, boxes, scale, canvas = _scale_case("edges", "cpu", dtype)
        ops.scale_regions(features, boxes, scale, *canvas)
        ops.scale_regions_backward(torch.ones(boxes.shape[0], features.shape[1], *canvas, dtype=dtype), features, boxes, scale)
        pred, uboxes, uscale, base = _unscale_case("cpu", dtype)
        ops.unscale_regions(pred, uboxes, uscale, base)
        ops.unscale_regions_backward(base, pred, uboxes, uscale)
    after = kernel_counts()
    ran = {key for key in after if after[key] > before.get(key, 0)}
    names = {name for name, _ in ran}
    expected = {name for cu in cuda_sources() for name in _launch_sites(cu.read_text())}
    assert expected <= names, expected - names
    templated = {name for name in expected if "<" in name}
    for name in templated:  # float and double instantiations
        sigs = {sig for n, sig in ran if n == name}
        assert any("float*" in s or "float const*" in s for s in sigs) and any("double*" in s for s in sigs), (name, sigs)
