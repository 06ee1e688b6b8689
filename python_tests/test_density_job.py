"""The density job as a library function (crowdkernels.data.density_job.run_density_job), without the
command line: its manifest, reuse by annotation hash, refused settings, strict mode, and the progress it
prints. The command line's own tests (test_cli.py) run the same job through `crowdkernels density`."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import crowdkernels as ck
from crowdkernels.data import LayoutError, read_point_file
from crowdkernels.data.density_job import DensityJobError, DensitySettings, file_sha256, run_density_job


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "crowds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((5, 0, 12)):
        Image.fromarray(np.zeros((30 + i, 40, 3), np.uint8)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in rng.random((n, 2)) * [40, 30]))
    return folder


def test_job_writes_maps_and_manifest(root, tmp_path):
    out = tmp_path / "maps"
    lines = io.StringIO()
    m = run_density_job(root, "folder", out, DensitySettings(stride=2), warn=lines.write)
    assert list(m["images"]) == ["im0", "im1", "im2"] and m["failures"] == {}
    assert m["summary"] == {"images": 3, "done": 3, "written": 3, "reused": 0, "failed": 0, "heads": 17,
                            "points_outside": 0, "map_sum": pytest.approx(17, rel=1e-5)}
    for i, name in enumerate(m["images"]):
        e = m["images"][name]
        arr = np.load(out / e["file"])
        assert arr.shape == (-(-(30 + i) // 2), 20) and e["map_size"] == list(arr.shape)
        assert e["annotation_sha256"] == file_sha256(root / f"{name}.txt")
        pts = read_point_file(root / f"{name}.txt")
        expected = ck.density_map(torch.from_numpy(pts), (30 + i, 40), stride=2).float().numpy()
        np.testing.assert_array_equal(arr, expected)
    assert lines.getvalue() == ""
    again = run_density_job(root, "folder", out, DensitySettings(stride=2))
    assert again["summary"]["reused"] == 3 and again["images"] == m["images"]


def test_job_refuses_other_settings_and_bad_ones(root, tmp_path):
    out = tmp_path / "maps"
    run_density_job(root, "folder", out)
    with pytest.raises(DensityJobError, match=r"other settings \(sigma 'adaptive' -> 2.0\)"):
        run_density_job(root, "folder", out, DensitySettings(sigma=2.0))
    assert run_density_job(root, "folder", out, DensitySettings(sigma=2.0), overwrite=True)["summary"]["written"] == 3
    with pytest.raises(DensityJobError, match="odd"):
        run_density_job(root, "folder", out, DensitySettings(style="matlab", kernel_size=14))
    with pytest.raises(DensityJobError, match="sigma"):
        run_density_job(root, "folder", out, DensitySettings(sigma=-1.0))
    with pytest.raises(LayoutError, match="folder layout"):
        run_density_job(tmp_path / "nowhere", "folder", out)
    if not torch.cuda.is_available():
        with pytest.raises(DensityJobError, match="no CUDA GPU"):
            run_density_job(root, "folder", out, device="cuda")


def test_job_strict_and_per_file_errors(root, tmp_path, capsys):
    (root / "im1.txt").write_text("1 nan\n")
    notes = []
    m = run_density_job(root, "folder", tmp_path / "a", warn=notes.append)
    assert list(m["images"]) == ["im0", "im2"] and list(m["failures"]) == ["im1"] and "not finite" in m["failures"]["im1"]
    assert len(notes) == 1 and notes[0].startswith("crowdkernels density: error: ") and "im1.txt" in notes[0]
    assert capsys.readouterr().err.startswith("density: 2/3 img done, 1 failed, in")  # issue 21: not "3/3 img"
    m = run_density_job(root, "folder", tmp_path / "b", strict=True, warn=notes.append)
    assert list(m["images"]) == ["im0"] and list(m["failures"]) == ["im1"]  # stopped at the bad file


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_job_progress_is_a_bar_on_a_terminal_and_a_line_in_a_log(root, tmp_path, monkeypatch, capsys):
    run_density_job(root, "folder", tmp_path / "log")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("density: 3/3 img in") and "\r" not in err
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run_density_job(root, "folder", tmp_path / "tty")
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()  # tqdm's redraws
    run_density_job(root, "folder", tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
