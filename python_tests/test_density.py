"""The density op (docs/definitions.md, "Density maps"; L2SM sec. 3.2) against references written from each recipe's
definition: the classic CSRNet KD-tree + gaussian_filter script, the MATLAB/SASNet fixed-kernel script,
and the windowed "exact" construction; on random points and on the real samples in ../shared/data."""
from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import scipy.spatial
import torch
from PIL import Image

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import reference as R
from conftest import require_data

STYLES = ("exact", "csrnet", "matlab")


# ------------------------------------------------------------------------------ recipes, from their definitions
def classic_csrnet_recipe(points: np.ndarray, shape) -> np.ndarray:
    """The classic recipe as CSRNet's make_dataset notebook (and many repositories) write it: rasterize the
    heads, a KD-tree for the 3 nearest, one full-image gaussian_filter per head. Points outside the image
    are dropped beforehand (docs/definitions.md), which the real ShanghaiTech annotations never need."""
    H, W = shape
    gt = np.zeros((H, W))
    for x, y in points:
        if 0 <= x < W and 0 <= y < H:
            gt[int(y), int(x)] = 1
    density = np.zeros(gt.shape, dtype=np.float32)
    gt_count = np.count_nonzero(gt)
    if gt_count == 0:
        return density
    pts = np.array(list(zip(np.nonzero(gt)[1], np.nonzero(gt)[0])))
    tree = scipy.spatial.KDTree(pts.copy(), leafsize=2048)
    distances, _ = tree.query(pts, k=4)
    for i, pt in enumerate(pts):
        pt2d = np.zeros(gt.shape, dtype=np.float32)
        pt2d[pt[1], pt[0]] = 1.0
        if gt_count > 1:
            sigma = (distances[i][1] + distances[i][2] + distances[i][3]) * 0.1
        else:
            sigma = np.average(np.array(gt.shape)) / 2.0 / 2.0
        density += scipy.ndimage.gaussian_filter(pt2d, sigma, mode="constant")
    return density


