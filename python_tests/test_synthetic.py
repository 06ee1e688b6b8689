"""The synthetic crowd generator: deterministic, points inside the image, and the points match the
rendering (every head point sits on a dark head, every dark pixel belongs to an annotated head)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from crowdkernels.data import synthetic as syn
from crowdkernels.data import SyntheticCrowds, render_crowd, synthetic_dataset


@pytest.fixture(scope="module")
def default_set():
    start = time.perf_counter()
    samples = synthetic_dataset()  # the defaults the demo and later the training demo use
    return samples, time.perf_counter() - start


def test_default_set_is_small_fast_and_sparse_to_dense(default_set):
    samples, seconds = default_set
    assert len(samples) == 20
    assert all(s.size == (128, 128) and s.image.dtype == np.uint8 and s.image.shape == (128, 128, 3) for s in samples)
    assert seconds < 5.0
    counts = [s.count for s in samples]
    assert counts[0] <= 10 and counts[-1] >= 80  # from a handful of people to a dense crowd
    assert np.corrcoef(np.arange(len(counts)), counts)[0, 1] > 0.9
    assert [s.name for s in samples] == [f"synthetic_{i:04d}" for i in range(20)]


def test_deterministic_from_the_seed():
    a = synthetic_dataset(4, 64, seed=7)
    b = synthetic_dataset(4, 64, seed=7)
    c = synthetic_dataset(4, 64, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.points, y.points)
    assert any(x.count != z.count or not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    # any one sample regenerates alone, in any order, from its (seed, index)
    ds = SyntheticCrowds(4, 64, seed=7, cache=False)
    np.testing.assert_array_equal(ds.sample(2).image, a[2].image)
    np.testing.assert_array_equal(ds.sample(-1).points, a[3].points)
    one = render_crowd((7, 2), 64, density=a[2].density, name="x")
    np.testing.assert_array_equal(one.image, a[2].image)
    np.testing.assert_array_equal(one.points, a[2].points)


def test_dataset_cache_and_bounds():
    ds = SyntheticCrowds(3, 32, seed=1)
    assert len(ds) == 3 and ds.sample(1) is ds.sample(1)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="num_images"):
        SyntheticCrowds(0)
    with pytest.raises(ValueError, match="seed"):
        SyntheticCrowds(2, seed=-1)


def test_points_inside_and_perspective(default_set):
    samples, _ = default_set
    for s in samples:
        h, w = s.size
        assert s.points.dtype == np.float64 and s.points.shape == (s.count, 2)
        assert (s.points[:, 0] >= 0).all() and (s.points[:, 0] < w).all()
        assert (s.points[:, 1] >= 0).all() and (s.points[:, 1] < h).all()
        # head size follows the perspective gradient: small at the top, large at the bottom
        np.testing.assert_allclose(s.radii, syn.head_radius(s.points[:, 1], h))
    assert syn.head_radius(0, 128) < syn.head_radius(64, 128) < syn.head_radius(127, 128)
    assert syn.head_radius(127, 128) / syn.head_radius(0, 128) > 3


def test_points_match_the_rendering(default_set):
    samples, _ = default_set
    for s in samples:
        h, w = s.size
        lum = syn.luminance(s.image)
        # 1. every annotated head is drawn: the pixel holding the point is head-dark
        rows = np.floor(s.points[:, 1]).astype(int)
        cols = np.floor(s.points[:, 0]).astype(int)
        assert (lum[rows, cols] <= syn.HEAD_LUMINANCE_MAX).all(), s.name
        # 2. no unannotated head: every head-dark pixel lies within its head's radius + 1 px of a point
        yy, xx = np.nonzero(lum <= syn.HEAD_LUMINANCE_MAX)
        if s.count == 0:
            assert yy.size == 0
            continue
        d = np.hypot(xx[:, None] + 0.5 - s.points[None, :, 0], yy[:, None] + 0.5 - s.points[None, :, 1])
        assert (d <= s.radii[None, :] + 1.0).any(axis=1).all(), s.name
        # 3. away from every person (head disk and shoulder ellipse, with a margin) it is bright ground
        py, px = np.mgrid[0:h, 0:w] + 0.5
        person = np.zeros((h, w), dtype=bool)
        for (x, y), r in zip(s.points, s.radii):
            person |= np.hypot(px - x, py - y) <= r + 1.5
            person |= ((px - x) / (2.0 * r + 1.5)) ** 2 + ((py - y - 1.9 * r) / (1.1 * r + 1.5)) ** 2 <= 1
        assert (lum[~person] >= syn.BACKGROUND_LUMINANCE_MIN).all(), s.name
        # the head-dark pixels are a sizeable share of the drawn heads' area, not isolated specks
        assert yy.size >= 0.5 * np.pi * np.min(s.radii) ** 2 * min(s.count, 5)


def test_image_and_points_tensors():
    s = render_crowd(3, (48, 80))
    t = s.image_tensor()
    assert t.shape == (3, 48, 80) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy() * 255.0, s.image, atol=1e-4)
    p = s.points_tensor()
    assert p.dtype == torch.float32 and p.shape == (s.count, 2)
    assert s.points_tensor(torch.float64).dtype == torch.float64


def test_head_count_range():
    sparse = render_crowd(0, 96, density=0.0)
    dense = render_crowd(0, 96, density=1.0)
    assert sparse.count == 3
    assert dense.count > 50
    assert render_crowd(0, 64, density=0.0, min_heads=0).count == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        render_crowd(0, 8)
    with pytest.raises(TypeError, match="size"):
        render_crowd(0, (32, 32, 3))
    with pytest.raises(ValueError, match="density"):
        render_crowd(0, 32, density=1.5)
    with pytest.raises(ValueError, match="max_heads"):
        render_crowd(0, 32, min_heads=5, max_heads=2)
