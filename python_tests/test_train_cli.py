"""`crowdkernels train`, `eval` and `count` in-process, with the tiny model of test_engine standing in for
the architectures (registered under the name "csrnet" for these tests). The demo is in test_cli.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crowdkernels import cli
from crowdkernels.models import registry as train_mod
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


# ----------------------------------------------------------------------------------------- issue 21
def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crowdkernels train: error: ") and "Traceback" not in captured.err, err
    return err[0]


@pytest.mark.parametrize("print_config", [False, True])
def test_loss_and_model_options_a_model_does_not_take_are_one_line(tmp_path, capsys, print_config):
    """Item 5: `--recipe csrnet --loss-weights 1,1,1` was a TypeError traceback from CSRNet.criterion(), the wrong
    number of weights on hmode a ValueError traceback; --print-config printed both configurations."""
    extra = ["--print-config"] if print_config else ["--out", str(tmp_path / "run"), "--workers", "0",
                                                       "--synthetic", "2", "1", "32", "--epochs", "1"]
    assert cli.main(["train", "--recipe", "csrnet", "--loss-weights", "1,1,1", *extra]) == 2
    line = _one_error_line(capsys)
    assert "--loss-weights (criterion_kwargs.weights): the 'csrnet' loss has no option 'weights'" in line
    assert "hmode" in line and "density_weight" in line  # where weights belong, and what the csrnet loss takes
    assert cli.main(["train", "--model", "hmode", "--width", "0.125", "--loss-weights", "1,1,1", *extra]) == 2
    assert "weights must have one value per density output (7), got 3" in _one_error_line(capsys)
    assert cli.main(["train", "--model", "spn", "--set", 'criterion_kwargs.reduction="max"', *extra]) == 2
    assert "reduction must be 'sum' or 'mean'" in _one_error_line(capsys)
    assert cli.main(["train", "--model", "csrnet", "--width", "5", *extra]) == 2
    assert "--width (model_kwargs.width)" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything started
    assert cli.main(["train", "--model", "hmode", "--loss-weights", "1,1,1,1,1,1,2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["criterion_kwargs"]["weights"] == [1, 1, 1, 1, 1, 1, 2]


def test_resume_without_a_checkpoint_is_an_error(tiny, tmp_path, capsys):
    """Item 7: `--resume` with a mistyped --out started a new full-size default run."""
    typo = tmp_path / "runz"
    for extra in ([], ["--print-config"]):
        assert cli.main(["train", "--out", str(typo), "--resume", *extra]) == 2
        line = _one_error_line(capsys)
        assert f"there is no run to continue in {typo} (no last.pt there)" in line and "leave out --resume" in line
    assert not typo.exists()
    assert cli.main(["train", "--resume", "--print-config"]) == 2
    assert "--resume needs --out" in _one_error_line(capsys)
    # the library refuses it too (a config made by hand)
    from crowdkernels.engine import TrainError
    from test_engine import make_trainer, tiny_config

    with pytest.raises(TrainError, match="no run to continue"):
        make_trainer(tiny_config(tmp_path / "lib", resume=True)).run()


def test_pretrained_messages_say_the_real_reason_first(tmp_path, capsys):
    """Item 10: a missing --pretrained file at --width 0.25 was reported as "needs width=1.0"; a JPEG passed as
    --pretrained printed PyTorch's advice to set weights_only=False."""
    base = ["train", "--model", "csrnet", "--width", "0.25", "--workers", "0", "--synthetic", "2", "1", "32",
            "--epochs", "1"]
    assert cli.main([*base, "--pretrained", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "r1")]) == 2
    line = _one_error_line(capsys)
    assert "not found" in line and "width" not in line.split("not found")[0]
    jpeg = tmp_path / "crowd.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg)
    for width in ("0.25", "1"):
        argv = [*base, "--width", width, "--pretrained", str(jpeg), "--out", str(tmp_path / f"r{width}")]
        assert cli.main(argv) == 2
        line = _one_error_line(capsys)
        assert f"--pretrained: {jpeg}: not a PyTorch weights file (a JPEG image)" in line
        assert "weights_only" not in line and "download.pytorch.org/models/vgg16-" in line
