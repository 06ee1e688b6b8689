"""Annotation readers and split layouts: the real samples in ../shared/data (ShanghaiTech A and B,
UCF_CC_50) and small fixtures written here from the documented formats (UCF-QNRF, JHU-CROWD++,
NWPU-Crowd)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image, ImageFile

from conftest import require_data
import crowdkernels.data as ds
from crowdkernels.data import (
    AnnotationError,
    ImageError,
    LayoutError,
    image_size,
    list_samples,
    read_jhu_txt,
    read_nwpu_json,
    read_points,
    read_shanghaitech_mat,
    read_ucf_mat,
)


def _write_image(path, height, width, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


# ----------------------------------------------------------------------------------------- real samples
@pytest.mark.parametrize("part", ["part_A", "part_B"])
def test_shanghaitech_reader_on_real_samples(part):
    root = require_data("ShanghaiTech", part, "train_data")
    samples = list_samples(root, "shanghaitech")
    assert len(samples) == 24
    assert [s.name for s in samples] == sorted((s.name for s in samples), key=ds.natural_key)
    for s in samples:
        assert s.annotation == root / "ground-truth" / f"GT_{s.name}.mat"
        pts = s.points()
        assert pts.dtype == np.float64 and pts.ndim == 2 and pts.shape[1] == 2 and pts.flags.c_contiguous
        # the file's own count, read independently of the reader
        number = int(scipy.io.loadmat(s.annotation)["image_info"][0, 0][0, 0]["number"].squeeze())
        assert pts.shape[0] == number
        h, w = s.size()
        assert (pts[:, 0] > 0).all() and (pts[:, 0] < w).all()
        assert (pts[:, 1] > 0).all() and (pts[:, 1] < h).all()
    counts = [s.points().shape[0] for s in samples]
    if part == "part_A":
        assert min(counts) >= 33 and max(counts) <= 3138
    else:
        assert all(s.size() == (768, 1024) for s in samples)
        assert min(counts) >= 12 and max(counts) <= 576


def test_ucf_cc_50_reader_on_real_samples():
    root = require_data("UCF_CC_50")
    samples = list_samples(root, "ucf_cc_50")
    assert [s.name for s in samples] == [str(i) for i in range(1, 11)]  # natural order: folds by number
    outside = {}
    for s in samples:
        pts = s.points()
        assert pts.dtype == np.float64 and pts.shape[1] == 2 and pts.shape[0] > 0
        h, w = s.size()
        out = ~((pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h))
        if out.any():
            outside[s.name] = pts[out]
        assert ds.count_inside(pts, (h, w)) == pts.shape[0] - int(out.sum())
    # the readers keep out-of-image points as annotated (the density op drops them)
    assert sorted(outside) == ["1", "6"]
    assert outside["1"].shape[0] == 2 and np.allclose(outside["1"][:, 0], 984.2566, atol=1e-3)
    assert samples[0].size() == (648, 984)
    assert outside["6"].shape[0] == 1 and np.isclose(outside["6"][0, 0], -358.667, atol=1e-3)
    assert read_points(samples[0].annotation, "ucf_cc_50").shape == (4633, 2)


def test_image_size_reads_the_header_only(monkeypatch):
    root = require_data("ShanghaiTech", "part_A", "train_data")
    img = root / "images" / "IMG_215.jpg"
    with Image.open(img) as im:
        decoded = np.asarray(im.convert("RGB"))

    def no_decoding(self, *a, **k):
        raise AssertionError("image_size decoded the pixels")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(img) == decoded.shape[:2] == (298, 446)


def test_image_size_grayscale_and_errors(tmp_path):
    _write_image(tmp_path / "g.png", 21, 34, mode="L")
    assert image_size(tmp_path / "g.png") == (21, 34)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="bad.jpg"):
        image_size(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="nothere.jpg.*not found"):
        image_size(tmp_path / "nothere.jpg")


# ----------------------------------------------------------------------------------------- .mat errors
def test_mat_readers_name_the_bad_file(tmp_path):
    garbage = tmp_path / "GT_IMG_1.mat"
    garbage.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(AnnotationError, match="GT_IMG_1.mat.*MATLAB"):
        read_shanghaitech_mat(garbage)
    with pytest.raises(AnnotationError, match="GT_IMG_1.mat"):
        read_ucf_mat(garbage)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"something": np.zeros((3, 2))})
    with pytest.raises(AnnotationError, match="other.mat.*no 'annPoints'.*something"):
        read_ucf_mat(other)
    with pytest.raises(AnnotationError, match="other.mat.*no 'image_info'"):
        read_shanghaitech_mat(other)
    nan = tmp_path / "nan_ann.mat"
    scipy.io.savemat(nan, {"annPoints": np.array([[1.0, 2.0], [np.nan, 3.0]])})
    with pytest.raises(AnnotationError, match="nan_ann.mat.*not finite.*row 1"):
        read_ucf_mat(nan)
    shape = tmp_path / "shape_ann.mat"
    scipy.io.savemat(shape, {"annPoints": np.arange(5.0)})
    with pytest.raises(AnnotationError, match=r"shape_ann.mat.*\[N, 2\]"):
        read_ucf_mat(shape)
    with pytest.raises(AnnotationError, match="missing.mat.*not found"):
        read_ucf_mat(tmp_path / "missing.mat")


def test_shanghaitech_mat_roundtrip(tmp_path):
    """A file written in ShanghaiTech's nested struct layout reads back as written."""
    pts = np.array([[10.25, 3.5], [0.4, 7.75]])
    info = np.empty((1, 1), dtype=object)
    inner = np.empty((1, 1), dtype=[("location", "O"), ("number", "O")])
    inner[0, 0] = (pts, np.array([[2.0]]))
    info[0, 0] = inner
    scipy.io.savemat(tmp_path / "GT_IMG_9.mat", {"image_info": info})
    np.testing.assert_array_equal(read_shanghaitech_mat(tmp_path / "GT_IMG_9.mat"), pts)


