"""The command line, called in-process through crowdkernels.cli.main([...]) (plus one subprocess smoke
test): `info`, `density` on a temp copy of a few ShanghaiTech samples (outputs, sums, manifest, resume,
per-file errors, layout errors) and `demo`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import crowdkernels
from conftest import require_data
from crowdkernels import cli
from crowdkernels.data import density_job, read_shanghaitech_mat

# three small Part A images (298x446, 270x360, 388x690): quick even on the reference fallback
SMALL = ("IMG_215", "IMG_275", "IMG_36")


@pytest.fixture
def sha(tmp_path):
    src = require_data("ShanghaiTech", "part_A", "train_data")
    root = tmp_path / "train_data"
    (root / "images").mkdir(parents=True)
    (root / "ground-truth").mkdir()
    for name in SMALL:
        shutil.copy(src / "images" / f"{name}.jpg", root / "images")
        shutil.copy(src / "ground-truth" / f"GT_{name}.mat", root / "ground-truth")
        os.chmod(root / "ground-truth" / f"GT_{name}.mat", 0o644)  # the shared copies are read-only
    return root


def _density(root, out, *extra):
    return cli.main(["density", str(root), "--format", "shanghaitech", "--out", str(out), *extra])


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _points(root, name):
    return read_shanghaitech_mat(root / "ground-truth" / f"GT_{name}.mat")


def _size(root, name):
    with Image.open(root / "images" / f"{name}.jpg") as im:
        return im.size[1], im.size[0]


@pytest.fixture
def writes(monkeypatch):
    """The names of the maps the CLI writes (a counter, not mtimes, which can be coarse)."""
    written = []
    save = density_job.save_npy

    def counting(path, array):
        written.append(path.name)
        save(path, array)

    monkeypatch.setattr(density_job, "save_npy", counting)
    return written


# ----------------------------------------------------------------------------------------- info
def test_info_prints_every_backend(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for key in ("crowdkernels", "torch", "C++ kernels (cpu)", "OpenMP", "CUDA kernels", "CUDA archs", "GPU visible",
                "Triton", "threads"):
        assert key in text
    assert torch.__version__ in text
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"crowdkernels": crowdkernels.__version__, **crowdkernels.backends()}
    for key in ("cpu", "cuda", "cuda_archs", "triton", "torch", "threads"):
        assert key in info


def test_python_dash_m_info():
    from conftest import CHILD_CWD, child_env

    res = subprocess.run([sys.executable, "-m", "crowdkernels", "info", "--json"], capture_output=True, text=True,
                         env=child_env(), timeout=120, cwd=CHILD_CWD)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["torch"] == torch.__version__


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["density"]) == 2
    assert cli.main(["density", "x", "--format", "mall", "--out", "y"]) == 2
    assert cli.main(["density", "x", "--format", "jhu", "--out", "y", "--sigma", "-1"]) == 2
    assert "expected 'adaptive' or a positive number" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["density", "x", "--format", "jhu", "--out", "y", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["demo", "--size", "8"]) == 2
    assert "--size must be >= 16" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


# ----------------------------------------------------------------------------------------- density
def test_density_exact_outputs_and_manifest(sha, tmp_path, capsys):
    out = tmp_path / "maps"
    assert _density(sha, out) == 0
    assert "3/3 images" in capsys.readouterr().out
    m = _manifest(out)
    assert m["format"] == "shanghaitech" and m["settings"] == {
        "style": "exact", "sigma": "adaptive", "k": 3, "beta": 0.3, "truncate": 4.0, "kernel_size": 15, "stride": 1}
    assert list(m["images"]) == sorted(SMALL, key=lambda n: int(n[4:]))  # natural order
    assert m["failures"] == {} and m["summary"]["written"] == 3 and m["summary"]["failed"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.npy" for n in SMALL] + ["manifest.json"])
    for name in SMALL:
        pts, size = _points(sha, name), _size(sha, name)
        arr = np.load(out / f"{name}.npy")
        assert arr.dtype == np.float32 and arr.shape == size
        # style exact: every in-image head contributes 1 (all ShanghaiTech points are inside)
        np.testing.assert_allclose(arr.sum(dtype=np.float64), pts.shape[0], rtol=1e-5)
        expected = crowdkernels.density_map(torch.from_numpy(pts), size).float().numpy()
        np.testing.assert_array_equal(arr, expected)
        e = m["images"][name]
        assert e["file"] == f"{name}.npy" and e["image"] == f"images/{name}.jpg"
        assert e["annotation"] == f"ground-truth/GT_{name}.mat"
        assert e["size"] == list(size) and e["map_size"] == list(size) and e["style"] == "exact"
        assert e["head_count"] == e["in_image"] == pts.shape[0]
        assert e["map_sum"] == pytest.approx(float(arr.sum(dtype=np.float64)), rel=1e-12)
        sig = crowdkernels.knn_sigma(torch.from_numpy(pts)).numpy()
        assert e["sigma"] == pytest.approx({"min": sig.min(), "median": float(np.median(sig)), "max": sig.max()})
    assert m["summary"]["heads"] == sum(_points(sha, n).shape[0] for n in SMALL)


@pytest.mark.parametrize("style", ["exact", "csrnet"])
def test_manifest_sigmas_are_the_ones_the_map_used(sha, style):
    """Rebuilding the map from the sigma rule the manifest documents gives the same map as the API's
    own adaptive sigma (the rule is not a second guess at the kernel's behaviour)."""
    name = "IMG_275"
    pts, size = _points(sha, name), _size(sha, name)
    settings = density_job.DensitySettings(style=style)
    sig = density_job.effective_sigmas(pts, size, settings)
    used = np.unique(np.floor(pts), axis=0) if style == "csrnet" else pts
    assert sig.shape == (used.shape[0],)
    rebuilt = crowdkernels.density_map(torch.from_numpy(used), size, style=style, sigma=torch.from_numpy(sig))
    direct = crowdkernels.density_map(torch.from_numpy(pts), size, style=style)
    torch.testing.assert_close(rebuilt, direct, rtol=0, atol=1e-12)
    assert np.allclose(density_job.effective_sigmas(pts, size, density_job.DensitySettings(style="matlab")), 4.0)
    assert np.allclose(density_job.effective_sigmas(pts, size, density_job.DensitySettings(style=style, sigma=2.5)), 2.5)


def test_density_other_styles_and_stride(sha, tmp_path):
    out = tmp_path / "s4"
    assert _density(sha, out, "--style", "matlab", "--stride", "4", "--sigma", "3") == 0
    m = _manifest(out)
    for name in SMALL:
        h, w = _size(sha, name)
        arr = np.load(out / f"{name}.npy")
        assert arr.shape == (-(-h // 4), -(-w // 4)) and m["images"][name]["map_size"] == list(arr.shape)
        n = _points(sha, name).shape[0]
        np.testing.assert_allclose(arr.sum(dtype=np.float64), n, rtol=1e-5)  # matlab: every point counts 1
        assert m["images"][name]["sigma"] == {"min": 3.0, "median": 3.0, "max": 3.0}
        assert m["images"][name]["style"] == "matlab"
    out2 = tmp_path / "csr"
    assert _density(sha, out2, "--style", "csrnet") == 0
    for name in SMALL:
        arr = np.load(out2 / f"{name}.npy")
        # the classic recipe loses mass at the borders and collapses heads sharing a pixel
        assert 0.8 * _points(sha, name).shape[0] < arr.sum() <= _points(sha, name).shape[0] + 1e-3


def test_density_resume_skips_finished_maps(sha, tmp_path, capsys, writes):
    out = tmp_path / "maps"
    assert _density(sha, out) == 0
    assert sorted(writes) == sorted(f"{n}.npy" for n in SMALL)
    writes.clear()
    assert _density(sha, out) == 0  # nothing to do
    assert writes == []
    assert _manifest(out)["summary"] == {**_manifest(out)["summary"], "written": 0, "reused": 3}

    # an unfinished map (truncated), a missing one, one that disagrees with its manifest entry
    a, b, c = (out / f"{n}.npy" for n in SMALL)
    a.write_bytes(a.read_bytes()[:100])
    b.unlink()
    m = _manifest(out)
    m["images"][SMALL[2]]["map_sum"] += 1.0
    (out / "manifest.json").write_text(json.dumps(m))
    assert _density(sha, out) == 0
    assert sorted(writes) == sorted(p.name for p in (a, b, c))
    assert _manifest(out)["summary"]["written"] == 3
    for name in SMALL:
        np.testing.assert_allclose(np.load(out / f"{name}.npy").sum(), _points(sha, name).shape[0], rtol=1e-5)

    # a map of the wrong shape or dtype, or with a NaN, is not finished either
    np.save(a, np.zeros((5, 5), np.float32))
    np.save(b, np.load(b).astype(np.float64))
    bad = np.load(c)
    bad[0, 0] = np.nan
    np.save(c, bad)
    writes.clear()
    assert _density(sha, out) == 0
    assert sorted(writes) == sorted(p.name for p in (a, b, c))

    # killed between manifest flushes: a map without a record cannot be shown to come from its
    # annotation, so it is made again (at most the last 10 s of work), and its record comes back the same
    full = _manifest(out)
    (out / "manifest.json").write_text(json.dumps(dict(full, images={})))
    writes.clear()
    assert _density(sha, out) == 0
    assert sorted(writes) == sorted(f"{n}.npy" for n in SMALL)
    assert _manifest(out)["images"] == full["images"]

    # --overwrite recomputes everything; other settings without it are refused
    writes.clear()
    assert _density(sha, out, "--overwrite") == 0
    assert sorted(writes) == sorted(f"{n}.npy" for n in SMALL)
    capsys.readouterr()
    assert _density(sha, out, "--style", "csrnet") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "style 'exact' -> 'csrnet'" in err and "--overwrite" in err
    assert not list(out.glob(".*.tmp"))  # no temp file left behind


def _write_gt(root, name, points):
    """A ShanghaiTech GT file holding `points` in the dataset's nested struct layout."""
    info = np.empty((1, 1), dtype=object)
    inner = np.empty((1, 1), dtype=[("location", "O"), ("number", "O")])
    inner[0, 0] = (np.asarray(points, dtype=np.float64), np.array([[float(len(points))]]))
    info[0, 0] = inner
    scipy.io.savemat(root / "ground-truth" / f"GT_{name}.mat", {"image_info": info})


def test_density_remakes_a_map_whose_annotation_changed(sha, tmp_path, writes):
    """Issue 15, defect 3: the map of an edited annotation used to be reused, and the manifest kept the old
    head count. Now the manifest records the annotation's SHA-256 and a changed file is made again."""
    out = tmp_path / "maps"
    assert _density(sha, out) == 0
    name = SMALL[1]
    m = _manifest(out)
    assert len(m["images"][name]["annotation_sha256"]) == 64
    before = m["images"][name]["head_count"]
    fewer = _points(sha, name)[:10]  # the annotation is edited: 10 heads left
    _write_gt(sha, name, fewer)
    writes.clear()
    assert _density(sha, out) == 0
    assert writes == [f"{name}.npy"]  # only the changed one
    e = _manifest(out)["images"][name]
    assert e["head_count"] == 10 != before
    np.testing.assert_allclose(np.load(out / f"{name}.npy").sum(dtype=np.float64), 10, rtol=1e-5)
    assert _manifest(out)["summary"]["heads"] == sum(_points(sha, n).shape[0] for n in SMALL)

    # the same file written again (a new mtime, the same bytes) is reused; an image of another size is not
    writes.clear()
    gt = sha / "ground-truth" / f"GT_{name}.mat"
    gt.write_bytes(gt.read_bytes())
    assert _density(sha, out) == 0 and writes == []
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(sha / "images" / f"{SMALL[0]}.jpg")
    assert _density(sha, out) == 0
    assert writes == [f"{SMALL[0]}.npy"] and np.load(out / f"{SMALL[0]}.npy").shape == (40, 50)


def test_density_corrupted_annotation_leaves_no_stale_map(sha, tmp_path, capsys):
    """A corrupted annotation after a finished run: reported as failed, its old map and record gone."""
    out = tmp_path / "maps"
    assert _density(sha, out) == 0
    name = SMALL[2]
    (sha / "ground-truth" / f"GT_{name}.mat").write_bytes(b"MATLAB 5.0 MAT-file, corrupted" + b"\x00" * 50)
    capsys.readouterr()
    assert _density(sha, out) == 1
    assert "not a readable MATLAB .mat file" in capsys.readouterr().err
    m = _manifest(out)
    assert name not in m["images"] and name in m["failures"]
    assert not (out / f"{name}.npy").exists()
    assert sorted(p.stem for p in out.glob("*.npy")) == sorted(SMALL[:2])


def test_density_bad_annotation_is_reported_and_the_rest_goes_on(sha, tmp_path, capsys, writes):
    bad = sha / "ground-truth" / f"GT_{SMALL[1]}.mat"
    good = bad.read_bytes()
    bad.write_bytes(b"MATLAB 5.0 MAT-file, corrupted" + b"\x00" * 50)
    (sha / "ground-truth" / f"GT_{SMALL[2]}.mat").unlink()
    out = tmp_path / "maps"
    assert _density(sha, out) == 1
    err = capsys.readouterr().err
    assert f"GT_{SMALL[1]}.mat" in err and "not a readable MATLAB .mat file" in err
    assert f"GT_{SMALL[2]}.mat" in err and "annotation file not found" in err
    assert "2 image(s) failed" in err
    assert (out / f"{SMALL[0]}.npy").is_file()
    assert not (out / f"{SMALL[1]}.npy").exists() and not (out / f"{SMALL[2]}.npy").exists()
    m = _manifest(out)
    assert list(m["images"]) == [SMALL[0]] and sorted(m["failures"]) == sorted(SMALL[1:])
    assert f"GT_{SMALL[1]}.mat" in m["failures"][SMALL[1]]

    # fixed: the rerun makes only the missing maps
    bad.write_bytes(good)
    shutil.copy(require_data("ShanghaiTech", "part_A", "train_data", "ground-truth", f"GT_{SMALL[2]}.mat"),
                sha / "ground-truth")
    writes.clear()
    assert _density(sha, out) == 0
    m = _manifest(out)
    assert m["failures"] == {} and m["summary"]["written"] == 2 and m["summary"]["reused"] == 1
    assert sorted(writes) == sorted(f"{n}.npy" for n in SMALL[1:])


def test_density_names_annotations_whose_image_is_missing(sha, tmp_path, capsys):
    """Defect 8: an annotation without its image was left out silently; progress suits a log (no bar frames)."""
    (sha / "images" / f"{SMALL[0]}.jpg").unlink()
    assert _density(sha, tmp_path / "maps") == 0
    captured = capsys.readouterr()
    assert "2/2 images" in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("crowdkernels density: warning: ")
    assert f"GT_{SMALL[0]}.mat" in warning[0] and "without an image" in warning[0]
    assert "\r" not in captured.err and "density: 2/2 img in" in captured.err


def test_density_strict_stops_at_the_first_bad_file(sha, tmp_path, capsys):
    first = sorted(SMALL, key=lambda n: int(n[4:]))[0]
    (sha / "ground-truth" / f"GT_{first}.mat").write_bytes(b"junk")
    out = tmp_path / "maps"
    assert _density(sha, out, "--strict") == 1
    assert "--strict" in capsys.readouterr().err
    assert not list(out.glob("*.npy"))


def test_density_wrong_layout(tmp_path, capsys):
    (tmp_path / "part_A" / "train_data").mkdir(parents=True)
    assert _density(tmp_path / "part_A", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "does not have the shanghaitech layout" in err
    assert "Expected ROOT/images/IMG_N.jpg with ROOT/ground-truth/GT_IMG_N.mat" in err
    assert "pass one split folder" in err
    assert cli.main(["density", str(tmp_path), "--format", "nwpu", "--out", str(tmp_path / "o")]) == 2
    assert "ROOT/jsons/XXXX.json" in capsys.readouterr().err


def test_density_drops_out_of_image_points(tmp_path, capsys):
    """UCF-QNRF-style fixture with a point past the right border (as UCF_CC_50 image 1 has)."""
    root = tmp_path / "Train"
    root.mkdir()
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "img_0001.jpg")
    pts = np.array([[5.5, 6.5], [20.0, 30.0], [30.2, 11.0], [50.26, 20.0]])
    scipy.io.savemat(root / "img_0001_ann.mat", {"annPoints": pts})
    out = tmp_path / "maps"
    assert cli.main(["density", str(root), "--format", "ucf_qnrf", "--out", str(out)]) == 0
    assert "1 point(s) outside their images dropped" in capsys.readouterr().out
    e = _manifest(out)["images"]["img_0001"]
    assert e["head_count"] == 4 and e["in_image"] == 3
    assert e["map_sum"] == pytest.approx(3.0, rel=1e-5)
    assert np.load(out / "img_0001.npy").shape == (40, 50)


# ----------------------------------------------------------------------------------------- demo
def test_demo_fast_trains_evaluates_and_draws(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mae", "mse", "baseline_mae", "nae", "game3"} <= set(metrics)
    assert metrics["held_out_images"] == 4 and metrics["train_images"] == 8
    assert np.isfinite(metrics["mae"]) and metrics["baseline_mae"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["images"] == 12
    for row in summary["per_image"]:
        arr = np.load(out / "density" / f"{row['name']}.npy")
        assert arr.sum(dtype=np.float64) == pytest.approx(row["heads"], rel=1e-5, abs=1e-5)
    pictures = sorted((out / "pictures").glob("heldout_*.png"))
    assert len(pictures) == 4
    with Image.open(out / "learning_curve.png") as im:
        assert im.format == "PNG"
    assert "held-out MAE" in text and "baseline MAE" in text