def _fspecial(shape, sigma):
    m, n = [(ss - 1.0) / 2.0 for ss in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


def matlab_recipe(points: np.ndarray, shape, f_sz=15, sigma=4.0) -> np.ndarray:
    """MCNN's get_density_map_gaussian.m as SASNet's prepare_dataset.py ports it (1-based MATLAB indices)."""
    h, w = shape
    im = np.zeros((h, w))
    for px, py in points:
        H = _fspecial((f_sz, f_sz), sigma)
        x = min(w, max(1, abs(int(np.floor(px)))))
        y = min(h, max(1, abs(int(np.floor(py)))))
        x1, y1 = x - f_sz // 2, y - f_sz // 2
        x2, y2 = x + f_sz // 2, y + f_sz // 2
        dx1 = dy1 = dx2 = dy2 = 0
        change = False
        if x1 < 1:
            dx1, x1, change = abs(x1) + 1, 1, True
        if y1 < 1:
            dy1, y1, change = abs(y1) + 1, 1, True
        if x2 > w:
            dx2, x2, change = x2 - w, w, True
        if y2 > h:
            dy2, y2, change = y2 - h, h, True
        if change:
            H = _fspecial((f_sz - dy2 - (1 + dy1) + 1, f_sz - dx2 - (1 + dx1) + 1), sigma)
        im[y1 - 1:y2, x1 - 1:x2] += H
    return im


# ------------------------------------------------------------------------------ data
def _shanghaitech(part: str, name: str):
    root = require_data("ShanghaiTech", f"part_{part}", "train_data")
    pts = scipy.io.loadmat(root / "ground-truth" / f"GT_{name}.mat")["image_info"][0, 0][0, 0]["location"]
    W, H = Image.open(root / "images" / f"{name}.jpg").size
    return np.asarray(pts, dtype=np.float64), (H, W)


def _all_real_samples():
    """(name, points, (H, W)) of every real sample: ShanghaiTech A and B, UCF_CC_50 1-10."""
    out = []
    for part in ("A", "B"):
        root = require_data("ShanghaiTech", f"part_{part}", "train_data")
        for mat in sorted(glob.glob(str(root / "ground-truth" / "*.mat"))):
            name = os.path.basename(mat)[3:-4]
            pts, size = _shanghaitech(part, name)
            out.append((f"SH{part}/{name}", pts, size))
    ucf = require_data("UCF_CC_50")
    for mat in sorted(glob.glob(str(ucf / "*_ann.mat"))):
        stem = os.path.basename(mat)[:-8]
        W, H = Image.open(ucf / f"{stem}.jpg").size
        out.append((f"UCF/{stem}", np.asarray(scipy.io.loadmat(mat)["annPoints"], dtype=np.float64), (H, W)))
    return out


def _random_points(n, size, seed, dtype=torch.float64, outside=0):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    pts = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    if outside:
        far = torch.rand(outside, 2, generator=g, dtype=torch.float64) * torch.tensor([3 * W, 3 * H]) - torch.tensor([W, H])
        pts = torch.cat([pts, far])
    return pts.to(dtype)


def _clustered_points(n, size, seed):
    """Dense clusters plus sparse background, duplicates included: what crowds look like."""
    g = np.random.default_rng(seed)
    H, W = size
    centres = g.uniform([0, 0], [W, H], size=(4, 2))
    pts = np.concatenate([c + g.normal(0, 2.0, size=(n // 5, 2)) for c in centres] + [g.uniform([0, 0], [W, H], size=(n - 4 * (n // 5), 2))])
    pts = np.clip(pts, 0, [W - 1e-6, H - 1e-6])
    pts[:3] = pts[3]  # coincident heads
    return torch.from_numpy(pts)


# ------------------------------------------------------------------------------ knn_sigma
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 300])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_sigma_matches_brute_force(device, n, k):
    pts = _random_points(n, (40, 70), seed=n * 10 + k)
    got = ck.knn_sigma(pts.to(device), k=k, beta=0.3)
    want = R.knn_sigma_reference(pts, k=k, beta=0.3)
    assert got.dtype == torch.float64 and got.shape == (n,) and got.device.type == device.type
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if n == 1:
        assert torch.isnan(got).all(), "a lone point has no neighbour: sigma undefined (NaN) unless `lone` is given"


@pytest.mark.parametrize("layout", ["clustered", "collinear", "coincident", "integer_grid"])
def test_knn_sigma_degenerate_layouts(device, layout):
    if layout == "clustered":
        pts = _clustered_points(500, (120, 160), seed=3)
    elif layout == "collinear":
        pts = torch.stack([torch.linspace(0, 99, 80, dtype=torch.float64), torch.full((80,), 5.0, dtype=torch.float64)], 1)
    elif layout == "coincident":
        pts = torch.full((20, 2), 7.5, dtype=torch.float64)
    else:  # ties: every point has 4 neighbours at exactly distance 1
        yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(9.0), indexing="ij")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1).double()
    got = ck.knn_sigma(pts.to(device), k=3)
    torch.testing.assert_close(got.cpu(), R.knn_sigma_reference(pts, 3), rtol=1e-12, atol=1e-12)


def test_knn_sigma_real_annotations_against_kdtree():
    """An independent oracle on real layouts: scipy's cKDTree, on every real sample."""
    for name, pts, _ in _all_real_samples():
        d, _ = scipy.spatial.cKDTree(pts).query(pts, k=4)
        want = 0.3 * d[:, 1:].mean(axis=1)
        got = ck.knn_sigma(torch.from_numpy(pts)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=name)


def test_knn_sigma_dtypes_and_lone():
    pts = torch.tensor([[1, 2], [4, 6], [10, 2]], dtype=torch.int64)
    s = ck.knn_sigma(pts, k=1, beta=1.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([5.0, 5.0, math.sqrt(52.0)]))  # (10,2) is nearest to (4,6)
    assert ck.knn_sigma(pts.float()[:1], lone=2.5).item() == 2.5


# ------------------------------------------------------------------------------ styles against references
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stride", [1, 2, 3, 8])
def test_density_matches_reference_random(device, style, stride):
    size = (37, 53)
    pts = _random_points(120, size, seed=stride + 7 * STYLES.index(style), outside=10)
    pts[:4] = pts[4]  # duplicates
    pts[5] = torch.tensor([0.0, 0.0])  # corners and edges
    pts[6] = torch.tensor([52.999, 36.999])
    got = ck.density_map(pts.to(device), size, style=style, stride=stride)
    want = R.density_map_reference(pts, size, style=style, stride=stride)
    assert got.dtype == torch.float64 and got.shape == want.shape == (math.ceil(37 / stride), math.ceil(53 / stride))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
def test_density_fixed_and_per_point_sigma(device, style):
    size = (50, 41)
    pts = _random_points(60, size, seed=11)
    sig = torch.rand(60, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 6 + 0.2
    for sigma in (2.5, sig):
        got = ck.density_map(pts.to(device), size, style=style, sigma=sigma if isinstance(sigma, float) else sigma.to(device))
        want = R.density_map_reference(pts, size, style=style, sigma=sigma)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


def test_exact_style_every_point_sums_to_one():
    """The "exact" promise: each in-image point contributes 1, wherever it is, whatever its sigma."""
    size = (33, 47)
    pts = _random_points(200, size, seed=2, outside=25)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for sigma in ("adaptive", 0.3, 9.0, 40.0):
            d = ck.density_map(pts.to(dtype), size, sigma=sigma)
            inside = int(((pts[:, 0] >= 0) & (pts[:, 0] < 47) & (pts[:, 1] >= 0) & (pts[:, 1] < 33)).sum())
            assert abs(d.double().sum().item() - inside) <= tol * inside, (dtype, sigma)
            assert bool((d >= 0).all())
    # one point at a time: each one sums to 1 on its own
    for p in pts[:30]:
        if 0 <= p[0] < 47 and 0 <= p[1] < 33:
            assert abs(ck.density_map(p[None], size, sigma=3.0).sum().item() - 1) < 1e-12


def test_exact_style_on_real_samples():
    for name, pts, size in _all_real_samples():
        t = torch.from_numpy(pts)
        d = ck.density_map(t, size)
        inside = int(((t[:, 0] >= 0) & (t[:, 0] < size[1]) & (t[:, 1] >= 0) & (t[:, 1] < size[0])).sum())
        assert d.dtype == torch.float64
        assert abs(d.sum().item() - inside) <= 1e-5 * inside, name
        if name.startswith("UCF/1") and name == "UCF/1":
            assert inside == len(pts) - 2  # two heads at x = 984.26 in a 984-wide image
        if name == "UCF/6":
            assert inside == len(pts) - 1  # one head at x = -358.7


@pytest.mark.parametrize("style", STYLES)
def test_density_on_real_samples_matches_windowed_reference(style):
    # a third of the samples (the windowed reference is a Python loop over heads), always including the
    # densest image of each set and the two UCF_CC_50 images with out-of-image points
    samples = _all_real_samples()
    keep = {"SHA/IMG_299", "SHB/IMG_300", "UCF/1", "UCF/6"}
    for i, (name, pts, size) in enumerate(samples):
        if i % 3 and name not in keep:
            continue
        got = ck.density_map(torch.from_numpy(pts), size, style=style)
        want = R.density_map_reference(torch.from_numpy(pts), size, style=style)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("part,name", [("B", "IMG_158"), ("B", "IMG_93"), ("A", "IMG_275")])
def test_csrnet_style_equals_classic_recipe_on_real_annotations(part, name):
    """The promise of style="csrnet": the classic script's output, to 1e-6 max abs per pixel, including
    its pixel placement, duplicate collapse and border loss (float32 maps, like the script's)."""
    pts, size = _shanghaitech(part, name)
    want = classic_csrnet_recipe(pts, size)
    got = ck.density_map(torch.from_numpy(pts).float(), size, style="csrnet")
    assert got.dtype == torch.float32
    assert np.abs(got.numpy() - want).max() <= 1e-6
    assert got.sum().item() < len(pts)  # mass past the border is lost, as in the script


def test_csrnet_style_equals_classic_recipe_random_with_duplicates_and_lone_point():
    size = (45, 60)
    pts = _random_points(80, size, seed=4).numpy()
    pts[10:14] = pts[9] + 0.3  # the same pixel: collapses into one head
    for sub in (pts, pts[:1], pts[:4]):
        want = classic_csrnet_recipe(sub, size)
        got = ck.density_map(torch.from_numpy(sub).float(), size, style="csrnet")
        assert np.abs(got.numpy() - want).max() <= 1e-6


@pytest.mark.parametrize("n", [2, 3])
def test_csrnet_two_or_three_points_finite_where_classic_recipe_crashes(n):
    size = (30, 40)
    pts = np.array([[5.5, 5.5], [20.2, 9.1], [33.0, 25.0]])[:n]
    with pytest.raises(Exception):  # KDTree pads with inf distances: sigma = inf
        classic_csrnet_recipe(pts, size)
    got = ck.density_map(torch.from_numpy(pts), size, style="csrnet")
    assert torch.isfinite(got).all() and 0 < got.sum().item() <= n
    want = R.density_map_reference(torch.from_numpy(pts), size, style="csrnet")  # beta * mean of the neighbours there are
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_matlab_style_equals_recipe():
    """Random points including borders, negatives and points past the image (|floor|, clip rule)."""
    size = (40, 31)
    pts = _random_points(150, size, seed=9, outside=30).numpy()
    pts[:5] = [[0.2, 0.7], [30.9, 39.99], [-3.5, 12.0], [15.0, -0.4], [1.0, 1.0]]
    for f_sz, sigma in ((15, 4.0), (7, 1.5), (31, 2.0), (9, 20.0)):
        want = matlab_recipe(pts, size, f_sz=f_sz, sigma=sigma)
        got = ck.density_map(torch.from_numpy(pts), size, style="matlab", kernel_size=f_sz,
                             sigma=sigma if (f_sz, sigma) != (15, 4.0) else "adaptive")
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
        assert abs(got.sum().item() - len(pts)) < 1e-9  # no point is dropped, each sums to 1


def test_matlab_style_real_samples_keep_every_point():
    name, pts, size = next(s for s in _all_real_samples() if s[0] == "UCF/6")
    want = matlab_recipe(pts, size)
    got = ck.density_map(torch.from_numpy(pts).float(), size, style="matlab")
    assert np.abs(got.numpy() - want).max() <= 1e-6
    assert abs(got.double().sum().item() - len(pts)) < 1e-2


# ------------------------------------------------------------------------------ batching, stride, dtypes, threads
@pytest.mark.parametrize("style", STYLES)
def test_batched_equals_single(device, style):
    size = (29, 44)
    plist = [_random_points(n, size, seed=n, outside=3).to(device) for n in (17, 0, 1, 60, 2)]
    sig_list = [torch.rand(p.shape[0], dtype=torch.float64, device=device) * 3 + 0.5 for p in plist]
    for sigma, per_image in (("adaptive", ["adaptive"] * 5), (sig_list, sig_list)):
        batch = ck.density_maps(plist, size, style=style, stride=2, sigma=sigma)
        assert batch.shape == (5, 1, 15, 22)
        for i, p in enumerate(plist):
            one = ck.density_map(p, size, style=style, stride=2, sigma=per_image[i])
            assert torch.equal(batch[i, 0], one)


def test_stride_keeps_the_count_and_equals_sum_pooling():
    size = (50, 77)
    pts = _random_points(90, size, seed=21)
    full = ck.density_map(pts, size)
    for s in (2, 4, 8, 16):
        d = ck.density_map(pts, size, stride=s)
        assert d.shape == (math.ceil(50 / s), math.ceil(77 / s))
        torch.testing.assert_close(d, R.sum_pool_reference(full, s), rtol=0, atol=1e-12)
        assert abs(d.sum().item() - 90) < 1e-9


def test_dtypes_devices_and_empty():
    size = (20, 25)
    for dt, out in ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.int64, torch.float32), (torch.int32, torch.float32)):
        d = ck.density_map(torch.tensor([[3, 4], [10, 12]], dtype=dt), size)
        assert d.dtype == out and d.device.type == "cpu"
    assert torch.equal(ck.density_map(torch.zeros(0, 2), size), torch.zeros(size))
    assert torch.equal(ck.density_map(torch.empty(0), size, style="csrnet"), torch.zeros(size))
    assert torch.equal(ck.density_map(torch.tensor([[-1.0, 3.0], [25.0, 3.0], [3.0, 20.0]]), size), torch.zeros(size))
    assert ck.density_maps([], size).shape == (0, 1, 20, 25)
    assert ck.density_maps([torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.float64)], size).dtype == torch.float64


