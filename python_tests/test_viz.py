"""Pictures (crowdkernels.viz), read back from the PNG files: the documented size, the image drawn pixel for
pixel, a colour scale that spans the maps' range (colour bar ends = the colormap's ends, the map's maximum
and minimum drawn in those colours), negative totals flagged, and the scatter plot and learning curve."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from crowdkernels import viz
from crowdkernels.data.transforms import IMAGENET_NORM, normalize_image

CM = matplotlib.colormaps[viz.CMAP]
LUT = np.array([CM(v)[:3] for v in np.linspace(0, 1, 1001)]) * 255.0


def _value(rgb) -> float:
    """The colormap position (0..1) whose colour is nearest to an RGB pixel: the inverse of the colormap."""
    return float(np.argmin(((LUT - np.asarray(rgb, np.float64)) ** 2).sum(axis=1)) / 1000.0)


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _documented_size(h, w, panels):
    """The module docstring's formulas, written out here independently of picture_layout."""
    if max(h, w) > 1024:
        f = 1024 / max(h, w)
        ph, pw = max(1, round(h * f)), max(1, round(w * f))
    else:
        k = max(1, 384 // max(h, w))
        ph, pw = h * k, w * k
    return 10 + panels * (pw + 10) + 14 + 76, 54 + ph + 10


@pytest.mark.parametrize("size", [(48, 64), (300, 451), (1500, 2300), (37, 1200)])
@pytest.mark.parametrize("with_truth", [False, True])
def test_picture_has_the_documented_size(tmp_path, size, with_truth):
    h, w = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pred = rng.random((h, w))
    truth = rng.random((h, w)) if with_truth else None
    layout = viz.save_picture(tmp_path / "p.png", image, pred, truth=truth, name="x")
    png = _read(tmp_path / "p.png")
    expected = _documented_size(h, w, 3 if with_truth else 2)
    assert layout.size == expected and (png.shape[1], png.shape[0]) == expected
    assert len(layout.panels) == (3 if with_truth else 2)


def test_image_panel_is_the_image_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(1)
    for h, w, k in ((40, 50, 7), (400, 500, 1)):  # enlarged by a whole factor; at full resolution
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).float() / 255
        layout = viz.save_picture(tmp_path / "p.png", image, np.zeros((h, w)))
        png = _read(tmp_path / "p.png")
        x0, y0, x1, y1 = layout.panels[0]
        assert (x1 - x0, y1 - y0) == (w * k, h * k)
        shown = png[y0:y1:k, x0:x1:k]
        expected = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(shown, expected)
    # a normalized image is drawn de-normalized
    norm_img = normalize_image(image, IMAGENET_NORM)
    layout = viz.save_picture(tmp_path / "n.png", norm_img, np.zeros((h, w)), norm=IMAGENET_NORM)
    x0, y0, x1, y1 = layout.panels[0]
    diff = _read(tmp_path / "n.png")[y0:y1, x0:x1].astype(int) - expected.astype(int)
    assert np.abs(diff).max() <= 1


def _colour_bar_ends(png, layout):
    x0, y0, x1, y1 = layout.colorbar
    xc = (x0 + x1) // 2
    return _value(png[y0 + 3, xc]), _value(png[y1 - 4, xc])  # inside the bar's outline


@pytest.mark.parametrize("low", [0.0, -0.75])
def test_colour_scale_spans_the_map(tmp_path, low):
    h, w = 30, 40
    pred = np.full((h, w), 0.2)
    pred[5:10, 5:10] = 1.5  # the maximum
    pred[20:25, 30:35] = low  # the minimum (negative: a model's map can dip below zero)
    layout = viz.save_picture(tmp_path / "p.png", np.zeros((h, w, 3), np.uint8), pred)
    png = _read(tmp_path / "p.png")
    top, bottom = _colour_bar_ends(png, layout)
    assert top >= 0.97 and bottom <= 0.03  # the bar runs from the colormap's last colour to its first
    x0, y0, x1, _ = layout.panels[1]
    k = (x1 - x0) // w
    at = lambda y, x: png[y0 + y * k + k // 2, x0 + x * k + k // 2]  # noqa: E731
    assert _value(at(7, 7)) == pytest.approx(1.0, abs=0.005)  # the map's maximum: the bar's top colour
    assert _value(at(22, 32)) == pytest.approx(0.0, abs=0.005)  # its minimum: the bottom colour
    assert _value(at(15, 20)) == pytest.approx((0.2 - low) / (1.5 - low), abs=0.01)


def test_predicted_and_true_maps_share_one_scale(tmp_path):
    h, w = 20, 20
    pred = np.full((h, w), 0.5)
    truth = np.zeros((h, w))
    truth[2:6, 2:6] = 2.0
    layout = viz.save_picture(tmp_path / "p.png", np.zeros((h, w, 3), np.uint8), pred, truth=truth)
    png = _read(tmp_path / "p.png")
    k = (layout.panels[1][2] - layout.panels[1][0]) // w
    pred_px = png[layout.panels[1][1] + 10 * k, layout.panels[1][0] + 10 * k]
    true_hi = png[layout.panels[2][1] + 3 * k, layout.panels[2][0] + 3 * k]
    true_lo = png[layout.panels[2][1] + 15 * k, layout.panels[2][0] + 15 * k]
    assert _value(pred_px) == pytest.approx(0.25, abs=0.01)  # 0.5 on [0, 2]
    assert _value(true_hi) == pytest.approx(1.0, abs=0.005) and _value(true_lo) == pytest.approx(0.0, abs=0.005)


def test_titles_flag_a_negative_total(tmp_path, monkeypatch):
    assert viz.picture_title("a.jpg", 12.34) == "a.jpg: predicted 12.3"
    assert viz.picture_title("a.jpg", 12.34, 10) == "a.jpg: predicted 12.3, true 10 (error +2.3)"
    neg = viz.picture_title("a.jpg", -3.21, 4)
    assert "predicted -3.2" in neg and "NEGATIVE" in neg and "true 4" in neg
    titles = []
    real = viz.picture_title
    monkeypatch.setattr(viz, "picture_title", lambda *a: titles.append(real(*a)) or titles[-1])
    pred = np.full((10, 10), -0.05)
    viz.save_picture(tmp_path / "neg.png", np.zeros((10, 10, 3), np.uint8), pred, name="crowd")
    assert titles == ["crowd: predicted -5.0 (NEGATIVE total: the model's map sums below zero)"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"predicted must be the image's size \(10, 12\)"):
        viz.save_picture(tmp_path / "p.png", np.zeros((10, 12, 3), np.uint8), np.zeros((5, 6)))
    with pytest.raises(ValueError, match=r"image must be"):
        viz.save_picture(tmp_path / "p.png", np.zeros((10, 12)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match="two lists of one length"):
        viz.save_scatter(tmp_path / "s.png", [1, 2], [1])


def test_scatter_and_learning_curve(tmp_path):
    viz.save_scatter(tmp_path / "s.png", [10, 20, 30], [12, 18, 33])
    assert _read(tmp_path / "s.png").shape == (640, 640, 3)
    history = [{"epoch": e, "loss": {"total": 1.0 / e}, "val": {"mae": 5.0 / e}} for e in (1, 2, 3)]
    viz.save_learning_curve(tmp_path / "c.png", history, baseline_mae=6.0)
    assert _read(tmp_path / "c.png").shape == (400, 640, 3)