# ----------------------------------------------------------------------------------------- UCF-QNRF
def _qnrf(tmp_path):
    root = tmp_path / "Train"
    _write_image(root / "img_0001.jpg", 40, 60)
    _write_image(root / "img_0002.jpg", 30, 20)
    scipy.io.savemat(root / "img_0001_ann.mat", {"annPoints": np.array([[5.5, 6.5], [59.9, 39.9], [61.0, 2.0]])})
    scipy.io.savemat(root / "img_0002_ann.mat", {"annPoints": np.zeros((0, 2))})
    return root


def test_ucf_qnrf_layout_and_reader(tmp_path):
    root = _qnrf(tmp_path)
    samples = list_samples(root, "ucf_qnrf")
    assert [(s.name, s.annotation.name) for s in samples] == [
        ("img_0001", "img_0001_ann.mat"),
        ("img_0002", "img_0002_ann.mat"),
    ]
    np.testing.assert_array_equal(samples[0].points(), [[5.5, 6.5], [59.9, 39.9], [61.0, 2.0]])
    assert samples[0].size() == (40, 60) and ds.count_inside(samples[0].points(), (40, 60)) == 2
    assert samples[1].points().shape == (0, 2)


def test_missing_annotation_is_named(tmp_path):
    root = _qnrf(tmp_path)
    _write_image(root / "img_0003.jpg", 16, 16)
    with pytest.raises(AnnotationError, match=r"img_0003_ann.mat.*not found \(1 missing"):
        list_samples(root, "ucf_qnrf")
    samples = list_samples(root, "ucf_qnrf", missing="keep")
    assert samples[-1].name == "img_0003"
    with pytest.raises(AnnotationError, match="img_0003_ann.mat.*not found"):
        samples[-1].points()
    with pytest.raises(ValueError, match="missing"):
        list_samples(root, "ucf_qnrf", missing="ignore")


# ----------------------------------------------------------------------------------------- JHU-CROWD++
def test_jhu_layout_and_reader(tmp_path):
    root = tmp_path / "train"
    _write_image(root / "images" / "0002.jpg", 50, 70)
    _write_image(root / "images" / "0010.jpg", 20, 20)
    (root / "gt").mkdir()
    # x y w h occlusion blur
    (root / "gt" / "0002.txt").write_text("12 30 8 9 1 0\n40.5 7.25 5 5 2 1\n\n66 44 10 12 1 0\n")
    (root / "gt" / "0010.txt").write_text("")  # an image without heads
    samples = list_samples(root, "jhu")
    assert [s.name for s in samples] == ["0002", "0010"]
    np.testing.assert_array_equal(samples[0].points(), [[12, 30], [40.5, 7.25], [66, 44]])
    assert samples[1].points().shape == (0, 2)
    (root / "gt" / "0010.txt").write_text("1 2 3 4 0 0\nfoo bar 1 1 0 0\n")
    with pytest.raises(AnnotationError, match="0010.txt.*line 2"):
        read_jhu_txt(root / "gt" / "0010.txt")
    (root / "gt" / "0010.txt").write_text("7\n")
    with pytest.raises(AnnotationError, match="0010.txt.*line 1"):
        read_jhu_txt(root / "gt" / "0010.txt")
    (root / "gt" / "0010.txt").write_text("nan 3 1 1 0 0\n")
    with pytest.raises(AnnotationError, match="0010.txt.*not finite"):
        read_jhu_txt(root / "gt" / "0010.txt")


