"""`crowdkernels train`, `eval` and `count` in-process, with the tiny model of test_engine standing in for
the architectures (registered under the name "csrnet" for these tests). The demo is in test_cli.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crowdkernels import cli
from crowdkernels.engine import train as train_mod
from test_engine import TinyNet

SYN = ["--synthetic", "8", "3", "32"]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(train_mod.MODEL_BUILDERS, "csrnet", lambda **kw: TinyNet(8))


def _train(out, *extra):
    return cli.main(["train", "--model", "csrnet", "--out", str(out), "--lr", "3e-3", "--workers", "0",
                     "--batch-size", "4", "--crop", "16", *SYN, *extra])


def test_train_resume_eval_and_count(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "2") == 0
    text = capsys.readouterr().out
    assert "train: finished after 2 epoch(s); best val MAE" in text and "0 file(s) skipped" in text
    assert {"last.pt", "best.pt", "log.jsonl", "config.json"} <= {p.name for p in run.iterdir()}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["crop"] == 16 and cfg["lr"] == 3e-3 and cfg["lr_step"] is None and cfg["model_kwargs"] == {}

    assert _train(run, "--epochs", "3") == 2  # an existing run needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _train(run, "--epochs", "3", "--resume") == 0
    assert "after 3 epoch(s)" in capsys.readouterr().out
    assert len((run / "log.jsonl").read_text().splitlines()) == 3

    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(run / "best.pt"), "--dataset", "synthetic", "--workers", "0",
                     "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "eval synthetic/val: 3 images  MAE" in out and "GAME3" in out
    got = json.loads(report.read_text())
    assert got["images"] == 3 and got["model"] == "csrnet" and {"mae", "mse", "nae", "game0", "levels"} <= set(got)
    assert got["game0"] == pytest.approx(got["mae"]) and "RMSE" in got["note"]

    # a checkpoint of another model: an error naming both
    assert cli.main(["eval", "--checkpoint", str(run / "best.pt"), "--dataset", "synthetic", "--model", "hmode"]) == 2
    err = capsys.readouterr().err
    assert "'csrnet'" in err and "'hmode'" in err

    imgs = []
    for i in range(2):
        p = tmp_path / f"crowd{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 56, 3)) * 255).astype(np.uint8)).save(p)
        imgs.append(str(p))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    saves = tmp_path / "overlays"
    code = cli.main(["count", *imgs, str(bad), "--checkpoint", str(run / "last.pt"), "--save-dir", str(saves)])
    captured = capsys.readouterr()
    assert code == 1  # one image failed
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == imgs
    assert all(np.isfinite(float(line.split("\t")[1])) for line in lines)
    assert "broken.jpg" in captured.err and "1 file(s) skipped" in captured.err
    for i in range(2):
        with Image.open(saves / f"crowd{i}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 600


def test_train_on_a_folder_skips_bad_files(tiny, tmp_path, capsys):
    root = tmp_path / "crowds"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text("".join(f"{x:.1f} {y:.1f}\n" for x, y in rng.random((5, 2)) * [40, 32]))
    (root / "img2.txt").write_text("3 4\nnan 5\n")  # NaN point
    (root / "img4.txt").unlink()  # missing annotation
    code = _train(tmp_path / "run", "--dataset", "folder", "--root", str(root), "--epochs", "1")
    captured = capsys.readouterr()
    assert code == 0
    assert "img2.txt" in captured.err and "img4.txt" in captured.err
    assert "2 file(s) skipped" in captured.out

    assert _train(tmp_path / "strict", "--dataset", "folder", "--root", str(root), "--epochs", "1", "--strict") == 1
    assert "img2.txt" in capsys.readouterr().err


def test_wrong_layout_and_missing_root(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(tmp_path / "run", "--dataset", "shanghaitech-a", "--root", str(empty), "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "part_A/train_data" in err and "ground-truth" in err
    assert _train(tmp_path / "run", "--dataset", "jhu", "--epochs", "1") == 2
    assert "--root is required" in capsys.readouterr().err


def test_full_demo_meets_its_targets(tmp_path, capsys):
    """The main job as the README's Quick start runs it (default settings, ~40 s on 2 idle cores): the
    trained model's held-out MAE must be at most half the mean-count baseline's. Guards against the
    failure seen while building it: a model that learns only the mean count (MAE == baseline)."""
    rc = cli.main(["demo", "--out", str(tmp_path / "demo")])
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert rc == 0, capsys.readouterr().out[-2000:]
    assert metrics["ok"] and metrics["mae"] <= metrics["baseline_mae"] / 2, metrics
    assert metrics["stopped_by"] == "finished"  # within the time budget, not cut short
    assert (tmp_path / "demo" / "learning_curve.png").stat().st_size > 0
    assert len(list((tmp_path / "demo" / "pictures").glob("heldout_*.png"))) >= 1


@pytest.mark.parametrize("text, seconds", [("900", 900.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0)])
def test_time_limit_takes_durations(text, seconds, capsys):
    assert cli.main(["train", "--recipe", "csrnet", "--print-config", "--time-limit", text, "--max-steps", "7"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["max_seconds"] == seconds and config["max_steps"] == 7


@pytest.mark.parametrize("text", ["0", "-5m", "soon", "15x", "inf"])
def test_a_bad_time_limit_is_one_line(text, capsys):
    assert cli.main(["train", "--recipe", "csrnet", "--print-config", f"--time-limit={text}"]) == 2
    err = capsys.readouterr().err
    assert "argument --time-limit: expected a positive duration" in err.splitlines()[-1] and "Traceback" not in err


def test_a_step_budget_run_stops_saved_and_resumes(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "3", "--max-steps", "3") == 0  # 2 steps an epoch: stops inside epoch 2
    out = capsys.readouterr()
    assert "train: step limit" in out.out and "step limit reached at epoch 2, step 1" in out.err
    assert _train(run, "--epochs", "3", "--resume") == 0
    assert "train: finished after 3 epoch(s)" in capsys.readouterr().out
