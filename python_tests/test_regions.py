"""L2SM region rescaling (issue 3): grid_boxes, scale_regions, unscale_regions, region_means, region_points,
transform_region_targets, against the plain-PyTorch reference and F.interpolate."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crowdkernels as ck
from crowdkernels import _ext
from crowdkernels.ops import reference as R

OPS = torch.ops.crowdkernels
needs_compiled = pytest.mark.skipif(not _ext.compiled(), reason="crowdkernels._C is not built")

# Factors r whose sampling coordinates never land exactly on a sample for the small sizes used here
# (r = p/100 with p coprime to 10), and whose r*h, r*w stay away from integers: the valid extent
# floor(r*h) is piecewise constant in r, and bilinear sampling has kinks at integer coordinates.
SMOOTH_R = [0.67, 1.37, 1.73, 2.21, 2.47]


def _boxes(rows):
    return torch.tensor(rows, dtype=torch.int64)


# Each case: (features shape, boxes, scale, canvas); covers r < 1, r = 1, r > 1, a canvas smaller than
# floor(r*h) (cropped), boxes on the image edges, overlapping boxes, several boxes and images.
SCALE_CASES = {
    "shrink": ((1, 3, 12, 13), [[0, 2, 3, 7, 9]], [0.53], (6, 7)),
    "identity": ((1, 2, 9, 11), [[0, 1, 2, 6, 7]], [1.0], (6, 7)),
    "zoom": ((1, 2, 9, 11), [[0, 1, 2, 6, 7]], [2.37], (15, 17)),
    "cropped": ((1, 2, 10, 10), [[0, 0, 0, 8, 8]], [2.6], (11, 9)),
    "edges": ((2, 3, 11, 13), [[0, 0, 0, 5, 6], [1, 6, 7, 5, 6], [0, 0, 7, 11, 6]], [1.5, 1.9, 0.8], (16, 12)),
    "many": (
        (3, 4, 16, 15),
        [[0, 0, 0, 8, 7], [0, 4, 4, 8, 8], [2, 8, 7, 8, 8], [1, 3, 2, 1, 1], [2, 0, 0, 16, 15], [0, 10, 0, 6, 15]],
        [1.21, 2.09, 0.71, 3.3, 1.0, 1.57],
        (20, 22),
    ),
}


def _scale_case(name, device, dtype=torch.float64, seed=0):
    shape, rows, rs, canvas = SCALE_CASES[name]
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(shape, generator=g, dtype=dtype).to(device)
    return features, _boxes(rows).to(device), torch.tensor(rs, dtype=dtype, device=device), canvas


def _unscale_case(device, dtype=torch.float64, seed=0, canvas=(14, 16)):
    """Non-overlapping boxes of two images (adjacent boxes, image edges), r < 1 and r > 1, canvas cropping."""
    g = torch.Generator().manual_seed(seed)
    boxes = _boxes([[0, 0, 0, 5, 7], [1, 3, 4, 6, 5], [0, 10, 12, 7, 7], [0, 5, 0, 6, 7], [1, 9, 9, 8, 10]])
    scale = torch.tensor([1.73, 1.37, 2.21, 0.67, 1.13], dtype=dtype)
    pred = torch.randn(5, 3, *canvas, generator=g, dtype=dtype)
    base = torch.randn(2, 3, 17, 19, generator=g, dtype=dtype)
    return pred.to(device), boxes.to(device), scale.to(device), base.to(device)


# ------------------------------------------------------------------------------------------ grid_boxes


@pytest.mark.parametrize("hwk", [(16, 16, 4), (17, 23, 4), (5, 9, 5), (7, 7, 1), (64, 48, 3)])
def test_grid_boxes(hwk):
    h, w, k = hwk
    boxes = ck.grid_boxes(h, w, k)
    assert boxes.dtype == torch.int64 and boxes.shape == (k * k, 4)
    assert torch.equal(boxes, R.grid_boxes_reference(h, w, k))
    cover = torch.zeros(h, w, dtype=torch.int64)
    for y0, x0, bh, bw in boxes.tolist():
        cover[y0 : y0 + bh, x0 : x0 + bw] += 1
    assert torch.equal(cover, torch.ones_like(cover))  # a partition
    assert boxes[-1, 2] == h - (k - 1) * (h // k) and boxes[-1, 3] == w - (k - 1) * (w // k)
    assert boxes[1 % (k * k), 0] == 0  # row-major: region 1 is on the first row


def test_grid_boxes_bad_input():
    with pytest.raises(ValueError, match="k"):
        ck.grid_boxes(16, 16, 0)
    with pytest.raises(ValueError, match="height and width"):
        ck.grid_boxes(3, 16, 4)
    with pytest.raises(TypeError, match="height"):
        ck.grid_boxes(16.0, 16, 4)


# ------------------------------------------------------------------------------------- scale_regions


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scale_regions_matches_reference(device, case):
    features, boxes, scale, canvas = _scale_case(case, device)
    with _ext.poisoned_outputs():
        out = ck.scale_regions(features, boxes, scale, canvas)
    ref = R.scale_regions_reference(features.cpu(), boxes.cpu(), scale.cpu(), canvas)
    assert out.shape == (boxes.shape[0], features.shape[1], *canvas)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scale_regions_matches_interpolate(device, case, dtype):
    features, boxes, scale, canvas = _scale_case(case, device, dtype)
    with _ext.poisoned_outputs():
        out = ck.scale_regions(features, boxes, scale, canvas)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for n, (b, y0, x0, h, w) in enumerate(boxes.tolist()):
        r = float(scale[n])
        ref = F.interpolate(
            features[b : b + 1, :, y0 : y0 + h, x0 : x0 + w],
            scale_factor=r,
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )[0]
        assert ref.shape[1:] == (math.floor(r * h), math.floor(r * w))
        vh, vw = min(ref.shape[1], canvas[0]), min(ref.shape[2], canvas[1])
        torch.testing.assert_close(out[n, :, :vh, :vw], ref[:, :vh, :vw], rtol=0, atol=tol)
        assert not out[n, :, vh:].any() and not out[n, :, :, vw:].any()  # the rest of the canvas is 0


def test_scale_regions_identity(device):
    features, boxes, scale, canvas = _scale_case("identity", device)
    out = ck.scale_regions(features, boxes, scale, canvas)
    _, y0, x0, h, w = boxes[0].tolist()
    assert torch.equal(out[0], features[0, :, y0 : y0 + h, x0 : x0 + w])


@pytest.mark.parametrize("case", ["shrink", "edges", "many", "cropped"])
def test_scale_regions_gradients_match_reference(device, case):
    features, boxes, scale, canvas = _scale_case(case, device)
    g = torch.randn(boxes.shape[0], features.shape[1], *canvas, dtype=features.dtype, device=device)
    f1, s1 = features.clone().requires_grad_(), scale.clone().requires_grad_()
    f2, s2 = features.cpu().requires_grad_(), scale.cpu().requires_grad_()
    with _ext.poisoned_outputs():
        got = torch.autograd.grad((ck.scale_regions(f1, boxes, s1, canvas) * g).sum(), (f1, s1))
    want = torch.autograd.grad((R.scale_regions_reference(f2, boxes.cpu(), s2, canvas) * g.cpu()).sum(), (f2, s2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_scale_regions_gradcheck(device):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64).to(device).requires_grad_()
    boxes = _boxes([[0, 0, 0, 5, 6], [1, 3, 2, 6, 7], [0, 2, 3, 7, 7], [0, 4, 4, 5, 6]]).to(device)
    # overlapping boxes (0, 2, 3 of image 0), r < 1 and r > 1, a cropped canvas for the last one
    scale = torch.tensor([1.37, 0.67, 1.73, 2.47], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, s: ck.scale_regions(f, boxes, s, (11, 12)), (features, scale))


def test_scale_regions_opcheck(device):
    features, boxes, scale, canvas = _scale_case("edges", device)
    torch.library.opcheck(OPS.scale_regions, (features.requires_grad_(), boxes, scale.requires_grad_(), *canvas))
    grad = torch.randn(boxes.shape[0], features.shape[1], *canvas, dtype=features.dtype, device=device)
    torch.library.opcheck(OPS.scale_regions_backward, (grad, features.detach(), boxes, scale.detach()))


# ----------------------------------------------------------------------------------- unscale_regions


@pytest.mark.parametrize("canvas", [(14, 16), (9, 8)])
def test_unscale_regions_matches_reference(device, canvas):
    pred, boxes, scale, base = _unscale_case(device, canvas=canvas)
    with _ext.poisoned_outputs():
        out = ck.unscale_regions(pred, boxes, scale, base)
    ref = R.unscale_regions_reference(pred.cpu(), boxes.cpu(), scale.cpu(), base.cpu())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-12)
    outside = torch.ones_like(base, dtype=torch.bool)
    for b, y0, x0, h, w in boxes.tolist():
        outside[b, :, y0 : y0 + h, x0 : x0 + w] = False
    assert torch.equal(out[outside], base[outside])


def test_unscale_regions_inverts_identity(device):
    """r = 1 puts the canvas back unchanged."""
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(1, 2, 8, 9, generator=g, dtype=torch.float64).to(device)
    base = torch.zeros(1, 2, 10, 12, dtype=torch.float64, device=device)
    out = ck.unscale_regions(pred, _boxes([[0, 1, 2, 8, 9]]).to(device), torch.ones(1, dtype=torch.float64), base)
    assert torch.equal(out[0, :, 1:9, 2:11], pred[0])


def test_unscale_regions_gradients_match_reference(device):
    pred, boxes, scale, base = _unscale_case(device, canvas=(9, 8))
    g = torch.randn_like(base)
    ins = [t.clone().requires_grad_() for t in (pred, scale, base)]
    refs = [t.cpu().requires_grad_() for t in (pred, scale, base)]
    with _ext.poisoned_outputs():
        got = torch.autograd.grad((ck.unscale_regions(ins[0], boxes, ins[1], ins[2]) * g).sum(), ins)
    want = torch.autograd.grad((R.unscale_regions_reference(refs[0], boxes.cpu(), refs[1], refs[2]) * g.cpu()).sum(), refs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_unscale_regions_gradcheck(device):
    pred, boxes, scale, base = _unscale_case(device, canvas=(13, 11))
    pred, base = pred[:, :2].contiguous(), base[:, :2].contiguous()
    inputs = tuple(t.clone().requires_grad_() for t in (pred, scale, base))
    assert torch.autograd.gradcheck(lambda p, s, b: ck.unscale_regions(p, boxes, s, b), inputs)


def test_unscale_regions_opcheck(device):
    pred, boxes, scale, base = _unscale_case(device)
    torch.library.opcheck(
        OPS.unscale_regions, (pred.requires_grad_(), boxes, scale.requires_grad_(), base.requires_grad_())
    )
    torch.library.opcheck(OPS.unscale_regions_backward, (torch.randn_like(base), pred.detach(), boxes, scale.detach()))


def test_unscale_regions_overlap_rejected(device):
    pred, boxes, scale, base = _unscale_case(device)
    overlapping = boxes.clone()
    overlapping[3] = torch.tensor([0, 4, 6, 2, 2])  # shares pixel (4, 6) with box 0 (rows 0-4, columns 0-6)
    with pytest.raises(ValueError, match="boxes.*overlap"):
        ck.unscale_regions(pred, overlapping, scale, base)
    # the same box in another image, and boxes that only touch, are fine
    other = boxes.clone()
    other[3] = torch.tensor([1, 0, 0, 2, 2])
    ck.unscale_regions(pred, other, scale, base)


def test_unscale_regions_overlap_blocks(monkeypatch):
    """The blocked pairwise test finds an overlap between two boxes in different row blocks."""
    from crowdkernels.ops import regions

    monkeypatch.setattr(regions, "_OVERLAP_BLOCK", 3)
    rows = [[0, i, 0, 1, 1] for i in range(8)] + [[0, 2, 0, 1, 1]]
    with pytest.raises(ValueError, match=r"boxes\[2\].*boxes\[8\]"):
        regions._check_no_overlap(_boxes(rows))
    regions._check_no_overlap(_boxes(rows[:8]))


def test_unscale_regions_empty_valid_part():
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="scale"):
        ck.unscale_regions(pred, _boxes([[0, 0, 0, 4, 4]]), torch.tensor([0.2]), torch.zeros(1, 1, 8, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ both ops


def test_zero_boxes(device):
    features = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    boxes = torch.zeros(0, 5, dtype=torch.int64, device=device)
    scale = torch.zeros(0, dtype=torch.float64, device=device, requires_grad=True)
    with _ext.poisoned_outputs():
        out = ck.scale_regions(features, boxes, scale, 5)
        assert out.shape == (0, 3, 5, 5)
        back = ck.unscale_regions(out, boxes, scale, features)
        assert torch.equal(back, features)
        back.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features)) and scale.grad.shape == (0,)


@needs_compiled
def test_cpu_kernels_deterministic_across_threads():
    features, boxes, scale, canvas = _scale_case("many", "cpu", torch.float32)
    pred, uboxes, uscale, base = _unscale_case("cpu", torch.float32)
    g1 = torch.randn(boxes.shape[0], features.shape[1], *canvas)
    g2 = torch.randn_like(base)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(
                OPS.scale_regions_backward(g1, features, boxes, scale)
                + OPS.unscale_regions_backward(g2, pred, uboxes, uscale)
                + (OPS.scale_regions(features, boxes, scale, *canvas),)
            )
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_compiled
def test_torch_compile(device):
    features, boxes, scale, canvas = _scale_case("edges", device)
    pred, uboxes, uscale, base = _unscale_case(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def ops(f, s, p, us, b):
        return OPS.scale_regions(f, boxes, s, *canvas).sum() + OPS.unscale_regions(p, uboxes, us, b).sum()

    ins = [t.clone().requires_grad_() for t in (features, scale, pred, uscale, base)]
    ops(*ins).backward()
    ref = [t.clone().requires_grad_() for t in (features, scale, pred, uscale, base)]
    (ck.scale_regions(ref[0], boxes, ref[1], canvas).sum() + ck.unscale_regions(ref[2], uboxes, ref[3], ref[4]).sum()).backward()
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad)
    # the public function compiles too (its argument checks read data: graph breaks, same values)
    compiled = torch.compile(ck.scale_regions, backend="aot_eager")
    torch.testing.assert_close(compiled(features, boxes, scale, canvas), ck.scale_regions(features, boxes, scale, canvas))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    for dtype in (torch.float32, torch.float64):
        features, boxes, scale, canvas = _scale_case("many", "cpu", dtype)
        g = torch.randn(boxes.shape[0], features.shape[1], *canvas, dtype=dtype)
        cpu = (OPS.scale_regions(features, boxes, scale, *canvas),) + OPS.scale_regions_backward(g, features, boxes, scale)
        gpu = (OPS.scale_regions(features.cuda(), boxes.cuda(), scale.cuda(), *canvas),) + OPS.scale_regions_backward(
            g.cuda(), features.cuda(), boxes.cuda(), scale.cuda()
        )
        pred, ub, us, base = _unscale_case("cpu", dtype)
        g2 = torch.randn_like(base)
        cpu += (OPS.unscale_regions(pred, ub, us, base),) + OPS.unscale_regions_backward(g2, pred, ub, us)
        gpu += (OPS.unscale_regions(pred.cuda(), ub.cuda(), us.cuda(), base.cuda()),) + OPS.unscale_regions_backward(
            g2.cuda(), pred.cuda(), ub.cuda(), us.cuda()
        )
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, **tol)


# Round trip: a smooth density zoomed by r (divided by r^2 so that the zoomed map keeps the count, as the
# zoomed targets do) and put back with unscale_regions (x r^2) keeps its count. Two effects move it:
# - the zoomed canvas holds floor(r h) rows, which cover floor(r h) / r < h rows of the box, so zooming alone
#   loses up to (r h - floor(r h)) / (r h) of the mass near the far edges (0 when r h is an integer);
# - bilinear resampling of a smooth map is exact up to its curvature and the half-pixel border clamps.
# For Gaussians of sigma >= 3 px in 16 x 16 boxes the round trip keeps the total count to 1% (measured
# <= 0.62% at r = 1.37), and exactly when r h is an integer.
ROUND_TRIP_RTOL = 1e-2


@pytest.mark.parametrize("r", [0.83, 1.0, 1.37, 1.73, 2.0, 2.5])
def test_round_trip_keeps_count(device, r):
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    density = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    for cy, cx, s in [(8.3, 7.6, 3.0), (24.5, 40.2, 3.5), (40.7, 23.1, 4.0), (55.0, 56.0, 3.2)]:
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        density[0, 0] += (blob / blob.sum()).double()
    density = density.to(device)
    boxes = torch.cat([torch.zeros(16, 1, dtype=torch.int64), ck.grid_boxes(64, 64, 4)], 1).to(device)
    scale = torch.full((16,), r, dtype=torch.float64, device=device)
    zoomed = ck.scale_regions(density, boxes, scale, math.ceil(16 * r)) / r**2
    back = ck.unscale_regions(zoomed, boxes, scale, torch.zeros_like(density))
    torch.testing.assert_close(back.sum(), density.sum(), rtol=ROUND_TRIP_RTOL, atol=0)
    if float(16 * r).is_integer():
        counts = ck.region_means(density, 4)[0] * 256
        torch.testing.assert_close(zoomed.sum((1, 2, 3)), counts, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ck.region_means(back, 4)[0] * 256, counts, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ bad-input matrix


def _bad_scale_calls(device):
    features = torch.randn(2, 3, 10, 10, dtype=torch.float64, device=device)
    pred = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    good = _boxes([[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]]).to(device)
    scale = torch.tensor([1.5, 1.2], dtype=torch.float64, device=device)

    def both(boxes=good, scale=scale, out_size=8):
        yield lambda: ck.scale_regions(features, boxes, scale, out_size)
        yield lambda: ck.unscale_regions(pred, boxes, scale, features)

    return both


BAD = [
    # (kwargs for `both`, exception, pattern)
    (dict(scale=torch.tensor([1.5, 0.0])), ValueError, "scale"),
    (dict(scale=torch.tensor([-1.0, 1.0])), ValueError, "scale"),
    (dict(scale=torch.tensor([float("nan"), 1.0])), ValueError, "scale"),
    (dict(scale=torch.tensor([float("inf"), 1.0])), ValueError, "scale"),
    (dict(boxes=torch.tensor([[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]], dtype=torch.int32)), TypeError, "boxes"),
    (dict(boxes=torch.tensor([[0.0, 0, 0, 4, 4], [1, 5, 5, 5, 5]])), TypeError, "boxes"),
    (dict(boxes=_boxes([[0, 0, 0, 4], [1, 5, 5, 5]])), ValueError, "boxes"),
    (dict(boxes=_boxes([0, 0, 0, 4, 4])), ValueError, "boxes"),
    (dict(boxes=[[0, 0, 0, 4, 4], [1, 5, 5, 5, 5]]), TypeError, "boxes"),
    (dict(boxes=_boxes([[0, 0, 0, 4, 4], [1, 6, 5, 5, 5]])), ValueError, "boxes.*outside"),
    (dict(boxes=_boxes([[0, 0, -1, 4, 4], [1, 5, 5, 5, 5]])), ValueError, "boxes.*outside"),
    (dict(boxes=_boxes([[0, 0, 0, 4, 4], [2, 5, 5, 5, 5]])), ValueError, "boxes.*batch index"),
    (dict(boxes=_boxes([[-1, 0, 0, 4, 4], [1, 5, 5, 5, 5]])), ValueError, "boxes.*batch index"),
    (dict(boxes=_boxes([[0, 0, 0, 0, 4], [1, 5, 5, 5, 5]])), ValueError, "boxes.*empty"),
    (dict(boxes=_boxes([[0, 0, 0, 4, 4], [1, 5, 5, 5, 0]])), ValueError, "boxes.*empty"),
    (dict(scale=torch.tensor([1.5])), ValueError, "scale"),
    (dict(scale=torch.tensor([1.5, 1.2, 1.1])), ValueError, "scale"),
    (dict(scale="big"), TypeError, "scale"),
]


@pytest.mark.parametrize("kwargs, exc, pattern", BAD)
def test_bad_inputs(device, kwargs, exc, pattern):
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    for call in _bad_scale_calls(device)(**kwargs):
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.parametrize("out_size, exc", [(0, ValueError), ((8, 0), ValueError), (-3, ValueError), (2.5, TypeError), ((8,), TypeError), (True, TypeError)])
def test_bad_out_size(out_size, exc):
    features = torch.randn(1, 1, 6, 6)
    with pytest.raises(exc, match="out_size"):
        ck.scale_regions(features, _boxes([[0, 0, 0, 3, 3]]), torch.tensor([1.5]), out_size)


def test_bad_tensors():
    f = torch.randn(1, 2, 6, 6)
    b, s = _boxes([[0, 0, 0, 3, 3]]), torch.tensor([1.5])
    with pytest.raises(TypeError, match="features"):
        ck.scale_regions(f.long(), b, s, 4)
    with pytest.raises(ValueError, match="features"):
        ck.scale_regions(f[0], b, s, 4)
    with pytest.raises(ValueError, match="pred"):
        ck.unscale_regions(torch.randn(2, 2, 4, 4), b, s, f)  # one canvas per box
    with pytest.raises(ValueError, match="pred"):
        ck.unscale_regions(torch.randn(1, 3, 4, 4), b, s, f)  # channels
    with pytest.raises(TypeError, match="base"):
        ck.unscale_regions(torch.randn(1, 2, 4, 4), b, s, f.double())


@needs_compiled
def test_cpp_checks_are_last_defence():
    f = torch.randn(1, 1, 6, 6)
    with pytest.raises(RuntimeError, match="outside"):
        OPS.scale_regions(f, _boxes([[0, 4, 0, 3, 3]]), torch.tensor([1.5]), 4, 4)
    with pytest.raises(RuntimeError, match="scale"):
        OPS.scale_regions(f, _boxes([[0, 0, 0, 3, 3]]), torch.tensor([-1.0]), 4, 4)


# -------------------------------------------------------------------------------------- region_means


@pytest.mark.parametrize("shape, k", [((2, 1, 16, 16), 4), ((1, 1, 17, 23), 4), ((3, 1, 9, 5), 2)])
def test_region_means(device, shape, k):
    density = torch.rand(shape, dtype=torch.float64, device=device, requires_grad=True)
    means = ck.region_means(density, k)
    torch.testing.assert_close(means.cpu(), R.region_means_reference(density.detach().cpu(), k))
    assert torch.autograd.gradcheck(lambda d: ck.region_means(d, k), (density,))


def test_region_means_bad_input():
    with pytest.raises(ValueError, match="density"):
        ck.region_means(torch.rand(1, 2, 8, 8), 2)
    with pytest.raises(ValueError, match="k"):
        ck.region_means(torch.rand(1, 1, 8, 8), 0)
    with pytest.raises(TypeError, match="k"):
        ck.region_means(torch.rand(1, 1, 8, 8), 2.0)


# ------------------------------------------------------------------------------- region targets (Fig. 4)


def test_region_points_membership_and_mapping():
    points = [
        torch.tensor([[2.0, 3.0], [5.99, 3.0], [6.0, 3.0], [2.0, 6.5], [2.0, 7.0], [0.5, 0.5]], dtype=torch.float64),
        torch.tensor([[1.0, 1.0]], dtype=torch.float64),
    ]
    sigma = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64), torch.tensor([7.0], dtype=torch.float64)]
    boxes = _boxes([[0, 3, 2, 4, 4], [1, 0, 0, 2, 2], [1, 2, 2, 2, 2]])  # box 0: 3 <= y < 7, 2 <= x < 6
    moved, sig = ck.region_points(points, boxes, torch.tensor([2.0, 0.5, 1.5]), sigma)
    assert [m.shape[0] for m in moved] == [3, 1, 0]
    torch.testing.assert_close(moved[0], torch.tensor([[0.0, 0.0], [7.98, 0.0], [0.0, 7.0]], dtype=torch.float64))
    torch.testing.assert_close(moved[1], torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(sig, torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64))


def _target_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    points = [
        torch.rand(40, 2, generator=g, dtype=torch.float64) * torch.tensor([23.0, 19.0], dtype=torch.float64),
        torch.zeros(0, 2, dtype=torch.float64),
        torch.rand(15, 2, generator=g, dtype=torch.float64) * 16,
    ]
    sigma = [torch.rand(p.shape[0], generator=g, dtype=torch.float64) * 2 + 0.5 for p in points]
    boxes = _boxes([[0, 0, 0, 10, 12], [0, 10, 12, 9, 11], [2, 2, 3, 10, 10], [1, 0, 0, 5, 5], [0, 4, 5, 8, 8]])
    scale = torch.tensor([1.6, 2.2, 0.8, 1.9, 2.5])
    return [p.to(dtype) for p in points], boxes, scale, [s.to(dtype) for s in sigma]


def test_transform_region_targets_matches_reference():
    points, boxes, scale, sigma = _target_case()
    out = ck.transform_region_targets(points, boxes, scale, sigma, (22, 24))
    ref = R.transform_region_targets_reference(points, boxes, scale, sigma, (22, 24))
    assert out.shape == (5, 1, 22, 24)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # every moved head on the canvas counts exactly 1 (style "exact"); a head moved past it is dropped
    moved, _ = ck.region_points(points, boxes, scale, sigma)
    on_canvas = torch.tensor([int(((m[:, 0] < 24) & (m[:, 1] < 22)).sum()) for m in moved], dtype=torch.float64)
    torch.testing.assert_close(out.sum((1, 2, 3)), on_canvas)


def test_transform_region_targets_is_density_maps():
    """It is density_maps with per-head sigma on the moved heads, and the sigma forms agree."""
    points, boxes, scale, sigma = _target_case(torch.float32)
    out = ck.transform_region_targets(points, boxes, scale, torch.cat(sigma), 20)
    assert out.dtype == torch.float32
    moved, sig = ck.region_points(points, boxes, scale, sigma)
    torch.testing.assert_close(out, ck.density_maps(moved, (20, 20), sigma=sig, style="exact"))
    fixed = ck.transform_region_targets(points, boxes, scale, 1.5, 20)
    torch.testing.assert_close(fixed, ck.density_maps(moved, (20, 20), sigma=1.5, style="exact"))


def test_transform_region_targets_edge_cases():
    points, boxes, scale, sigma = _target_case()
    empty = ck.transform_region_targets(points, boxes[:0], scale[:0], sigma, 8)
    assert empty.shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="boxes.*batch index"):
        ck.transform_region_targets(points, _boxes([[3, 0, 0, 4, 4]]), [1.5], sigma, 8)
    with pytest.raises(ValueError, match="sigma"):
        ck.transform_region_targets(points, boxes, scale, sigma[:2], 8)
    with pytest.raises(ValueError, match="sigma"):
        ck.transform_region_targets(points, boxes, scale, [s * 0 for s in sigma], 8)
    with pytest.raises(TypeError, match="points"):
        ck.transform_region_targets(points[0], boxes, scale, sigma, 8)
    with pytest.raises(ValueError, match="scale"):
        ck.transform_region_targets(points, boxes, -scale, sigma, 8)
    with pytest.raises(ValueError, match="out_size"):
        ck.transform_region_targets(points, boxes, scale, sigma, 0)


def test_reference_backend_when_no_kernel(monkeypatch):
    """Where no compiled kernel exists the public functions run the reference, with the same values and
    gradients (scale included)."""
    features, boxes, scale, canvas = _scale_case("edges", "cpu")
    pred, uboxes, uscale, base = _unscale_case("cpu")
    ins = [t.clone().requires_grad_() for t in (features, scale, pred, uscale, base)]
    (ck.scale_regions(ins[0], boxes, ins[1], canvas).square().sum() + ck.unscale_regions(ins[2], uboxes, ins[3], ins[4]).square().sum()).backward()
    monkeypatch.setattr(_ext, "backend", lambda device, op: "reference")
    ref = [t.clone().requires_grad_() for t in (features, scale, pred, uscale, base)]
    (ck.scale_regions(ref[0], boxes, ref[1], canvas).square().sum() + ck.unscale_regions(ref[2], uboxes, ref[3], ref[4]).square().sum()).backward()
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


@needs_compiled
def test_opcheck_non_contiguous():
    """channels_last features and a transposed gradient: the kernels and their fake kernels agree on strides."""
    features, boxes, scale, canvas = _scale_case("many", "cpu")
    features = features.to(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.scale_regions, (features.requires_grad_(), boxes, scale.requires_grad_(), *canvas))
    grad = torch.randn(boxes.shape[0], features.shape[1], canvas[1], canvas[0], dtype=features.dtype).transpose(2, 3)
    torch.library.opcheck(OPS.scale_regions_backward, (grad, features.detach(), boxes, scale.detach()))
    pred, uboxes, uscale, base = _unscale_case("cpu")
    torch.library.opcheck(
        OPS.unscale_regions_backward,
        (torch.randn_like(base).to(memory_format=torch.channels_last), pred.to(memory_format=torch.channels_last), uboxes, uscale),
    )


# ------------------------------------------------------------------------------ extreme but valid inputs (review)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1e30, 1e19, 3e9])
def test_scale_regions_huge_factor_fills_the_canvas(device, dtype, r):
    """Regression: floor(r * h) was cast to int64 unclamped; for r = 1e30 the cast gave INT64_MIN (x86)
    and the canvas came out all 0. Every canvas sample lies within half a source pixel of the box's
    corner: out = features[b, :, y0, x0] everywhere."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype).to(device)
    boxes = _boxes([[0, 2, 3, 4, 5], [1, 0, 0, 9, 11], [1, 8, 10, 1, 1]]).to(device)
    scale = torch.full((3,), r, dtype=dtype, device=device)
    got = ck.scale_regions(features, boxes, scale, (6, 7))
    for n, (b, y0, x0, _, _) in enumerate(boxes.tolist()):
        want = features[b, :, y0, x0][:, None, None].expand(3, 6, 7)
        assert torch.equal(got[n], want), n
    torch.testing.assert_close(got, R.scale_regions_reference(features, boxes, scale, (6, 7)))
    # and a factor so small that the valid part is empty: the canvas is 0
    tiny = ck.scale_regions(features, boxes, torch.full((3,), 1e-30, dtype=dtype, device=device), (6, 7))
    assert torch.equal(tiny, torch.zeros_like(tiny))