@pytest.mark.parametrize("style", STYLES)
def test_cpu_output_is_thread_count_invariant(style):
    size = (300, 257)
    pts = _clustered_points(2000, size, seed=1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ck.density_maps([pts, pts[:500]], size, style=style)
        torch.set_num_threads(max(2, old))
        many = ck.density_maps([pts, pts[:500]], size, style=style)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


@pytest.mark.parametrize("style", STYLES)
def test_poisoned_outputs_are_fully_written(device, style):
    size = (31, 40)
    pts = _random_points(50, size, seed=8)
    with _ext.poisoned_outputs():
        got = ck.density_maps([pts.to(device), pts[:0].to(device)], size, style=style, stride=3, deterministic=True)
        sig = ck.knn_sigma(pts.to(device))
    assert torch.isfinite(got).all() and torch.isfinite(sig).all()
    torch.testing.assert_close(got[0, 0].cpu(), R.density_map_reference(pts, size, style=style, stride=3), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("style", STYLES)
def test_cuda_matches_cpu_and_deterministic_mode_is_bit_reproducible(style):
    size = (400, 523)
    plist = [_clustered_points(n, size, seed=n) for n in (3000, 1, 0, 250)]
    cpu = ck.density_maps(plist, size, style=style)
    gpu = ck.density_maps([p.cuda() for p in plist], size, style=style)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    a = ck.density_maps([p.float().cuda() for p in plist], size, style=style, deterministic=True)
    b = ck.density_maps([p.float().cuda() for p in plist], size, style=style, deterministic=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.cpu(), cpu.float(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ density_prepare
def _prepare_inputs(seed, dtype):
    """Three images' points with duplicates (same pixel, and exactly coincident), points on and past the
    borders, and an empty image."""
    size = (23, 31)
    parts = []
    for j, n in enumerate((60, 0, 45)):
        p = _random_points(n, size, seed=seed + j, outside=7 if n else 0)
        if n:
            p[:5] = p[5]  # coincident
            p[10:14] = torch.floor(p[14]) + torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))  # same pixel
            p[20] = torch.tensor([0.0, 0.0], dtype=torch.float64)
            p[21] = torch.tensor([size[1] - 1e-3, size[0] - 1e-3], dtype=torch.float64)
            p[22] = torch.tensor([float(size[1]), 3.0], dtype=torch.float64)  # x == W: outside
        parts.append(p)
    offsets = torch.tensor([0] + np.cumsum([len(p) for p in parts]).tolist())
    return torch.cat(parts).to(dtype), offsets, size


@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("style", ["exact", "csrnet"])
def test_adaptive_op_is_the_three_ops_in_a_row(style, dtype):
    # density_maps' CPU fast path (one density_adaptive call) must give the bits of prepare -> kNN -> splat,
    # which the rest of this file checks against the references: ragged images, an empty one, points
    # outside the image, duplicates, integer-valued points.
    size, code = (53, 71), {"exact": 0, "csrnet": 1}[style]
    plist = [_clustered_points(300, size, seed=4), _random_points(0, size, seed=0), _random_points(2, size, seed=5),
             _random_points(90, size, seed=6) * 1.1 - 2]
    plist[0][7] = plist[0][3]
    plist[2] = plist[2].floor()
    pts = torch.cat(plist).to(dtype)
    offsets = torch.tensor([0, 300, 300, 302, 392])
    with _ext.poisoned_outputs():
        got = torch.ops.crowdkernels.density_adaptive(pts, [300, 0, 2, 90], *size, code, 3, 0.3, 31.0, 4.0, 15, 2)
        kept, koff, _ = torch.ops.crowdkernels.density_prepare(pts, offsets, *size, code)
        sig = torch.ops.crowdkernels.knn_sigma(kept, koff, 3, 0.3, 31.0)
        want = torch.ops.crowdkernels.density_splat(kept, koff, sig, *size, code, 4.0, 15, 2, False)
    assert got.dtype == dtype and got.shape == (4, 1, 27, 36)
    assert torch.equal(got[:, 0], want) and torch.isfinite(got).all()
    # and density_maps takes it
    assert torch.equal(ck.density_maps([p.to(dtype) for p in plist], size, style=style, stride=2), got)
    with pytest.raises(RuntimeError, match="style must be 0"):
        torch.ops.crowdkernels.density_adaptive(pts, [300, 0, 2, 90], *size, 2, 3, 0.3, 31.0, 4.0, 15, 2)
    with pytest.raises(RuntimeError, match=r"counts must add up to the number of points \(392\), got 391"):
        torch.ops.crowdkernels.density_adaptive(pts, [300, 0, 2, 89], *size, code, 3, 0.3, 31.0, 4.0, 15, 2)
    with pytest.raises(ValueError, match="counts must be >= 0, got -2 for image 1"):
        torch.ops.crowdkernels.density_adaptive(pts, [300, -2, 4, 90], *size, code, 3, 0.3, 31.0, 4.0, 15, 2)


@pytest.mark.parametrize("style,sigma", [("csrnet", "adaptive"), ("exact", "adaptive"), ("exact", 2.0),
                                         ("matlab", "adaptive")])
def test_non_finite_points_name_the_image_and_row(style, sigma):
    # the fused CPU pipeline checks in C++, the other paths in Python: the same ValueError either way
    good, bad = _random_points(5, (12, 12), seed=1), _random_points(6, (12, 12), seed=2)
    bad[4, 1], bad[5, 0] = float("nan"), float("inf")
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match=r"points_list\[1\] must be finite, got \[[0-9.]+, nan\] at row 4 "
                                             r"\(2 non-finite rows\)"):
            ck.density_maps([good.to(dtype), bad.to(dtype)], (12, 12), style=style, sigma=sigma)


@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("style", STYLES)
def test_prepare_matches_reference_and_vectorized(style, dtype):
    from crowdkernels.ops import density as D

    code = STYLES.index(style)
    for seed in (1, 2, 3):
        pts, offsets, (H, W) = _prepare_inputs(seed, dtype)
        want = R.density_prepare_reference(pts, offsets, H, W, code)
        with _ext.poisoned_outputs():
            got = torch.ops.crowdkernels.density_prepare(pts, offsets, H, W, code)
        vec = D._prepare_vectorized(pts, offsets, H, W, style)
        for g, v, w in zip(got, vec, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
            assert v.dtype == w.dtype and torch.equal(v, w)
        if style == "csrnet":  # at most one point per pixel per image, all integral
            assert torch.equal(got[0], torch.floor(got[0])) and len(got[0]) < len(pts) - 10


# ------------------------------------------------------------------------------ CPU output pool
@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
def test_cpu_output_pool_reuses_memory_and_keeps_live_maps_intact():
    size = (600, 800)  # 1.9 MB float32 maps: pooled (>= 1 MiB)
    pts = _random_points(300, size, seed=4).float()
    ck.empty_cache()
    first = ck.density_map(pts, size)
    want = first.clone()
    ptr = first.data_ptr()
    view = first.numpy()  # a NumPy view keeps the memory alive: it must not be handed out again
    del first
    info = ck.cpu_cache_info()
    assert info["cached_bytes"] == 0
    second = ck.density_map(pts, size)
    assert second.data_ptr() != ptr and np.array_equal(view, want.numpy())
    del view, second  # both buffers go back to the pool
    assert ck.cpu_cache_info()["cached_bytes"] >= 2 * 600 * 800 * 4
    hits = ck.cpu_cache_info()["hits"]
    third = ck.density_map(pts, size)
    assert ck.cpu_cache_info()["hits"] == hits + 1  # reused, already mapped
    assert torch.equal(third, want)  # stale contents never leak into a new map
    with _ext.poisoned_outputs():  # pooled buffers are poisoned like any other output
        del third
        assert torch.equal(ck.density_map(pts, size), want)
    # a bounded cache: the limit frees the excess at once, 0 turns the pool off
    old = ck.cpu_cache_info()["limit_bytes"]
    try:
        ck.set_cpu_cache_limit(0)
        assert ck.cpu_cache_info()["cached_bytes"] == 0
        m = ck.density_map(pts, size)
        del m
        assert ck.cpu_cache_info()["cached_bytes"] == 0
    finally:
        ck.set_cpu_cache_limit(old)
    with pytest.raises(ValueError, match="nbytes"):
        ck.set_cpu_cache_limit(-1)
    ck.empty_cache()
    assert ck.cpu_cache_info()["cached_bytes"] == 0


@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
def test_cpu_output_pool_in_forked_workers():
    """DataLoader workers fork: each starts with an empty pool of its own and still computes maps."""
    size = (600, 800)
    pts = _random_points(200, size, seed=5).float()
    want = ck.density_map(pts, size).sum().item()
    ds = [pts] * 4
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         collate_fn=lambda p: ck.density_map(p, size).sum(),
                                         multiprocessing_context="fork")
    assert [round(float(v), 3) for v in loader] == [round(want, 3)] * 4


# ------------------------------------------------------------------------------ registration
@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
def test_opcheck(device):
    pts = _random_points(40, (20, 30), seed=1).to(device)
    offsets = torch.tensor([0, 25, 25, 40], device=device)
    torch.library.opcheck(torch.ops.crowdkernels.knn_sigma.default, (pts, offsets, 3, 0.3, 1.5))
    if device == "cpu":  # density_prepare has a C++ CPU kernel; other devices run tensor ops
        for style in (0, 1, 2):
            torch.library.opcheck(torch.ops.crowdkernels.density_prepare.default, (pts * 1.2, offsets, 20, 30, style))
        for style in (0, 1):  # the CPU-only fused adaptive pipeline
            torch.library.opcheck(torch.ops.crowdkernels.density_adaptive.default,
                                  (pts * 1.2, [25, 0, 15], 20, 30, style, 3, 0.3, 6.0, 4.0, 15, 2))
    sig = torch.rand(40, dtype=torch.float64, device=device) + 0.5
    for style in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.crowdkernels.density_splat.default, (pts, offsets, sig, 20, 30, style, 4.0, 15, 2, True)
        )


@pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")
def test_torch_compile():
    def f(pts, offsets, sig):
        return torch.ops.crowdkernels.density_splat(pts, offsets, sig, 24, 32, 0, 4.0, 15, 1, False) * 2

    pts = _random_points(30, (24, 32), seed=3)
    offsets = torch.tensor([0, 30])
    sig = torch.full((30,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(pts, offsets, sig), f(pts, offsets, sig))


# ------------------------------------------------------------------------------ bad input
def _pts():
    return torch.tensor([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(points=torch.tensor([[float("nan"), 1.0]])), ValueError, "points"),
        (dict(points=torch.tensor([[1.0, float("inf")]])), ValueError, "points"),
        (dict(points=torch.zeros(3, 3)), ValueError, "points"),
        (dict(points=torch.zeros(3)), ValueError, "points"),
        (dict(points=torch.zeros(2, 2, dtype=torch.bool)), TypeError, "points"),
        (dict(points="nope"), TypeError, "points"),
        (dict(size=(0, 10)), ValueError, "size"),
        (dict(size=(10, -3)), ValueError, "size"),
        (dict(size=(10.5, 3)), TypeError, "size"),
        (dict(size=10), TypeError, "size"),
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
        (dict(sigma="wide"), ValueError, "sigma"),
        (dict(sigma=torch.tensor([1.0])), ValueError, "sigma"),
        (dict(sigma=torch.tensor([1.0, 0.0])), ValueError, "sigma"),
        (dict(sigma=torch.tensor([1.0, -2.0])), ValueError, "sigma"),
        (dict(sigma=None), TypeError, "sigma"),
        (dict(k=0), ValueError, "k"),
        (dict(k=65), ValueError, "k"),
        (dict(k=2.0), TypeError, "k"),
        (dict(beta=0), ValueError, "beta"),
        (dict(truncate=-1.0), ValueError, "truncate"),
        (dict(style="gaussian"), ValueError, "style"),
        (dict(stride=0), ValueError, "stride"),
        (dict(stride=1.5), TypeError, "stride"),
        (dict(style="matlab", kernel_size=14), ValueError, "kernel_size"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(deterministic="yes"), TypeError, "deterministic"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, exc, match):
    args = dict(points=_pts(), size=(10, 12))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ck.density_map(args.pop("points"), args.pop("size"), **args)


def test_bad_input_batched_and_knn():
    with pytest.raises(TypeError, match="points_list"):
        ck.density_maps(_pts(), (10, 10))
    with pytest.raises(ValueError, match=r"points_list\[1\]"):
        ck.density_maps([_pts(), torch.zeros(2, 3)], (10, 10))
    with pytest.raises(ValueError, match=r"sigma\[0\]"):
        ck.density_maps([_pts(), _pts()], (10, 10), sigma=[torch.ones(3), torch.ones(2)])
    with pytest.raises(ValueError, match="k"):
        ck.knn_sigma(_pts(), k=0)
    with pytest.raises(ValueError, match="points"):
        ck.knn_sigma(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="beta"):
        ck.knn_sigma(_pts(), beta=-0.3)


# ------------------------------------------------------------------------------ extreme but valid inputs (review)
from guards import bounded, run_isolated  # noqa: E402


def _knn_hypot(pts: np.ndarray, k: int = 3, beta: float = 0.3) -> np.ndarray:
    """Brute-force sigmas with math.hypot distances: no under- or overflow at any scale."""
    n = len(pts)
    kk = min(k, n - 1)
    out = np.empty(n)
    for i in range(n):
        d = sorted(math.hypot(pts[j, 0] - pts[i, 0], pts[j, 1] - pts[i, 1]) for j in range(n) if j != i)[:kk]
        out[i] = beta * math.fsum(d) / kk
    return out


def test_knn_sigma_elongated_bounding_boxes_do_not_crash():
    """Regression: the grid size of a thin box was cast to int64 before its capacity check (a segfault on
    the CPU, a saturated cast on the GPU). In a subprocess: before the fix it crashed the interpreter."""
    out = run_isolated("""
        cases = [
            [[0, 0], [1000, 1e-35], [500, 0]],                       # the review's example
            [[0, 0], [1e15, 1e-300], [5e14, 0], [1, 1]],
            [[1e-300, 0], [0, 1e15], [0, 5e14]],
            [[x, 1e-300 * (x % 3)] for x in range(3000)],           # thousands of heads on a thin line
        ]
        for pts in cases:
            print(repr(ck.knn_sigma(torch.tensor(pts, dtype=torch.float64)).tolist()))
    """)
    lines = out.strip().splitlines()
    want0 = [225.0, 225.0, 150.0]
    assert eval(lines[0]) == want0
    for line, pts in zip(lines[1:3], ([[0, 0], [1e15, 1e-300], [5e14, 0], [1, 1]], [[1e-300, 0], [0, 1e15], [0, 5e14]])):
        np.testing.assert_allclose(eval(line), _knn_hypot(np.array(pts, dtype=np.float64)), rtol=1e-13)
    line3 = np.array(eval(lines[3]))
    assert line3.shape == (3000,) and np.isfinite(line3).all()
    assert line3[0] == pytest.approx(0.3 * 2, rel=1e-12) and line3[1500] == pytest.approx(0.3 * 4 / 3, rel=1e-12)


def _extreme_knn_layouts():
    """Point sets whose distances lie beyond the range of their squares, at offsets 0, 1 and 1e15."""
    out = []
    for scale in (1e-300, 1e-200, 1e-160, 5e-324, 1e155, 1e200, 1e300):
        g = np.random.default_rng(int(-math.log10(scale)) + 400)
        for offset in (0.0, 1.0, 1e15):
            base = g.integers(0, 40, size=(30, 2)).astype(np.float64)
            base[3] = base[4]  # a duplicate
            pts = base * scale + offset
            if offset and scale < 1e-15:  # offset + tiny == offset: duplicates, and one far point
                pts = np.concatenate([pts, [[0.0, 0.0]]])
            if np.isfinite(pts).all():
                out.append(pts)
    return out


def test_knn_sigma_distances_beyond_the_range_of_their_squares():
    """Regression: distances below ~1.5e-154 (squares underflow) came out 0 or imprecise, above ~1.3e154
    (squares overflow) inf. Now exact to rounding, against math.hypot, at any offset. In a subprocess:
    some of these layouts made the old grid loop for ever."""
    layouts = _extreme_knn_layouts()
    out = run_isolated(f"""
        for pts in {[p.tolist() for p in layouts]!r}:
            print(repr(ck.knn_sigma(torch.tensor(pts, dtype=torch.float64)).tolist()))
    """, timeout=300)
    for pts, line in zip(layouts, out.strip().splitlines(), strict=True):
        want = _knn_hypot(pts)
        np.testing.assert_allclose(eval(line), want, rtol=1e-13, atol=1e-323)
        torch.testing.assert_close(R.knn_sigma_reference(torch.from_numpy(pts)), torch.from_numpy(want),
                                   rtol=1e-13, atol=1e-323)
    # distances past DBL_MAX itself (coordinates near +-1.7e308), whose sigma 0.3 d still fits
    far = [[-1e308, 0.0], [1e308, 0.0], [1e308, 1e308], [-1.7e308, -1.7e308]]
    got = ck.knn_sigma(torch.tensor(far, dtype=torch.float64), k=1).tolist()
    want = [0.6 * min(math.hypot(a[0] / 2 - b[0] / 2, a[1] / 2 - b[1] / 2) for b in far if b is not a) for a in far]
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_knn_sigma_overflowing_beta_raises_naming_beta():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        ck.knn_sigma(pts, beta=1e308)
    with pytest.raises(ValueError, match="beta.*float32"):
        ck.knn_sigma(pts.float(), beta=1e38)
    assert torch.isfinite(ck.knn_sigma(pts, beta=1e307)).all()
    assert ck.knn_sigma(pts[:1], beta=1e308, lone=float("inf")).item() == float("inf")  # lone is the caller's


def _normalizer_fsum(sigma: float, radius: int) -> float:
    a = 0.5 / (sigma * sigma)
    d = np.arange(1, radius + 1, dtype=np.float64)
    return 1.0 + 2.0 * math.fsum(np.exp(-a * d * d).tolist())


def test_csrnet_huge_sigma_is_bounded_and_loses_the_mass():
    """Regression: the csrnet window radius was cast unclamped to int64: sigma = 1e19 summed 8192 for two
    heads (should be ~1e-35: scipy normalizes over the whole window, whose mass is almost all past the
    border), and sigma = 1e12 ran 4e12 serial steps. In a subprocess with a deadline."""
    out = run_isolated("""
        pts = torch.tensor([[10.5, 20.5], [30.0, 40.0]], dtype=torch.float64)
        for s in (1e19, 1e12, 1e9, 1e300):
            m = ck.density_map(pts, (64, 64), sigma=s, style="csrnet")
            print(repr([s, m.sum().item(), m.max().item(), m.min().item()]))
    """, timeout=120)
    for line in out.strip().splitlines():
        s, total, hi, lo = eval(line)
        # flat to double precision: each pixel is 1 / N^2, N = sigma sqrt(2 pi) erf(4 / sqrt 2) (+ O(1))
        n = s * math.sqrt(2 * math.pi) * math.erf((math.floor(4 * s + 0.5) + 0.5) / (s * math.sqrt(2)))
        want = 2 * 64 * 64 / (n * n)
        assert total == pytest.approx(want, rel=1e-9), s
        assert hi == pytest.approx(2 / (n * n), rel=1e-9) and lo == pytest.approx(2 / (n * n), rel=1e-9)


@pytest.mark.parametrize("sigma,truncate", [(16500.0, 4.0), (9000.0, 8.0), (31000.5, 4.0), (31000.0, 8.0),
                                            (2000.0, 40.0), (60000.0, 1.5), (4e5, 0.2), (16384.0, 4.0),
                                            (1700.0, 0.01), (1700.0, 4.0), (3.3, 5e4), (1024.0, 4.0), (107.0, 38.5)])
def test_csrnet_closed_form_normalizer_against_term_by_term_sums(sigma, truncate):
    """Past 4096 terms a side the kernels take scipy's normalizer N in closed form (Euler-Maclaurin); a
    lone point on a 1 x 1 image is 1 / N^2, so N is read back and checked against an exactly rounded sum
    of every term (up to 1.2e5 of them). Below, the term-by-term recurrence the kernels always used
    (relative error ~2 ulp a step), and (3.3, 5e4) a window far wider than the Gaussian's reach."""
    radius = math.floor(truncate * sigma + 0.5)
    pts = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    got = ck.density_map(pts, (1, 1), sigma=sigma, truncate=truncate, style="csrnet")
    n = 1.0 / math.sqrt(got.item())
    reach = math.ceil(math.sqrt(746.0 * 2 * sigma * sigma))
    closed_form = min(radius, reach) > 4096
    assert n == pytest.approx(_normalizer_fsum(sigma, min(radius, reach)), rel=1e-14 if closed_form else 1e-12)
    ref = R.density_map_reference(pts, (1, 1), sigma=sigma, truncate=truncate, style="csrnet")
    torch.testing.assert_close(got, ref, rtol=1e-13 if closed_form else 1e-11, atol=0)


@pytest.mark.parametrize("sigma", [1800.0, 2600.0])
def test_csrnet_wide_windows_equal_scipy_gaussian_filter(sigma):
    """The closed-form normalizer against scipy itself: gaussian_filter of one head with a 16001-tap
    window (mode='constant', truncate=4) on a small image."""
    size = (20, 23)
    pts = np.array([[3.7, 5.2], [22.9, 19.99]])
    want = np.zeros(size)
    for x, y in pts:
        img = np.zeros(size)
        img[int(y), int(x)] = 1.0
        want += scipy.ndimage.gaussian_filter(img, sigma, mode="constant", truncate=4.0)
    got = ck.density_map(torch.from_numpy(pts), size, sigma=sigma, style="csrnet")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)


def test_reference_fallbacks_extreme_sigma_bounded_and_defined():
    """Regression: the reference csrnet path allocated 2R + 1 weights (60 GiB for sigma 1e9) and a tiny
    sigma raised ZeroDivisionError. Under a 1 GiB address-space budget now, and equal to the kernels."""
    out = run_isolated("""
        from crowdkernels.ops import reference as R
        pts = torch.tensor([[10.5, 20.5], [30.0, 40.0], [63.9, 0.0]], dtype=torch.float64)
        for style in ("exact", "csrnet", "matlab"):
            for s in (1e9, 1e19, 1e300, 1e-200, 1e-320, 5e-324):
                ref = R.density_map_reference(pts, (64, 64), sigma=s, style=style)
                got = ck.density_map(pts, (64, 64), sigma=s, style=style)
                err = (ref - got).abs().max().item()
                print(repr([style, s, err, ref.sum().item(), bool(torch.isfinite(ref).all())]))
    """, mem_bytes=1 << 30)
    for line in out.strip().splitlines():
        style, s, err, total, finite = eval(line)
        assert finite and err <= 1e-15, (style, s, err)
        if style != "csrnet" or s < 1:
            assert total == pytest.approx(3.0, rel=1e-12), (style, s)  # tiny: impulses; exact/matlab: kept


@pytest.mark.parametrize("sigma", [1e-3, 1e-30, 1e-200, 5e-324])
def test_matlab_tiny_sigma_keeps_every_point_at_the_border(sigma):
    """Regression: an even, border-clipped matlab window centres its kernel on a half pixel, where
    exp(-(1/4) / (2 sigma^2)) underflows for sigma < ~0.03: the point summed to 0. Now the limit: the 1,
    2 or 4 pixels nearest the kernel's centre share it equally."""
    size = (30, 40)
    # (0.2, 0.7): window rows 0..7 x cols 0..7, centre (3.5, 3.5): 4 pixels of 1/4; (0.2, 15.5): cols
    # 0..7, rows 7..21: 2 of 1/2; (39.5, 12.0): cols 31..39, rows 4..18, odd: 1 pixel; (15.5, 15.5): inside
    pts = torch.tensor([[0.2, 0.7], [0.2, 15.5], [39.5, 12.0], [15.5, 15.5]], dtype=torch.float64)
    got = ck.density_map(pts, size, style="matlab", sigma=sigma)
    assert got.sum().item() == pytest.approx(4.0, rel=1e-12)
    # float32 maps: the weight tables were scale * gy (1e108 here: inf in float32) times gx (1e-109: 0), NaN
    got32 = ck.density_map(pts.float(), size, style="matlab", sigma=sigma)
    torch.testing.assert_close(got32, got.float(), rtol=0, atol=1e-7)
    want = np.zeros(size)
    want[3:5, 3:5] = 0.25
    want[14, 3:5] = 0.5
    want[11, 35] = 1.0
    want[14, 14] = 1.0
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-15)
    ref = R.density_map_reference(pts, size, style="matlab", sigma=sigma).numpy()
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-15)


