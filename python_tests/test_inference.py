"""The one-line inference API (crowdkernels.load, Counter, Prediction): the same counts as `crowdkernels eval`
for every model, every accepted kind of image, density maps at image resolution that keep the count,
many images in batches, tiling, and the errors for images it must refuse."""
from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import crowdkernels as ck
from crowdkernels import cli
from crowdkernels.data import ImageError
from crowdkernels.engine import predict_density
from crowdkernels.engine.checkpoint import CheckpointError, save_checkpoint
from crowdkernels.engine.predict import cell_stride, spread_cells
from crowdkernels.engine.config import TrainConfig
from crowdkernels.inference import as_rgb, image_paths
from crowdkernels.models import MODEL_NAMES, build_model
from test_engine import TinyNet

WIDTH = 0.125


def _checkpoint(path, name: str, seed: int = 0):
    """A checkpoint as `crowdkernels train` writes it, of a freshly initialized small model."""
    torch.manual_seed(seed)
    net = build_model(name, width=WIDTH)
    cfg = TrainConfig(out=str(path.parent), model=name, model_kwargs={"width": WIDTH}, dataset="folder")
    save_checkpoint(path, {"model_name": name, "config": cfg.to_dict(), "model": net.state_dict(), "epoch": 1, "step": 0})
    return path


def _crowd_png(path, h=61, w=77, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "crowds"
    root.mkdir()
    _crowd_png(root / "a.png")
    (root / "a.txt").write_text("10 12\n30.5 40\n70 55\n")
    return root


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_load_count_equals_eval_for_every_model(name, folder, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run" / "best.pt", name)
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--root", str(folder), "--workers", "0",
                     "--out", str(report)]) == 0
    (row,) = json.loads(report.read_text())["per_image"]
    counter = ck.load(ckpt, device="cpu")
    assert counter.info["model"] == name
    count = counter.count(folder / "a.png")
    assert row["pred"] != 0.0 and count == pytest.approx(row["pred"], rel=1e-6, abs=1e-9)
    density = counter.density(folder / "a.png")
    assert density.shape == (61, 77) and density.dtype == torch.float32
    assert float(density.sum(dtype=torch.float64)) == pytest.approx(count, rel=1e-5, abs=1e-6)
    with pytest.raises(CheckpointError, match="'csrnet'" if name != "csrnet" else "'spn'"):
        ck.load(ckpt, model="csrnet" if name != "csrnet" else "spn")


def _tiny_counter(**kw):
    torch.manual_seed(0)
    return ck.Counter(TinyNet(4), "cpu", input_norm=kw.pop("input_norm", "imagenet"), **kw)


def test_every_kind_of_image_gives_the_same_count(tmp_path):
    counter = _tiny_counter()
    rng = np.random.default_rng(1)
    rgb8 = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb8).save(path)
    ref = counter.count(path)
    as_float = rgb8.astype(np.float32) / 255
    kinds = {
        "str": str(path), "pil": Image.open(path), "uint8 array": rgb8, "float array": as_float,
        "uint16 array": rgb8.astype(np.uint16) * 257, "tensor": torch.from_numpy(as_float).permute(2, 0, 1),
        "batched tensor": torch.from_numpy(as_float).permute(2, 0, 1)[None],
        "uint8 tensor": torch.from_numpy(rgb8).permute(2, 0, 1),
    }
    for kind, image in kinds.items():
        assert counter.count(image) == pytest.approx(ref, rel=1e-6), kind
    gray = rgb8[:, :, 0]
    assert counter.count(gray) == pytest.approx(counter.count(np.repeat(gray[:, :, None], 3, axis=2)), rel=1e-6)
    assert torch.equal(as_rgb(Image.fromarray(gray)), as_rgb(gray))