# ----------------------------------------------------------------------------------------- NWPU-Crowd
def test_nwpu_layout_and_reader(tmp_path):
    root = tmp_path / "NWPU-Crowd"
    _write_image(root / "images" / "0001.jpg", 32, 48)
    (root / "jsons").mkdir()
    doc = {"img_id": "0001.jpg", "human_num": 2, "points": [[3.5, 4.5], [47.0, 31.0]],
           "boxes": [[1, 2, 6, 7], [44, 28, 48, 32]]}
    (root / "jsons" / "0001.json").write_text(json.dumps(doc))
    (s,) = list_samples(root, "nwpu")
    np.testing.assert_array_equal(s.points(), [[3.5, 4.5], [47.0, 31.0]])
    bad = root / "jsons" / "bad.json"
    bad.write_text("{truncated")
    with pytest.raises(AnnotationError, match="bad.json.*JSON"):
        read_nwpu_json(bad)
    bad.write_text(json.dumps({"img_id": "x", "human_num": 0}))
    with pytest.raises(AnnotationError, match="bad.json.*no 'points'.*human_num"):
        read_nwpu_json(bad)
    bad.write_text(json.dumps({"points": [[1, 2], [3, float("nan")]]}))
    with pytest.raises(AnnotationError, match="bad.json.*not finite"):
        read_nwpu_json(bad)
    bad.write_text(json.dumps([[1, 2], [3, 4]]))  # a bare list of points
    assert read_nwpu_json(bad).shape == (2, 2)
    bad.write_text(json.dumps({"points": []}))
    assert read_nwpu_json(bad).shape == (0, 2)


# ----------------------------------------------------------------------------------------- layouts
def test_wrong_layout_says_what_was_expected(tmp_path):
    with pytest.raises(LayoutError, match="not a folder.*Expected ROOT/images/IMG_N.jpg"):
        list_samples(tmp_path / "nowhere", "shanghaitech")
    (tmp_path / "images").mkdir()
    with pytest.raises(LayoutError, match="missing ground-truth/.*Expected ROOT/images/IMG_N.jpg with ROOT/ground-truth"):
        list_samples(tmp_path, "shanghaitech")
    (tmp_path / "ground-truth").mkdir()
    with pytest.raises(LayoutError, match="no matching images"):
        list_samples(tmp_path, "shanghaitech")
    part = tmp_path / "part_B"
    (part / "train_data").mkdir(parents=True)
    with pytest.raises(LayoutError, match="holds train_data/: pass one split folder"):
        list_samples(part, "shanghaitech")
    with pytest.raises(LayoutError, match="ucf_cc_50 layout.*N_ann.mat"):
        list_samples(tmp_path, "ucf_cc_50")
    with pytest.raises(LayoutError, match="jhu layout.*missing gt/"):
        list_samples(tmp_path, "jhu")
    with pytest.raises(ValueError, match="format must be one of"):
        list_samples(tmp_path, "mall")
    with pytest.raises(ValueError, match="format must be one of"):
        read_points(tmp_path / "x.mat", "ucf")


def test_natural_order():
    names = ["IMG_10.jpg", "IMG_2.jpg", "IMG_1.jpg", "img_100.jpg"]
    assert sorted(names, key=ds.natural_key) == ["IMG_1.jpg", "IMG_2.jpg", "IMG_10.jpg", "img_100.jpg"]