def test_raw_splat_op_rejects_negative_sigma():
    """The C++ check behind the Python layer: a negative sigma reached the CPU weights as a negative table
    size (std::length_error inside an OpenMP region: the process aborted). In a subprocess."""
    out = run_isolated("""
        pts = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
        for s in (-1.0, float("nan")):
            try:
                torch.ops.crowdkernels.density_splat(pts, torch.tensor([0, 1]), torch.tensor([s], dtype=torch.float64),
                                                     8, 8, 0, 4.0, 15, 1, False)
                print("no error")
            except RuntimeError as e:
                print("sigma" in str(e))
    """)
    assert out.split() == ["True", "True"]


def test_density_map_spells_out_its_signature():
    """Issue 15, defect 7: density_map's options are visible to help() and IDEs (the API of docs/definitions.md)."""
    import inspect

    sig = inspect.signature(ck.density_map)
    want = dict(sigma="adaptive", k=3, beta=0.3, truncate=4.0, style="exact", kernel_size=15, stride=1,
                deterministic=False)
    assert list(sig.parameters)[:2] == ["points", "size"]
    for name, default in want.items():
        p = sig.parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == default, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    assert list(inspect.signature(ck.density_maps).parameters)[2:] == list(want)
    assert "sigma" in ck.density_map.__doc__ and "stride" in ck.density_map.__doc__
    with pytest.raises(TypeError):
        ck.density_map(_pts(), (10, 10), sigma_typo=2.0)


