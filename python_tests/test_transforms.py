"""Transforms move images, points and density maps together: maps made from the transformed points match
the transformed maps, and the count is kept (or is the heads inside a crop); the ragged-points collate."""
from __future__ import annotations

import pytest
import torch

import crowdkernels as ck
from crowdkernels.data import Compose, CrowdCollate, DensityTarget, RandomCrop, RandomHorizontalFlip, Resize, resized_shape
from crowdkernels.data.transforms import crop_sample, flip_sample, resize_density, resize_sample


def _sample(h=40, w=56, n=12, seed=0, sigma=1.5):
    g = torch.Generator().manual_seed(seed)
    # points away from the borders so the Gaussians (truncate 4 sigma) stay inside
    pts = torch.rand(n, 2, generator=g) * torch.tensor([w - 16.0, h - 16.0]) + 8.0
    image = torch.rand(3, h, w, generator=g)
    return {"image": image, "points": pts, "density": ck.density_map(pts, (h, w), sigma=sigma), "name": "s"}


def test_resize_policies():
    assert resized_shape(6000, 9000, max_size=(1920, 1080)) == (1080, 1620)  # fits the box, either way round
    assert resized_shape(9000, 6000, max_size=(1920, 1080)) == (1620, 1080)
    assert resized_shape(700, 1000, max_size=(1920, 1080)) == (700, 1000)  # never enlarged by a cap
    assert resized_shape(100, 300, max_size=150) == (50, 150)
    assert resized_shape(100, 300, min_size=128) == (128, 384)
    assert resized_shape(100, 300, min_size=128, max_size=320) == (107, 320)  # the cap wins
    assert resized_shape(100, 310, multiple=16) == (96, 304)
    with pytest.raises(ValueError, match="multiple"):
        Resize(multiple=0)


def test_flip_keeps_points_and_map_aligned():
    s = _sample()
    f = flip_sample(s)
    assert torch.equal(f["image"], s["image"].flip(-1))
    torch.testing.assert_close(flip_sample(f)["points"], s["points"])
    # the map of the flipped points is the flipped map (same sigma, mirrored grid)
    torch.testing.assert_close(ck.density_map(f["points"], (40, 56), sigma=1.5), f["density"], atol=1e-5, rtol=1e-4)
    # a point inside pixel j lands inside pixel W-1-j
    j = torch.floor(s["points"][:, 0]).long()
    assert torch.equal(torch.floor(f["points"][:, 0]).long(), 56 - 1 - j)


def test_crop_keeps_the_heads_inside_and_the_map_aligned():
    s = _sample(n=30, seed=1)
    c = crop_sample(s, 5, 9, 24, 30)
    x, y = s["points"][:, 0], s["points"][:, 1]
    inside = (x >= 9) & (x < 39) & (y >= 5) & (y < 29)
    assert c["points"].shape[0] == int(inside.sum())
    torch.testing.assert_close(c["points"], s["points"][inside] - torch.tensor([9.0, 5.0]))
    assert torch.equal(c["image"], s["image"][:, 5:29, 9:39])
    # mass near the window edge belongs to heads on either side, so compare away from the edges
    remade = ck.density_map(c["points"], (24, 30), sigma=1.5)
    assert float(c["density"].sum()) == pytest.approx(float(remade.sum()), abs=1.5)
    # a window past the image is zero padding, with no heads in it
    big = crop_sample(s, -4, 50, 20, 20)
    assert big["image"].shape == (3, 20, 20) and float(big["image"][:, :4].abs().sum()) == 0.0
    assert float(big["image"][:, :, 6:].abs().sum()) == 0.0
    assert big["points"].shape[0] == int(((x >= 50) & (y < 16)).sum())


def test_resize_scales_points_and_keeps_the_count():
    s = _sample(h=48, w=64, n=10, seed=2, sigma=2.0)
    r = resize_sample(s, (24, 32))
    torch.testing.assert_close(r["points"], s["points"] * 0.5)
    assert float(r["density"].sum()) == pytest.approx(float(s["density"].sum()), rel=1e-5)
    # the map's mass stays where the heads are: centroids agree with the scaled points' map
    remade = ck.density_map(r["points"], (24, 32), sigma=1.0)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    for m in (r["density"], remade):
        assert float((m * xx).sum() / m.sum()) == pytest.approx(float((remade * xx).sum() / remade.sum()), abs=0.3)
    up = resize_density(s["density"], (96, 128))
    assert float(up.sum()) == pytest.approx(float(s["density"].sum()), rel=1e-5)


def test_random_transforms_are_reproducible_and_keep_counts():
    s = _sample(n=40, seed=3)
    t = Compose([Resize(min_size=48, multiple=16), RandomCrop(32), RandomHorizontalFlip()])
    torch.manual_seed(5)
    a = t(s)
    torch.manual_seed(5)
    b = t(s)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["points"], b["points"])
    assert a["image"].shape == (3, 32, 32)
    assert ((a["points"] >= 0) & (a["points"] < 32)).all()
    remade = ck.density_map(a["points"], (32, 32))
    assert float(remade.sum()) == pytest.approx(a["points"].shape[0], rel=1e-5)
    half = RandomCrop(fraction=0.5)(s)
    assert half["image"].shape == (3, 20, 28)
    with pytest.raises(ValueError, match="fraction"):
        RandomCrop(fraction=1.5)


def test_collate_pads_and_keeps_ragged_points():
    items = [
        {"image": torch.rand(3, 20, 30), "points": torch.tensor([[1.0, 2.0], [25.0, 15.0]]), "name": "a"},
        {"image": torch.rand(3, 17, 33), "points": torch.zeros(0, 2), "name": "b"},
        {"name": "c", "error": "c.jpg: cannot decode the image"},
    ]
    batch = CrowdCollate(DensityTarget(), multiple=8)(items)
    assert batch["images"].shape == (2, 3, 24, 40)
    assert batch["sizes"] == [(20, 30), (17, 33)] and batch["names"] == ["a", "b"]
    assert [p.shape[0] for p in batch["points"]] == [2, 0]
    assert batch["counts"].tolist() == [2.0, 0.0]
    assert batch["density"].shape == (2, 1, 24, 40)
    assert batch["density"].sum(dim=(1, 2, 3)).tolist() == pytest.approx([2.0, 0.0], abs=1e-5)
    assert batch["skipped"] == [("c", "c.jpg: cannot decode the image")]
    assert float(batch["images"][1, :, 17:].abs().sum()) == 0.0