# ----------------------------------------------------------------------------------------- generic folder
def test_folder_format_txt_csv_json(tmp_path):
    root = tmp_path / "crowds"
    for name in ("a", "b", "c", "d"):
        _write_image(root / f"{name}.png", 20, 30)
    (root / "a.txt").write_text("1.5 2.5\n# a comment\n10 11 extra columns\n")
    (root / "b.csv").write_text("x,y\n3,4\n5.5,6\n")
    (root / "c.json").write_text(json.dumps([{"x": 7, "y": 8}]))
    (root / "d.json").write_text(json.dumps({"points": [[1, 1], [2, 2], [3, 3]]}))
    samples = list_samples(root, "folder")
    assert [s.annotation.name for s in samples] == ["a.txt", "b.csv", "c.json", "d.json"]
    assert [s.points().tolist() for s in samples] == [[[1.5, 2.5], [10, 11]], [[3, 4], [5.5, 6]], [[7, 8]], [[1, 1], [2, 2], [3, 3]]]
    (root / "b.csv").write_text("x,y\n3,4\noops,6\n")
    with pytest.raises(AnnotationError, match="b.csv.*line 3"):
        ds.read_point_file(root / "b.csv")
    (root / "a.txt").write_text("1 nan\n")
    with pytest.raises(AnnotationError, match="a.txt.*not finite"):
        ds.read_point_file(root / "a.txt")


# ----------------------------------------------------------------------------------------- splits and datasets
def test_ucf_cc_50_folds_on_real_samples():
    root = require_data("UCF_CC_50")
    samples = list_samples(root, "ucf_cc_50")
    tests = []
    for k in range(1, 6):
        train, test = ds.ucf_cc_50_folds(samples, k)
        assert len(test) == 2 and len(train) == 8 and not {s.name for s in train} & {s.name for s in test}
        tests += [s.name for s in test]
    assert tests == [str(i) for i in range(1, 11)]  # the folds partition the images in order
    got, note = ds.dataset_samples("ucf-cc-50", root, "val", fold=3)
    assert [s.name for s in got] == ["5", "6"] and "fold 3" in note
    with pytest.raises(ValueError, match="fold"):
        ds.ucf_cc_50_folds(samples, 6)


def test_shanghaitech_splits_and_dataset_on_real_samples(tmp_path):
    part_a = require_data("ShanghaiTech", "part_A", "train_data")
    top = part_a.parents[1]  # ShanghaiTech/: part_A/train_data is found under it
    train, note = ds.dataset_samples("shanghaitech-a", top, "train")
    val, vnote = ds.dataset_samples("shanghaitech-a", top, "val")  # no test_data here: every 10th held out
    assert len(train) + len(val) == 24 and len(val) == 2 and "held out" in vnote
    b_train, _ = ds.dataset_samples("shanghaitech-b", top, "train")
    assert all(s.size() == (768, 1024) for s in b_train)
    data = ds.CrowdDataset(val)
    item = data[0]
    assert item["image"].shape[0] == 3 and item["image"].dtype.is_floating_point
    assert tuple(item["image"].shape[1:]) == val[0].size()
    assert item["points"].shape == (val[0].points().shape[0], 2)
    assert data.counts == [s.points().shape[0] for s in val]