@pytest.mark.parametrize("style,sigma", [("exact", "adaptive"), ("csrnet", "adaptive"), ("exact", 2.0),
                                         ("matlab", "adaptive")])
def test_density_map_errors_name_points_not_points_list(style, sigma):
    """Issue 15, defect 7: every error path names the argument the caller passed: the C++ finiteness check
    of the fused CPU pipeline (re-raised), the Python one, and the shape and sigma checks."""
    bad = torch.tensor([[1.0, 2.0], [float("nan"), 3.0]])
    for call in (lambda: ck.density_map(bad, (8, 8), style=style, sigma=sigma),
                 lambda: ck.density_map(torch.zeros(3, 3), (8, 8), style=style, sigma=sigma),
                 lambda: ck.density_map(torch.zeros(2, 2, dtype=torch.bool), (8, 8), style=style, sigma=sigma)):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert str(info.value).startswith("points ") and "points_list" not in str(info.value)
    with pytest.raises(ValueError, match=r"^sigma must be a tensor of 2 values"):
        ck.density_map(_pts(), (8, 8), style=style, sigma=torch.ones(3))
    with pytest.raises(ValueError, match=r"^sigma must be positive"):
        ck.density_map(_pts(), (8, 8), style=style, sigma=torch.tensor([1.0, -1.0]))
    # density_maps keeps naming the list entry
    with pytest.raises(ValueError, match=r"^points_list\[1\] must be finite"):
        ck.density_maps([_pts(), bad], (8, 8), style=style, sigma=sigma)


