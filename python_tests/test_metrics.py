"""Counting metrics against hand-computed values: MAE, "MSE" (an RMSE), NAE, GAME(0-3) from maps and
from points, per-level breakdowns, and the reduction across processes."""
from __future__ import annotations

import math

import pytest
import torch

from crowdkernels.data import DENSITY_LEVELS, density_level
from crowdkernels.engine.metrics import CountMetrics, game, grid_counts, grid_counts_from_points


def test_mae_mse_nae_by_hand():
    m = CountMetrics(game_levels=0)
    for pred, true in [(10, 12), (7, 4), (0, 0), (30, 25)]:
        m.update(pred, true)
    r = m.compute()
    assert r["images"] == 4
    assert r["mae"] == pytest.approx((2 + 3 + 0 + 5) / 4)
    assert r["mse"] == pytest.approx(math.sqrt((4 + 9 + 0 + 25) / 4))  # root of the mean squared error
    assert r["nae"] == pytest.approx((2 / 12 + 3 / 4 + 5 / 25) / 3)  # the empty image is left out
    assert "game0" not in r  # no GAME given


def test_grid_counts_by_hand():
    d = torch.arange(16.0).reshape(4, 4)
    assert grid_counts(d, 0).tolist() == [[120.0]]
    # 2 x 2 cells of 2 x 2 pixels
    assert grid_counts(d, 1).tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
    assert torch.equal(grid_counts(d, 2), d.double())
    # odd sizes: cell rows [0, round(5/2)=2) and [2, 5)
    e = torch.ones(5, 3)
    assert grid_counts(e, 1).tolist() == [[2.0 * 2, 2.0 * 1], [3.0 * 2, 3.0 * 1]]


def test_game_by_hand():
    pred = torch.zeros(4, 4)
    pred[0, 0] = 3.0  # top-left cell
    pred[3, 3] = 1.0  # bottom-right cell
    true = torch.zeros(4, 4)
    true[0, 3] = 2.0  # top-right cell
    true[3, 2] = 1.0  # bottom-right cell
    true[1, 1] = 1.0  # top-left cell
    assert game(pred, true, 0) == pytest.approx(abs(4 - 4))
    # cells: TL 3 vs 1, TR 0 vs 2, BL 0 vs 0, BR 1 vs 1
    assert game(pred, true, 1) == pytest.approx(2 + 2 + 0 + 0)
    # pixel level: |3-0| + |1-0| + |0-2| + |0-1| + |0-1| (pixel [3,3]: 1 vs 0, [3,2]: 0 vs 1)
    assert game(pred, true, 2) == pytest.approx(3 + 1 + 2 + 1 + 1)
    assert game(pred, true, 3) == pytest.approx(game(pred, true, 2))  # cells finer than pixels: empty ones add 0


def test_game_from_points_on_a_coarser_map():
    # an 8 x 8 image, a 4 x 4 map (stride 2): point (x=5.5, y=1.2) is in map pixel (0, 2)
    pred = torch.zeros(1, 1, 4, 4)
    pred[..., 0, 2] = 1.0
    pts = torch.tensor([[5.5, 1.2], [0.5, 7.9], [8.0, 1.0]])  # the last one is outside the image
    g = grid_counts_from_points(pts, (8, 8), (4, 4), 1)
    assert g.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert game(pred, pts, 0, image_size=(8, 8)) == pytest.approx(1.0)
    assert game(pred, pts, 1, image_size=(8, 8)) == pytest.approx(1.0)  # BL cell misses one head
    with pytest.raises(ValueError, match="shape"):
        game(pred, torch.zeros(8, 8), 1)
    with pytest.raises(ValueError, match="level"):
        game(pred, pts, -1, image_size=(8, 8))


def test_levels_breakdown_and_reduce():
    assert [density_level(c) for c in (0, 50, 51, 500, 501, 4000)] == ["low", "low", "medium", "medium", "high", "high"]
    m = CountMetrics(game_levels=1, levels=DENSITY_LEVELS)
    m.update(40, 30, games=[10, 12])
    m.update(300, 320, games=[20, 30])
    m.update(900, 1000, games=[100, 150])
    m.update(60, 50, games=[10, 10])
    r = m.compute()
    assert r["levels"]["low"] == pytest.approx({"images": 2, "mae": 10.0, "mse": 10.0, "nae": (10 / 30 + 10 / 50) / 2, "game0": 10.0, "game1": 11.0})
    assert r["levels"]["medium"]["mae"] == 20.0 and r["levels"]["high"]["images"] == 1
    assert r["game1"] == pytest.approx((12 + 30 + 150 + 10) / 4)
    # a two-process all-reduce is a sum of the accumulators
    m.reduce(lambda t: t * 2)
    r2 = m.compute()
    assert r2["images"] == 8 and r2["mae"] == pytest.approx(r["mae"]) and r2["mse"] == pytest.approx(r["mse"])
    with pytest.raises(ValueError, match="games"):
        m.update(1, 1, games=[1])