def test_unscale_regions_factor_whose_square_overflows_raises_naming_scale(device):
    """r**2 past the dtype's range is inf, and inf * 0 = NaN wherever the prediction is 0: a ValueError
    naming scale instead of a map of NaN and inf. float64 takes the same factor."""
    pred = torch.zeros(1, 1, 4, 4, device=device)
    pred[0, 0, 3, 3] = 1.0
    base = torch.zeros(1, 1, 6, 6, device=device)
    boxes = _boxes([[0, 1, 1, 4, 4]]).to(device)
    with pytest.raises(ValueError, match=r"scale\[0\].*float32"):
        ck.unscale_regions(pred, boxes, torch.tensor([1e20], device=device), base)
    out = ck.unscale_regions(pred.double(), boxes, torch.tensor([1e20], device=device), base.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 1:5, 1:5].cpu(), torch.full((4, 4), 1e20 ** 2, dtype=torch.float64))
    ok = ck.unscale_regions(pred, boxes, torch.tensor([1.8e19], device=device), base)  # r**2 < 3.4e38
    assert torch.isfinite(ok).all()


def test_region_means_float32_near_its_largest_values():
    """A float32 region of values near 3.4e38 (or of subnormals) has a representable mean whose float32
    sum is not: the sums are taken in float64."""
    density = torch.full((1, 1, 8, 8), 3.0e38)
    density[0, 0, :4, :4] = 1e-44
    means = ck.region_means(density, 2)
    assert means.dtype == torch.float32
    torch.testing.assert_close(means, torch.tensor([[1e-44, 3.0e38, 3.0e38, 3.0e38]]), rtol=1e-6, atol=0)
    d = torch.rand(2, 1, 9, 7, requires_grad=True)
    ck.region_means(d, 3).sum().backward()  # d mean / d pixel = 1 / area of its region (3x2, 3x3)
    area = torch.tensor([3.0, 3.0, 3.0])[:, None] * torch.tensor([2.0, 2.0, 3.0])[None, :]
    want = (1 / area).repeat_interleave(3, 0).repeat_interleave(torch.tensor([2, 2, 3]), 1)
    torch.testing.assert_close(d.grad[0, 0], want)


def test_grid_boxes_huge_sides():
    boxes = ck.grid_boxes(2**62, 3 * 2**40 + 1, 3)
    torch.testing.assert_close(boxes, R.grid_boxes_reference(2**62, 3 * 2**40 + 1, 3), rtol=0, atol=0)
    assert sum(h * w for _, _, h, w in boxes.tolist()) == 2**62 * (3 * 2**40 + 1)  # an exact tiling
    with pytest.raises(ValueError, match="height"):
        ck.grid_boxes(2**62 + 1, 5, 2)
    with pytest.raises(ValueError, match="width"):
        ck.grid_boxes(5, 2**70, 2)