def test_images_the_counter_refuses(tmp_path):
    counter = _tiny_counter()
    normalized = (torch.rand(3, 20, 20) - 0.485) / 0.229
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\].*do not normalize"):
        counter.count(normalized)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[255, 255\]"):
        counter.count(np.full((8, 8, 3), 255.0))
    with pytest.raises(ValueError, match="NaN"):
        counter.count(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        counter.count(torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        counter.count(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(TypeError, match="path, a PIL image"):
        counter.count([1, 2, 3])
    with pytest.raises(TypeError, match="int32"):
        counter.count(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(ImageError, match="nothere.jpg.*not found"):
        counter.count(tmp_path / "nothere.jpg")
    with pytest.raises(TypeError, match="input_norm"):
        ck.Counter(torch.nn.Conv2d(3, 1, 1))
    with pytest.raises(ValueError, match="no CUDA GPU") if not torch.cuda.is_available() else pytest.raises(CheckpointError):
        ck.load(tmp_path / "missing.pt", device="cuda")


def test_density_spreads_each_cell_over_its_pixels():
    """Stride 2 (TinyNet) on 61 x 77: the last row and column of cells cover one pixel, not two."""
    counter = _tiny_counter()
    image = torch.rand(3, 61, 77)
    pred = counter.predict(image)
    cells = pred.cells.double()
    assert cells.shape == (31, 39)
    d = pred.density().double()
    rows = torch.tensor([2.0] * 30 + [1.0])
    cols = torch.tensor([2.0] * 38 + [1.0])
    expected = (cells / (rows[:, None] * cols[None, :])).repeat_interleave(rows.long(), 0).repeat_interleave(cols.long(), 1)
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-9)
    assert float(d.sum()) == pytest.approx(pred.count, rel=1e-6)


def test_max_size_shrinks_for_the_model_and_spreads_back():
    counter = _tiny_counter(max_size=64)
    image = torch.rand(3, 120, 160)
    pred = counter.predict(image)
    assert pred.input_size == (48, 64) and pred.cells.shape == (24, 32) and pred.size == (120, 160)
    d = pred.density()
    assert d.shape == (120, 160)
    assert float(d.sum(dtype=torch.float64)) == pytest.approx(pred.count, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), k=st.integers(0, 4), grow=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_spread_cells_keeps_the_sum(h, w, k, grow, seed):
    s = 2**k
    cells = torch.from_numpy(np.random.default_rng(seed).normal(size=(-(-h // s), -(-w // s))))
    got = cell_stride(cells.shape, (h, w))
    assert got == s or cells.shape == (1, 1)  # other strides fit only when one cell covers the image
    assert (-(-h // got), -(-w // got)) == tuple(cells.shape)
    # at the model input's size, and spread back over an image `grow` times larger
    for size in ((h, w), (h * grow, w * grow)):
        d = spread_cells(cells, size, (h, w))
        assert d.shape == size
        assert float(d.double().sum()) == pytest.approx(float(cells.sum()), rel=1e-5, abs=1e-4)


def test_predict_density_batches_images_of_one_size():
    torch.manual_seed(0)
    model = TinyNet(4).eval()
    images = torch.rand(3, 3, 70, 90)
    for tile, overlap in ((None, 64), (64, 16)):
        batched = predict_density(model, images, tile=tile, overlap=overlap)
        single = torch.cat([predict_density(model, im, tile=tile, overlap=overlap) for im in images])
        assert batched.shape == (3, 1, 35, 45)
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_tiled_counter_matches_untiled():
    image = torch.rand(3, 150, 230)
    whole = _tiny_counter(tile=None).count(image)
    tiled = _tiny_counter(tile=64, overlap=16).count(image)
    assert tiled == pytest.approx(whole, rel=1e-5)


def test_count_many_batches_folders_globs_and_errors(tmp_path, capsys):
    counter = _tiny_counter()
    shots = tmp_path / "shots"
    shots.mkdir()
    paths = [_crowd_png(shots / f"img{i}.png", 40 if i < 3 else 48, 56, seed=i) for i in (1, 2, 10, 3)]
    (shots / "notes.txt").write_text("not an image")
    single = [counter.count(p) for p in paths]
    capsys.readouterr()
    assert image_paths(shots) == [shots / "img1.png", shots / "img2.png", shots / "img3.png", shots / "img10.png"]
    assert image_paths(str(shots / "img1*.png")) == [shots / "img1.png", shots / "img10.png"]
    for batch in (1, 3):
        got = counter.count_many(paths, batch_size=batch)
        assert got == pytest.approx(single, rel=1e-5)
    # a folder (natural order: img1, img2, img3, img10) and a pattern
    by_folder = counter.count_many(shots, batch_size=2)
    assert by_folder == pytest.approx([single[0], single[1], single[3], single[2]], rel=1e-5)
    assert counter.count_many(str(shots / "img1*.png")) == pytest.approx([single[0], single[2]], rel=1e-5)
    # not a terminal: no bar frames, one line per job on stderr, nothing on stdout
    captured = capsys.readouterr()
    assert captured.out == "" and "\r" not in captured.err
    assert captured.err.count("count: 4/4 img in") == 3 and captured.err.count("count: 2/2 img in") == 1
    assert captured.err.count("\n") == 4 and "(done)" in captured.err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg.*cannot decode"):
        counter.count_many([paths[0], broken])
    assert re.fullmatch(r"count: 1/2 img in [0-9.]+ s \(stopped\)\n", capsys.readouterr().err)
    with pytest.warns(UserWarning, match="broken.jpg"):
        got = counter.count_many([paths[0], broken, paths[1]], errors="skip", progress=False)
    assert got[0] == pytest.approx(single[0], rel=1e-5) and math.isnan(got[1]) and got[2] == pytest.approx(single[1], rel=1e-5)
    assert capsys.readouterr().err.count("count:") == 0  # progress=False: silent
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        counter.predictions(paths, 0)  # at the call, not at the first image
    with pytest.raises(ValueError, match="errors must be"):
        counter.count_many(paths, errors="ignore")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without images"):
        counter.count_many(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image matches"):
        image_paths(str(tmp_path / "*.tiff"))


def test_count_many_with_worker_processes(tmp_path):
    counter = _tiny_counter()
    paths = [_crowd_png(tmp_path / f"w{i}.png", 32, 40, seed=i) for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    with pytest.warns(UserWarning, match="bad.png"):
        got = counter.count_many(paths + [bad], batch_size=2, workers=2, errors="skip", progress=False)
    assert got[:3] == pytest.approx([counter.count(p) for p in paths], rel=1e-5) and math.isnan(got[3])


def test_amp_on_the_cpu_warns_and_runs_in_float32():
    with pytest.warns(UserWarning, match="amp.*GPUs only"):
        counter = _tiny_counter(amp=True)
    assert counter.amp is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(counter.count(torch.rand(3, 20, 20)))


def test_count_images_example(folder, tmp_path, capsys):
    import runpy

    from conftest import REPO
    from test_viz import _documented_size

    ckpt = _checkpoint(tmp_path / "run" / "best.pt", "csrnet")
    main = runpy.run_path(str(REPO / "examples" / "count_images.py"))["main"]
    counts = main(ckpt, [folder / "a.png"], tmp_path / "pics")
    assert counts == {str(folder / "a.png"): pytest.approx(ck.load(ckpt).count(folder / "a.png"), rel=1e-6)}
    assert "people" in capsys.readouterr().out
    with Image.open(tmp_path / "pics" / "a.png") as im:
        assert im.size == _documented_size(61, 77, 3)  # a.txt lies beside a.png: the true map is drawn too


def test_evaluate_refuses_a_dataset_that_normalizes_already():
    from crowdkernels.data import SyntheticCrowds
    from crowdkernels.data.transforms import IMAGENET_NORM, Normalize

    counter = _tiny_counter()
    metrics, _ = counter.evaluate(SyntheticCrowds(2, 32, 0), progress=False)
    assert metrics["images"] == 2
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\].*leave out the Normalize"):
        counter.evaluate(SyntheticCrowds(2, 32, 0, transform=Normalize(IMAGENET_NORM)), progress=False)


# ----------------------------------------------------------------------------------------- issue 21
def test_load_feeds_images_at_the_checkpoints_max_size_and_tile(tmp_path):
    """Item 1: `ck.load(best.pt).count(img)` ran a model trained at --max-size 384 on the full image (561 people
    for 70). The checkpoint's max_size and tile are the defaults; an argument overrides them."""
    path = tmp_path / "run" / "best.pt"
    torch.manual_seed(0)
    net = build_model("csrnet", width=WIDTH)
    cfg = TrainConfig(out=str(path.parent), model="csrnet", model_kwargs={"width": WIDTH}, dataset="folder",
                      max_size=[48, 32], tile=512)
    save_checkpoint(path, {"model_name": "csrnet", "config": cfg.to_dict(), "model": net.state_dict()})
    img = _crowd_png(tmp_path / "crowd.png", 96, 120)
    counter = ck.load(path, device="cpu")
    assert counter.max_size == (48, 32) and counter.tile == 512
    settings_ = counter.settings()
    assert settings_["sources"] == {"max_size": "checkpoint", "tile": "checkpoint", "overlap": "default",
                                    "pad_multiple": "model", "input_norm": "checkpoint", "density_scale": "checkpoint"}
    assert settings_["max_size"] == [48, 32] and settings_["pad_multiple"] == 16
    assert "max size 48x32 (checkpoint), tiles beyond 512 px (checkpoint)" in counter.describe_settings()
    pred = counter.predict(img)
    assert pred.input_size == (32, 40)  # shrunk into the 48 x 32 box, as training's validation shrank it
    assert pred.count == pytest.approx(ck.Counter(net, "cpu", max_size=(48, 32)).count(img), rel=1e-6)
    full = ck.load(path, device="cpu", max_size=None, tile=None)
    assert full.predict(img).input_size == (96, 120) and full.settings()["sources"]["max_size"] == "override"
    # the released HMoDE files and checkpoints without the settings keep the old defaults
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, {"model_name": "csrnet", "config": {"model": "csrnet", "model_kwargs": {"width": WIDTH}},
                           "model": net.state_dict()})
    old = ck.load(bare, device="cpu")
    assert old.max_size is None and old.tile == 2048 and old.settings()["sources"]["max_size"] == "default"


def test_a_url_a_folder_and_a_video_say_what_they_are(tmp_path):
    """Item 8: `count("https://...")` said `https:/...: image file not found`; `count(folder)` said "not
    found" instead of pointing to count_many; a video was "not found" or left out of a folder silently."""
    counter = _tiny_counter()
    url = "https://example.com/crowd.jpg"
    with pytest.raises(ImageError, match=re.escape(url) + ": a URL: crowdkernels reads local image files only"):
        counter.count(url)
    _crowd_png(tmp_path / "a.png")
    with pytest.raises(ImageError, match="a folder, not an image: count the images in it with counter.count_many"):
        counter.count(tmp_path)
    clip = tmp_path / "clip.MP4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(ImageError, match="clip.MP4: a video: crowdkernels counts still images; extract frames"):
        counter.count(clip)
    with pytest.warns(UserWarning, match=r"1 video file\(s\) left out \(clip.MP4\)"):
        assert image_paths(tmp_path) == [tmp_path / "a.png"]
    with pytest.warns(UserWarning, match="video"):
        assert image_paths(str(tmp_path / "*")) == [tmp_path / "a.png"]
    assert image_paths([url]) == [url]  # kept as given, to fail per file with its own name
    (tmp_path / "a.png").unlink()
    with pytest.raises(ValueError, match=r"folder without images .* its 1 video file\(s\) are not read"):
        image_paths(tmp_path)
    with pytest.raises(ValueError, match="matches 1 video file"):
        image_paths(str(tmp_path / "*.MP4"))
    with pytest.warns(UserWarning, match="skipping " + re.escape(url)):
        assert math.isnan(counter.count_many([url], errors="skip", progress=False)[0])


def test_count_many_documents_predictions_with_their_sources():
    """Item 12: count_many returns bare floats; its docstring shows predictions(), whose items carry .source."""
    doc = ck.Counter.count_many.__doc__
    assert "predictions" in doc and ".source" in doc
