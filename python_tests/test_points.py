"""Head locations (issue 21, "Also build"): density_to_points on maps of known heads (synthetic crowds, the
shared ShanghaiTech part B samples' ground truth), Counter.points / Prediction.points in image pixels, the
pictures that mark them and `crowdkernels count --points`."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import maximum_filter

import crowdkernels as ck
from conftest import require_data
from crowdkernels import cli
from crowdkernels.data import list_samples, synthetic_dataset
from crowdkernels.data.readers import count_inside
from crowdkernels.data.points import density_to_points, local_sigma, match_points
from crowdkernels.models import registry as train_mod
from crowdkernels.engine.checkpoint import save_checkpoint
from crowdkernels.engine.config import TrainConfig
from crowdkernels.inference import Prediction
from crowdkernels.viz import picture_layout, save_prediction
from test_engine import TinyOutput


def _pooled(results) -> dict:
    tp = sum(r["tp"] for r in results)
    return {"precision": tp / (tp + sum(r["fp"] for r in results)), "recall": tp / (tp + sum(r["fn"] for r in results))}


# ----------------------------------------------------------------------------------------- the rule
def test_synthetic_crowds_are_located_within_8_px():
    results = []
    for s in synthetic_dataset(20, 128, seed=7):
        pts = s.points_tensor(torch.float64)
        dm = ck.density_map(pts, s.size)  # geometry-adaptive sigma, as the training targets
        heads = density_to_points(dm)
        assert heads.shape == (round(float(dm.sum())), 3) and heads.dtype == torch.float32
        assert count_inside(heads[:, :2].double().numpy(), s.size) == len(heads)
        results.append(match_points(heads, pts, 8.0))
    got = _pooled(results)
    # measured: precision = recall = 0.957 over these 20 images (1088 heads)
    assert got["precision"] >= 0.94 and got["recall"] >= 0.94, got


@pytest.mark.parametrize("sigma, floor", [("adaptive", 0.85), (4.0, 0.995)])
def test_shanghaitech_b_ground_truth_maps_give_back_their_heads(sigma, floor):
    root = require_data("ShanghaiTech", "part_B", "train_data")
    results = []
    for s in list_samples(root, "shanghaitech"):
        h, w = s.size()
        pts = s.points()
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
        dm = ck.density_map(torch.from_numpy(pts), (h, w), style="exact", sigma=sigma)
        heads = density_to_points(dm)
        assert len(heads) == len(pts)
        results.append(match_points(heads, pts, 8.0))
    got = _pooled(results)
    # measured on the 24 images (1782 heads) at 8 px: 0.864 with the adaptive sigma (up to 90 px on these sparse
    # crowds: neighbours' Gaussians merge and shift the peaks), 0.999 with a fixed sigma of 4 px
    assert got["precision"] >= floor and got["recall"] >= floor, got


def test_the_densest_shanghaitech_a_sample():
    root = require_data("ShanghaiTech", "part_A", "train_data")
    s = max(list_samples(root, "shanghaitech"), key=lambda s: len(s.points()))
    pts = torch.from_numpy(s.points())
    heads = density_to_points(ck.density_map(pts, s.size()))
    got = match_points(heads, pts, 8.0)
    assert len(pts) > 2000 and got["tp"] + got["fn"] == len(pts)
    assert got["precision"] >= 0.95 and got["recall"] >= 0.95, got  # measured: 0.961 (2164 heads)


def _gauss(size, x, y, sigma, mass=1.0):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return mass * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_non_maximum_suppression_at_the_local_sigma():
    # two heads (sigma 3) and a ripple on the first one's flank: a local maximum 2 px from its peak
    d = _gauss((40, 60), 15.5, 20.5, 3.0) + _gauss((40, 60), 45.5, 12.5, 3.0)
    d[20, 17] = d[20, 16] * 1.05
    assert d[20, 17] == d[19:22, 16:19].max()  # the ripple is a local maximum
    heads = density_to_points(d, count=2)
    assert np.allclose(sorted(heads[:, :2].tolist()), [[15.5, 20.5], [45.5, 12.5]], atol=0.6)
    assert local_sigma(d.max()) == pytest.approx(3.0, rel=0.05)  # a lone head's peak gives its sigma back
    # each point's score: the people within its radius (about 1 - exp(-1/2) of a head within one sigma)
    assert heads[:, 2].numpy() == pytest.approx([0.39] * 2, abs=0.03)
    # a fixed radius larger than the ripple's distance (2 elements) suppresses it too; a smaller one does not
    assert sorted(density_to_points(d, 2, radius=2.5, refine=False)[:, :2].tolist()) == [[15.5, 20.5], [45.5, 12.5]]
    assert sorted(density_to_points(d, 3, radius=1.0, refine=False)[:, :2].tolist()) == [[15.5, 20.5], [17.5, 20.5], [45.5, 12.5]]


def test_the_number_of_points_is_the_rounded_count():
    # two heads 2 px apart merge into one maximum; the count asks for both
    d = _gauss((30, 30), 14.0, 15.5, 3.0) + _gauss((30, 30), 16.0, 15.5, 3.0)
    assert ((d > 0) & (d == maximum_filter(d, size=3))).sum() == 2  # one flat top of two elements
    heads = density_to_points(d)
    assert len(heads) == 2
    assert match_points(heads, [[14.0, 15.5], [16.0, 15.5]], 3.0)["tp"] == 2
    for count, n in ((0.4, 0), (2.6, 3), (-3.0, 0), (7, 7), (10_000, 900)):
        assert len(density_to_points(d, count)) == n
    assert density_to_points(np.zeros((5, 5))).shape == (0, 3)
    assert len(density_to_points(np.zeros((5, 5)), 3)) == 3  # asked for: taken from the flat map all the same


@pytest.mark.parametrize("call, message", [
    (lambda: density_to_points(np.zeros((2, 3, 4))), r"density must be a map \[H, W\] .*got shape \(2, 3, 4\)"),
    (lambda: density_to_points(np.full((3, 3), np.nan)), r"density holds NaN or inf"),
    (lambda: density_to_points(np.ones((3, 3)), count="5"), r"count must be a finite number .*got '5'"),
    (lambda: density_to_points(np.ones((3, 3)), count=float("inf")), r"count must be a finite number .*got inf"),
    (lambda: density_to_points(np.ones((3, 3)), radius=0), r"radius must be a positive number .*got 0"),
    (lambda: match_points(np.ones(3), np.ones((1, 2)), 8), r"pred must be points \[N, 2\] .*got shape \(3,\)"),
    (lambda: match_points(np.ones((1, 2)), np.ones((1, 2)), -1), r"radius must be a positive number, got -1"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_match_points_is_one_to_one():
    true = [[10, 10], [30, 10]]
    got = match_points([[11, 10], [10, 11], [29, 10], [80, 80]], true, 3.0)
    assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 0)
    assert got["precision"] == 0.5 and got["recall"] == 1.0 and got["f1"] == pytest.approx(2 / 3)
    # the largest matching, not the greedy one: [20, 10] could take either true head
    assert match_points([[20, 10], [12, 10]], [[10, 10], [23, 10]], 4.0)["tp"] == 2
    assert match_points(torch.zeros(0, 3), true, 3.0)["recall"] == 0.0


# ----------------------------------------------------------------------------------------- in image pixels
@pytest.mark.parametrize("stride, image, model_input", [(4, (96, 128), (96, 128)), (8, (150, 200), (75, 100)),
                                                        (1, (40, 70), (40, 70))])
def test_prediction_points_are_in_image_pixels(stride, image, model_input):
    """A model's cells (people per s x s block of its input, which max_size shrinks) back in the image."""
    rng = np.random.default_rng(stride)
    H, W = image
    # 12 heads on a jittered grid, apart by more than two sigmas of the model's map (separate peaks)
    grid = np.array([[(c + 0.5) * W / 4, (r + 0.5) * H / 3] for r in range(3) for c in range(4)])
    heads = grid + rng.uniform(-0.05, 0.05, grid.shape) * [W, H]
    fy, fx = model_input[0] / H, model_input[1] / W
    cells = ck.density_map(torch.from_numpy(heads * [fx, fy]), model_input, sigma=float(stride), stride=stride).float()
    pred = Prediction("x.png", float(cells.sum()), cells, torch.zeros(3, H, W), model_input)
    pts = pred.points()
    assert len(pts) == 12 and count_inside(pts[:, :2].double().numpy(), image) == 12
    # within three quarters of a cell (in image pixels; 3 px at least)
    assert match_points(pts, heads, max(3.0, 0.75 * stride / fx))["tp"] == 12
    # a fixed radius is in image pixels: one of a whole image's size keeps a single maximum, then fills in
    assert len(pred.points(radius=float(max(H, W)))) == 12
    with pytest.raises(ValueError, match=r"radius must be a positive number of pixels \(or None\), got -2"):
        pred.points(radius=-2)