def test_sizes_strides_and_windows_at_their_bounds():
    pts = torch.tensor([[1.5, 2.5], [3.0, 0.5]], dtype=torch.float64)
    for style in STYLES:
        d = ck.density_map(pts, (5, 7), stride=2**62, style=style, kernel_size=2**62 - 1 if style == "matlab" else 15)
        assert d.shape == (1, 1)
        if style != "csrnet":
            assert d.item() == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="stride"):
        ck.density_map(pts, (5, 7), stride=2**62 + 1)
    with pytest.raises(ValueError, match="kernel_size"):
        ck.density_map(pts, (5, 7), kernel_size=2**64 + 1, style="matlab")
    with pytest.raises(ValueError, match=r"size\[1\]"):
        ck.density_map(pts, (5, 2**31))
    with pytest.raises(ValueError, match=r"size\[0\]"):
        ck.density_map(pts, (2**70, 5))


@pytest.mark.parametrize("style", STYLES)
def test_far_points_and_wide_windows_in_bounded_memory(style):
    """Points at +-1e300 (dropped, or clipped by matlab), sigmas of 1e300 and truncate 1e300: under a
    256 MiB budget, with the count each style promises."""
    pts = torch.tensor([[1e300, 5.0], [-1e300, -1e300], [5.5, 1e-300], [3.2, 7.9]], dtype=torch.float64)
    with bounded(256 << 20, seconds=60):
        for sigma in ("adaptive", 1e300, 1e-300):
            d = ck.density_map(pts, (9, 11), style=style, sigma=sigma, truncate=1e300 if style != "matlab" else 4.0)
            ref = R.density_map_reference(pts, (9, 11), style=style, sigma=sigma,
                                          truncate=1e300 if style != "matlab" else 4.0)
            torch.testing.assert_close(d, ref, rtol=0, atol=1e-13)
            assert torch.isfinite(d).all()
            if style == "exact":
                assert d.sum().item() == pytest.approx(2.0, rel=1e-12)
            elif style == "matlab":
                assert d.sum().item() == pytest.approx(4.0, rel=1e-12)