def test_jhu_levels_nwpu_lists_and_bad_files(tmp_path):
    root = tmp_path / "jhu"
    for split in ("train", "val"):
        for i, n in enumerate((3, 60, 600)):
            _write_image(root / split / "images" / f"{i:04d}.jpg", 40, 40)
            (root / split / "gt").mkdir(exist_ok=True)
            pts = np.random.default_rng(i).random((n, 2)) * 39
            (root / split / "gt" / f"{i:04d}.txt").write_text("".join(f"{x} {y} 1 1 0 0\n" for x, y in pts))
    val, _ = ds.dataset_samples("jhu", root, "val")
    assert [ds.CrowdDataset(val, levels=[lv]).counts for lv in ("low", "medium", "high")] == [[3], [60], [600]]

    nwpu = tmp_path / "nwpu"
    for i in range(3):
        _write_image(nwpu / "images" / f"{3100 + i}.jpg", 16, 16)
        (nwpu / "jsons").mkdir(exist_ok=True)
        (nwpu / "jsons" / f"{3100 + i}.json").write_text(json.dumps({"points": [[1, 1]] * (i + 1)}))
    (nwpu / "val.txt").write_text("3101 1 1\n3102 1 2\n")
    assert [s.name for s in ds.dataset_samples("nwpu", nwpu, "val")[0]] == ["3101", "3102"]
    # issue 21, item 2: a split named by the user must exist (no silent hold-out of training images)
    assert [s.name for s in ds.dataset_samples("nwpu", nwpu, "val", fallback=False)[0]] == ["3101", "3102"]
    with pytest.raises(ds.LayoutError, match=r"no test split in .*no test.txt .*lists found: val.txt"):
        ds.dataset_samples("nwpu", nwpu, "test", fallback=False)
    assert len(ds.dataset_samples("nwpu", nwpu, "test")[0]) == 1  # the fallback, where nobody asked for "test"
    assert len(ds.dataset_samples("jhu", root, "val", fallback=False)[0]) == 3
    with pytest.raises(ds.LayoutError, match=r"no test split under .*looked for .*jhu/test/\); found: .*jhu/train/, .*jhu/val/"):
        ds.dataset_samples("jhu", root, "test", fallback=False)

    # NaN points, a missing annotation, an image that is not one: warned, named, skipped
    (root / "val" / "gt" / "0001.txt").write_text("nan 1 1 1 0 0\n")
    (root / "val" / "gt" / "0002.txt").unlink()
    warnings = []
    data = ds.CrowdDataset(ds.dataset_samples("jhu", root, "val")[0], warn=warnings.append)
    assert sorted(data.skipped) == ["0001", "0002"] and len(data) == 1
    assert any("0001.txt" in w for w in warnings) and any("0002.txt" in w for w in warnings)
    with pytest.raises(AnnotationError, match="0001.txt"):
        ds.CrowdDataset(ds.dataset_samples("jhu", root, "val")[0], strict=True)
    (root / "val" / "images" / "0000.jpg").write_bytes((root / "val" / "images" / "0000.jpg").read_bytes()[:200])
    got = data[0]
    assert "error" in got and "0000.jpg" in got["error"]


def test_dataset_layout_errors(tmp_path):
    with pytest.raises(LayoutError, match="part_A/train_data.*ground-truth"):
        ds.dataset_samples("shanghaitech-a", tmp_path, "train")
    with pytest.raises(LayoutError, match="Train"):
        ds.dataset_samples("ucf-qnrf", tmp_path, "train")
    with pytest.raises(LayoutError, match="not a folder"):
        ds.dataset_samples("jhu", tmp_path / "nowhere", "train")


# ----------------------------------------------------------------------------------------- the registry
def test_names_formats_and_engine_facts_derive_from_the_registry():
    assert ds.DATASET_NAMES == tuple(ds.DATASETS) == (
        "shanghaitech-a", "shanghaitech-b", "ucf-cc-50", "ucf-qnrf", "jhu", "nwpu", "synthetic", "folder")
    assert list(ds.FORMATS) == ["shanghaitech", "ucf_cc_50", "ucf_qnrf", "jhu", "nwpu", "folder"]
    assert all(ds.FORMATS[s.format.name] is s.format for s in ds.DATASETS.values() if s.format is not None)
    assert [n for n, s in ds.DATASETS.items() if s.small_crop] == ["shanghaitech-a"]
    assert {n: s.max_size for n, s in ds.DATASETS.items() if s.max_size} == {"ucf-qnrf": (1920, 1080)}
    assert ds.dataset_spec("synthetic").format is None
    with pytest.raises(ValueError, match="dataset must be one of .*'folder'.*got 'nope'"):
        ds.dataset_spec("nope")
    with pytest.raises(ValueError, match=r"dataset must be one of \[.*'nwpu', 'folder'\], got 'synthetic'"):
        ds.dataset_samples("synthetic", ".")