class DotCounter(torch.nn.Module):
    """Counts bright 2 x 2 dots on black: the people of each 4 x 4 block are its brightness / 4 (a model whose
    output is known, at stride 4)."""

    input_multiple = 16

    def forward(self, images):
        return TinyOutput(final=F.avg_pool2d(images.mean(1, keepdim=True), 4) * 16 / 4)


def _dots(path, heads, size=(96, 128)):
    arr = np.zeros((*size, 3), np.uint8)
    for x, y in heads:
        arr[int(y) - 1:int(y) + 1, int(x) - 1:int(x) + 1] = 255
    Image.fromarray(arr).save(path)
    return path


HEADS = [[20, 20], [60, 30], [100, 70], [30, 80], [110, 16]]


@pytest.fixture
def dot_ckpt(monkeypatch, tmp_path):
    monkeypatch.setitem(train_mod.MODEL_BUILDERS, "csrnet", lambda **kw: DotCounter())
    cfg = TrainConfig(out=str(tmp_path / "run"), model="csrnet", dataset="synthetic", input_norm=None)
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, {"model_name": "csrnet", "config": cfg.to_dict(), "model": {}, "epoch": 1, "step": 0})
    return path


def test_counter_points_and_the_command_line(dot_ckpt, tmp_path, capsys):
    img = _dots(tmp_path / "dots.png", HEADS)
    counter = ck.load(dot_ckpt, "cpu")
    assert counter.count(img) == pytest.approx(5.0)
    pts = counter.points(img)
    assert pts.shape == (5, 3)
    assert match_points(pts, HEADS, 2.0)["tp"] == 5  # 2 x 2 dots seen through 4 x 4 cells, refined

    assert cli.main(["count", str(img), "--checkpoint", str(dot_ckpt), "--points", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got[0]["count"] == pytest.approx(5.0) and len(got[0]["points"]) == 5
    assert np.allclose(sorted(got[0]["points"]), sorted(pts.tolist()), atol=0.01)

    img2 = _dots(tmp_path / "two.png", HEADS[:2])
    assert cli.main(["count", str(img), str(img2), "--checkpoint", str(dot_ckpt), "--points"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["image"] for r in rows] == [str(img)] * 5 + [str(img2)] * 2
    assert match_points([[float(r["x"]), float(r["y"])] for r in rows[5:]], HEADS[:2], 2.0)["tp"] == 2
    assert all(float(r["score"]) > 0 for r in rows)

    # the pictures mark them
    assert cli.main(["count", str(img), "--checkpoint", str(dot_ckpt), "--points", "--json",
                     "--save-dir", str(tmp_path / "pics")]) == 0
    capsys.readouterr()
    _assert_marked(tmp_path / "pics" / "dots.png", HEADS, (96, 128))


def _assert_marked(picture, heads, size):
    layout = picture_layout(size, 2)
    x0, y0, x1, y1 = layout.panels[0]
    k = (x1 - x0) / size[1]
    with Image.open(picture) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    panel = red[y0:y1, x0:x1]
    for x, y in heads:  # a red ring around each head (the dots are white, the rest black)
        cx, cy = int(x * k), int(y * k)
        assert panel[max(0, cy - 12):cy + 13, max(0, cx - 12):cx + 13].any(), (x, y)
    assert not panel[int(50 * k):int(60 * k), int(75 * k):int(85 * k)].any()  # no head there, no ring
    assert not red[:, x1:].any()  # the maps are not marked


def test_save_prediction_marks_heads_it_is_given(tmp_path):
    cells = torch.zeros(24, 32)
    pred = Prediction("p.png", 0.0, cells, torch.zeros(3, 96, 128), (96, 128))
    save_prediction(tmp_path / "p.png", pred, heads=torch.tensor(HEADS, dtype=torch.float32))
    _assert_marked(tmp_path / "p.png", HEADS, (96, 128))
    with pytest.raises(ValueError, match=r"heads must be \[N, 2\] \(x, y\) or \[N, 3\]"):
        save_prediction(tmp_path / "q.png", pred, heads=torch.zeros(2, 4))
