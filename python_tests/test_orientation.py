"""EXIF orientation (issue 21, item 4): a phone photo stored sideways is read upright everywhere an image is
read (load_image, the datasets and training, the density job, the Counter, the pictures), and the head points
annotated on its stored pixels are turned with it."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import crowdkernels as ck
from crowdkernels import cli
from crowdkernels.data import (CrowdDataset, image_points, image_size, list_samples, load_image, orient_points,
                               pil_to_rgb)
from crowdkernels.data.readers import count_inside, exif_orientation, oriented_size
from crowdkernels.data.density_job import DensitySettings, run_density_job
from crowdkernels.models import registry as train_mod
from crowdkernels.engine.checkpoint import save_checkpoint
from crowdkernels.engine.config import TrainConfig
from test_engine import TinyNet
from test_viz import _documented_size

H, W = 60, 90  # stored size: landscape, so that orientations 5-8 show a portrait
#: heads on the stored pixels, each on a bright 9 x 9 block (JPEG keeps it bright at its centre)
HEADS = np.array([[12.5, 10.5], [70.5, 20.5], [40.5, 47.5]])


def _with_orientation(im: Image.Image, orientation: int, format: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=format, exif=exif, **({"quality": 95} if format == "JPEG" else {}))
    return buf.getvalue()


def _photo(path, orientation: int, format: str = "JPEG"):
    """A dark (H, W) image with a bright block on each of HEADS, saved with an EXIF orientation."""
    arr = np.full((H, W, 3), 20, np.uint8)
    arr[:, :, 2] = np.linspace(0, 120, W, dtype=np.uint8)[None, :]  # not symmetric: a turn changes the pixels
    for x, y in HEADS:
        arr[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5] = 250
    path.write_bytes(_with_orientation(Image.fromarray(arr), orientation, format))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_points_turn_as_exif_transpose_turns_the_pixels(orientation):
    h, w = 5, 7
    rng = np.random.default_rng(orientation)
    marks = [(i, j) for i in range(h) for j in range(w)]
    arr = np.zeros((h, w), np.uint8)
    for k, (i, j) in enumerate(marks):
        arr[i, j] = k + 1  # every pixel its own value: where each one goes is read off the turned image
    with Image.open(io.BytesIO(_with_orientation(Image.fromarray(arr), orientation, "PNG"))) as im:
        assert exif_orientation(im) == orientation
        turned = np.asarray(ImageOps.exif_transpose(im))
    assert turned.shape == oriented_size((h, w), orientation)
    # a point anywhere inside a stored pixel (not on its edges) lands inside the pixel exif_transpose moved it to
    frac = rng.uniform(0.05, 0.95, size=(len(marks), 2))
    pts = np.array([[j, i] for i, j in marks], dtype=np.float64) + frac
    moved = orient_points(pts, orientation, (h, w))
    for k, (x, y) in enumerate(moved):
        assert turned[int(np.floor(y)), int(np.floor(x))] == k + 1, (orientation, marks[k], (x, y))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_points_keep_their_side_of_the_border(orientation):
    h, w = 6.0, 9.0
    inside = np.array([[0, 0], [0, 5.9], [8.999, 0], [8.999, 5.999], [4.5, 0], [0, 3]])
    outside = np.array([[9, 0], [0, 6], [-0.5, 2], [3, -1e-9], [9, 6], [12, 7]])
    for pts, n in ((inside, len(inside)), (outside, 0)):
        moved = orient_points(pts, orientation, (h, w))
        assert count_inside(moved, oriented_size((6, 9), orientation)) == n


def test_orient_points_refuses_what_is_not_an_orientation():
    for bad in (0, 9, 1.0, True, "6"):
        with pytest.raises(ValueError, match=r"orientation must be an EXIF orientation 1-8, got"):
            orient_points(np.zeros((1, 2)), bad, (4, 4))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_load_image_and_its_size_are_upright(tmp_path, orientation):
    path = _photo(tmp_path / "photo.jpg", orientation)
    with Image.open(path) as im:
        want = pil_to_rgb(ImageOps.exif_transpose(im))
    got = load_image(path)
    assert tuple(got.shape) == (3, *oriented_size((H, W), orientation)) == (3, *image_size(path))
    assert torch.equal(got, want)
    # a Pillow image given to the library is turned alike
    with Image.open(path) as im:
        assert torch.equal(pil_to_rgb(im), want)


def _folder(root, orientation):
    root.mkdir()
    for name, o in (("upright", 1), ("sideways", orientation)):
        _photo(root / f"{name}.jpg", o)
        (root / f"{name}.txt").write_text("".join(f"{x} {y}\n" for x, y in HEADS))
    return root


@pytest.mark.parametrize("orientation", [2, 6, 8])
def test_a_dataset_turns_the_annotated_points_with_the_image(tmp_path, orientation):
    root = _folder(tmp_path / "crowds", orientation)
    samples = list_samples(root, "folder")
    data = CrowdDataset(samples)
    for k, s in enumerate(samples):
        item = data[k]
        img, pts = item["image"], item["points"].numpy()
        assert tuple(img.shape[-2:]) == s.size() == oriented_size((H, W), s.orientation())
        assert pts.shape == (3, 2)
        for x, y in pts:  # every head is on its bright block in the image the model is trained on
            assert img[:, int(y), int(x)].min() > 0.85, (s.name, x, y)
        with Image.open(s.image) as im:
            assert np.allclose(pts, image_points(HEADS, s.image)) and np.allclose(
                pts, orient_points(HEADS, exif_orientation(im), (H, W)))
    assert data.samples[0].orientation() == orientation  # "sideways" sorts first

    # the density job maps the upright image: each head's mass where the head is
    out = tmp_path / "maps"
    manifest = run_density_job(root, "folder", out, DensitySettings(sigma=2.0), progress=False)
    entry = manifest["images"]["sideways"]
    assert entry["size"] == list(oriented_size((H, W), orientation)) and entry["orientation"] == orientation
    dm = np.load(out / "sideways.npy")
    assert dm.shape == oriented_size((H, W), orientation)
    for x, y in data[0]["points"].numpy():
        block = dm[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
        assert block.sum() > 0.8  # a sigma-2 Gaussian holds > 0.8 within +-3.5 px of its head
    # a map recorded without the orientation (made before it was applied) is not reused
    assert run_density_job(root, "folder", out, DensitySettings(sigma=2.0), progress=False)["summary"]["reused"] == 2
    import json

    m = json.loads((out / "manifest.json").read_text())
    del m["images"]["sideways"]["orientation"]
    (out / "manifest.json").write_text(json.dumps(m))
    again = run_density_job(root, "folder", out, DensitySettings(sigma=2.0), progress=False)["summary"]
    assert (again["reused"], again["written"]) == (1, 1)


@pytest.fixture
def tiny_ckpt(monkeypatch, tmp_path):
    monkeypatch.setitem(train_mod.MODEL_BUILDERS, "csrnet", lambda **kw: TinyNet(8))
    torch.manual_seed(0)
    net = TinyNet(8)
    cfg = TrainConfig(out=str(tmp_path / "run"), model="csrnet", dataset="synthetic", input_norm=None)
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, {"model_name": "csrnet", "config": cfg.to_dict(), "model": net.state_dict(), "epoch": 1, "step": 0})
    return path


def test_the_counter_counts_and_draws_a_sideways_photo_upright(tiny_ckpt, tmp_path, capsys):
    photo = _photo(tmp_path / "phone.jpg", 8)
    with Image.open(photo) as im:
        shown = ImageOps.exif_transpose(im)
    counter = ck.load(tiny_ckpt, "cpu")
    pred = counter.predict(photo)
    assert pred.size == (W, H)  # portrait, as a viewer shows it
    assert pred.count == pytest.approx(counter.count(shown), rel=1e-6)
    assert pred.count != pytest.approx(counter.count(np.asarray(Image.open(photo))), rel=1e-3)  # not the stored pixels
    assert tuple(counter.density(photo).shape) == (W, H)

    # count --save-dir: the picture is of the upright photo, with the point file's heads turned with it
    (tmp_path / "phone.txt").write_text("".join(f"{x} {y}\n" for x, y in HEADS))
    assert cli.main(["count", str(photo), "--checkpoint", str(tiny_ckpt), "--save-dir", str(tmp_path / "pics")]) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "pics" / "phone.png") as im:
        assert im.size == _documented_size(W, H, 3)  # image | predicted | true, each W x H (portrait)