def test_a_new_dataset_is_one_registry_entry(tmp_path, monkeypatch):
    from crowdkernels.data import layouts, specs

    formats = dict(layouts.FORMATS)  # the registry is global: this test's entry leaves with it
    monkeypatch.setattr(layouts, "FORMATS", formats)
    monkeypatch.setattr(specs, "FORMATS", formats)
    monkeypatch.setattr(specs, "DATASETS", dict(specs.DATASETS))
    monkeypatch.setattr(specs, "DATASET_NAMES", specs.DATASET_NAMES)
    fmt = ds.DatasetFormat(name="pairs", layout="ROOT/images/X.png with ROOT/points/X.txt", image_dir="images",
                           annotation_path=lambda root, img: root / "points" / f"{img.stem}.txt",
                           reader=ds.read_point_file, required_dirs=("images", "points"))
    splits = ds.FolderSplits(train=("a",), val=("b",), test=("b",))
    ds.register_dataset(ds.DatasetSpec("pairs", fmt, splits))
    assert specs.DATASET_NAMES[-1] == "pairs" and formats["pairs"] is fmt
    for split, n in (("a", 3), ("b", 2)):
        (tmp_path / split / "points").mkdir(parents=True)
        for i in range(n):
            _write_image(tmp_path / split / "images" / f"{i}.png", 8, 9)
            (tmp_path / split / "points" / f"{i}.txt").write_text("1 2\n")
    train, note = ds.dataset_samples("pairs", tmp_path, "train")
    assert [s.name for s in train] == ["0", "1", "2"] and note == str(tmp_path / "a")
    val, _ = ds.dataset_samples("pairs", tmp_path, "val")
    assert [s.points().tolist() for s in val] == [[[1.0, 2.0]]] * 2
    with pytest.raises(ValueError, match="registered already"):
        ds.register_dataset(ds.DatasetSpec("pairs", fmt, splits))
    with pytest.raises(ValueError, match="taken by another format"):
        ds.register_dataset(ds.DatasetSpec("pairs-2", dataclasses.replace(fmt), splits))
    with pytest.raises(ValueError, match="no split policy"):
        ds.register_dataset(ds.DatasetSpec("pairs-3", fmt))


# ----------------------------------------------------------------------------------------- image modes
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): [H, W] gray, [H, W, 2] gray+alpha,
    [H, W, 3] RGB or [H, W, 4] RGBA, uint16, per the PNG specification (filter 0 on every row)."""
    import struct
    import zlib

    a = array if array.ndim == 3 else array[:, :, None]
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    path.write_bytes(png)


# mode -> (fill value, the RGB it means, tolerance): what every mode Pillow opens must load as
MODE_MEANINGS = {
    "1": (1, (1.0, 1.0, 1.0), 0),
    "L": (128, (128 / 255,) * 3, 1e-7),
    "P": (0, (0.0, 0.0, 0.0), 0),  # Pillow's default palette: index 0 is black
    "LA": ((128, 7), (128 / 255,) * 3, 1e-7),  # alpha dropped
    "La": ((128, 255), (128 / 255,) * 3, 1e-7),
    "PA": ((0, 7), (0.0, 0.0, 0.0), 0),
    "RGB": ((255, 128, 0), (1.0, 128 / 255, 0.0), 1e-7),
    "RGBA": ((255, 128, 0, 3), (1.0, 128 / 255, 0.0), 1e-7),
    "RGBa": ((255, 128, 0, 255), (1.0, 128 / 255, 0.0), 1e-7),
    "RGBX": ((255, 128, 0, 0), (1.0, 128 / 255, 0.0), 1e-7),
    "CMYK": ((0, 255, 255, 0), (1.0, 0.0, 0.0), 1e-7),  # pure red
    "YCbCr": ((76, 85, 255), (1.0, 0.0, 0.0), 2 / 255),  # red in JPEG's YCbCr
    "HSV": ((0, 255, 255), (1.0, 0.0, 0.0), 1e-7),
    "LAB": ((255, 128, 128), (1.0, 1.0, 1.0), 2 / 255),  # white
    "I;16": (32768, (32768 / 65535,) * 3, 1e-7),
    "I;16L": (32768, (32768 / 65535,) * 3, 1e-7),
    "I;16B": (32768, (32768 / 65535,) * 3, 1e-7),
    "I;16N": (32768, (32768 / 65535,) * 3, 1e-7),
    "F": (0.25, (0.25,) * 3, 1e-7),
}


@pytest.mark.parametrize("mode", sorted(set(Image.MODES) | set(MODE_MEANINGS)))
def test_every_pillow_mode_loads_by_its_meaning_or_is_refused(mode):
    """Issue 15, defect 2: an image is read by what its pixels mean, in every mode Pillow has; "I" (32-bit
    integers without a stated white level) is refused with a message instead of being clipped to white."""
    if mode == "I":
        with pytest.raises(ImageError, match="white level"):
            ds.pil_to_rgb(Image.new("I", (5, 3), 1000), "x.tif")
        return
    fill, rgb, tol = MODE_MEANINGS[mode]
    t = ds.pil_to_rgb(Image.new(mode, (5, 3), fill), "x")
    assert t.dtype == torch.float32 and t.shape == (3, 3, 5)
    expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 3, 5)
    torch.testing.assert_close(t, expected, rtol=0, atol=tol)


def test_sixteen_bit_pngs_load_as_their_values_not_white(tmp_path):
    """A 16-bit gray PNG (what a scientific camera or an export writes) used to load as a white image,
    which a model counts at about twice the heads. It loads as value / 65535; 16-bit colour PNGs
    through Pillow's own reduction to 8 bits."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    _write_png16(tmp_path / "g16.png", gray)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # what makes convert("RGB") clip to white
    t = ds.load_image(tmp_path / "g16.png")
    np.testing.assert_allclose(t.numpy(), np.broadcast_to(gray / 65535.0, (3, 6, 7)), rtol=0, atol=1e-7)
    assert 0.3 < float(t.mean()) < 0.7
    for channels in (2, 3, 4):
        arr = rng.integers(0, 65536, (6, 7, channels), dtype=np.uint16)
        _write_png16(tmp_path / f"c{channels}.png", arr)
        t = ds.load_image(tmp_path / f"c{channels}.png")
        colour = arr[:, :, :3] if channels >= 3 else np.repeat(arr[:, :, :1], 3, axis=2)
        # within one 8-bit step of the 16-bit value (Pillow keeps the high byte)
        np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), colour / 65535.0, rtol=0, atol=1 / 255 + 1e-6)


def test_float_and_wide_integer_tiffs(tmp_path):
    ok = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(ok, "F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(ds.load_image(tmp_path / "f.tif")[0].numpy(), ok, rtol=0, atol=1e-7)
    Image.fromarray(ok * 255, "F").save(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"f255.tif.*values in \[0, 255\].*expected \[0, 1\]"):
        ds.load_image(tmp_path / "f255.tif")
    nan = ok.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="nan.tif.*NaN"):
        ds.load_image(tmp_path / "nan.tif")
    # a 32-bit integer TIFF states its bit depth and sign (Pillow writes signed): white is 2^31 - 1
    wide = np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)
    Image.fromarray(wide, "I").save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as im:
        assert im.mode == "I" and im.tag_v2.get(258) in (32, (32,)) and im.tag_v2.get(339) in (2, (2,))
    got = ds.load_image(tmp_path / "i32.tif")[0, 0].double().numpy()
    np.testing.assert_allclose(got, wide[0] / (2**31 - 1), rtol=1e-6)
    Image.fromarray(np.array([[-5, 3]], dtype=np.int32), "I").save(tmp_path / "neg.tif")
    with pytest.raises(ImageError, match=r"neg.tif.*\[-5, 3\]"):
        ds.load_image(tmp_path / "neg.tif")


# ----------------------------------------------------------------------------------------- left-out annotations
def test_annotations_without_an_image_are_reported(tmp_path):
    """Issue 15, defect 8: an annotation whose image is missing was dropped from the split without a word."""
    root = tmp_path / "crowds"
    for name in ("a", "b"):
        _write_image(root / f"{name}.png", 10, 12)
        (root / f"{name}.txt").write_text("1 1\n")
    (root / "gone.txt").write_text("1 1\n2 2\n")
    (root / "b.json").write_text(json.dumps([[1, 1]]))  # a second point file of an image that exists: not orphaned
    notes = []
    samples = list_samples(root, "folder", warn=notes.append)
    assert [s.name for s in samples] == ["a", "b"]
    assert len(notes) == 1 and "1 annotation file(s) without an image" in notes[0] and "gone.txt" in notes[0]
    assert ds.orphan_annotations(root, "folder", samples) == [root / "gone.txt"]
    with pytest.warns(ds.DatasetWarning, match="gone.txt"):
        list_samples(root, "folder")

    sha = tmp_path / "train_data"
    _write_image(sha / "images" / "IMG_1.jpg", 10, 12)
    (sha / "ground-truth").mkdir()
    for n in (1, 2, 3):
        scipy.io.savemat(sha / "ground-truth" / f"GT_IMG_{n}.mat", {"x": np.zeros(1)})
    notes.clear()
    list_samples(sha, "shanghaitech", warn=notes.append)
    assert len(notes) == 1 and "2 annotation file(s)" in notes[0] and "GT_IMG_2.mat, GT_IMG_3.mat" in notes[0]
    notes.clear()
    ds.dataset_samples("folder", root, "train", warn=notes.append)
    assert len(notes) == 1 and "gone.txt" in notes[0]
