"""`crowdkernels eval` and `count` as a new user meets them (issue 15): the split asked for, folders and
patterns, --json, --save-dir outputs, output paths that are files, warnings and progress that suit a log,
--version. The tiny model of test_engine stands in for the architectures (registered as "csrnet")."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import crowdkernels as ck
from crowdkernels import cli
from crowdkernels.data import SyntheticCrowds
from crowdkernels.models import registry as train_mod
from crowdkernels.engine.checkpoint import save_checkpoint
from crowdkernels.engine.config import TrainConfig
from test_engine import TinyNet
from test_viz import _documented_size


@pytest.fixture
def ckpt(monkeypatch, tmp_path):
    """A checkpoint of the tiny model as `train` writes it (synthetic sets of 8 + 3 images of 32 px)."""
    monkeypatch.setitem(train_mod.MODEL_BUILDERS, "csrnet", lambda **kw: TinyNet(8))
    torch.manual_seed(0)
    net = TinyNet(8)
    with torch.no_grad():
        net.head.bias.fill_(0.05)  # a positive count on any image
    cfg = TrainConfig(out=str(tmp_path / "run"), model="csrnet", dataset="synthetic",
                      synthetic={"train": 8, "val": 3, "size": 32})
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, {"model_name": "csrnet", "config": cfg.to_dict(), "model": net.state_dict(), "epoch": 1, "step": 0})
    return path


def _png(path, h=40, w=56, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _eval(ckpt, *extra):
    return cli.main(["eval", "--checkpoint", str(ckpt), "--workers", "0", *extra])


# ----------------------------------------------------------------------------------------- eval
def test_eval_split_train_evaluates_the_training_images(ckpt, tmp_path, capsys):
    """Defect 1: `eval --split train` used to evaluate the validation split."""
    counts = {}
    for split in ("train", "val"):
        out = tmp_path / f"{split}.json"
        assert _eval(ckpt, "--dataset", "synthetic", "--split", split, "--out", str(out)) == 0
        counts[split] = [r["true"] for r in json.loads(out.read_text())["per_image"]]
    assert counts["train"] == SyntheticCrowds(8, 32, 0).counts
    assert counts["val"] == SyntheticCrowds(3, 32, 1000).counts
    captured = capsys.readouterr()
    assert "eval synthetic/train: 8 images" in captured.out
    # not a terminal: one progress line per evaluation, no bar frames
    assert captured.err.count("eval: 8/8 img in") == 1 and captured.err.count("eval: 3/3 img in") == 1
    assert "\r" not in captured.err

    root = tmp_path / "crowds"
    for split, names in (("train", ("t1", "t2", "t3")), ("val", ("v1", "v2"))):
        for i, name in enumerate(names):
            _png(root / split / f"{name}.png", seed=i)
            (root / split / f"{name}.txt").write_text("3 4\n" * (i + 1))
    for split, names in (("train", ["t1", "t2", "t3"]), ("val", ["v1", "v2"])):
        out = tmp_path / f"folder_{split}.json"
        assert _eval(ckpt, "--dataset", "folder", "--root", str(root), "--split", split, "--out", str(out)) == 0
        assert [r["name"] for r in json.loads(out.read_text())["per_image"]] == names


def test_eval_save_dir_writes_predictions_pictures_and_scatter(ckpt, tmp_path, capsys):
    root = tmp_path / "crowds"
    heads = {"a": [[3, 4], [20, 30]], "b": [[10, 10]], "c": []}
    for i, (name, pts) in enumerate(heads.items()):
        _png(root / f"{name}.png", 24 + 8 * i, 40, seed=i)
        (root / f"{name}.txt").write_text("".join(f"{x} {y}\n" for x, y in pts))
    save = tmp_path / "report"
    assert _eval(ckpt, "--dataset", "folder", "--root", str(root), "--save-dir", str(save),
                 "--out", str(tmp_path / "m.json")) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    held = [r["name"] for r in metrics["per_image"]]  # the held-out images of a single folder
    with open(save / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(root / f"{n}.png") for n in held]
    for r, p in zip(rows, metrics["per_image"]):
        assert float(r["true_count"]) == p["true"] == len(heads[p["name"]])
        assert float(r["predicted_count"]) == pytest.approx(p["pred"], rel=1e-9)
        assert float(r["error"]) == pytest.approx(p["pred"] - p["true"], rel=1e-9, abs=1e-9)
        with Image.open(save / "pictures" / f"{p['name']}.png") as im:
            h = 24 + 8 * list(heads).index(p["name"])
            assert im.size == _documented_size(h, 40, 3)  # image | predicted | true
    assert json.loads((save / "metrics.json").read_text())["mae"] == metrics["mae"]
    with Image.open(save / "scatter.png") as im:
        assert im.size == (640, 640)
    assert "picture(s) in" in capsys.readouterr().out
    # --pictures caps the drawing, not the predictions
    save2 = tmp_path / "report2"
    assert _eval(ckpt, "--dataset", "folder", "--root", str(root), "--save-dir", str(save2),
                 "--pictures", "0") == 0
    assert not list((save2 / "pictures").iterdir()) and (save2 / "predictions.csv").is_file()


def test_eval_amp_on_the_cpu_warns_in_one_line(ckpt, capsys):
    assert _eval(ckpt, "--dataset", "synthetic", "--amp", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "crowdkernels eval: warning: amp: autocast runs on GPUs only" in err
    assert "UserWarning" not in err and "warnings.warn" not in err


# ----------------------------------------------------------------------------------------- count
def test_count_folders_patterns_and_json(ckpt, tmp_path, capsys):
    """Defect 6: `count FOLDER` said "image file not found"; --json prints one list and nothing else."""
    shots = tmp_path / "shots"
    paths = [_png(shots / f"s{i}.png", seed=i) for i in (1, 2, 10)]
    (shots / "readme.txt").write_text("not an image")
    counter = ck.load(ckpt)
    expected = {str(p): counter.count(p) for p in paths}
    capsys.readouterr()
    assert cli.main(["count", str(shots), "--checkpoint", str(ckpt), "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)  # stdout is exactly one JSON document
    assert [g["image"] for g in got] == [str(shots / n) for n in ("s1.png", "s2.png", "s10.png")]
    for g in got:
        assert set(g) == {"image", "count"} and g["count"] == pytest.approx(expected[g["image"]], rel=1e-6)
    assert "count: 3/3 img in" in captured.err and "\r" not in captured.err  # progress: a line, on stderr
    assert cli.main(["count", str(shots / "s1*.png"), "--checkpoint", str(ckpt), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(shots / "s1.png"), str(shots / "s10.png")]
    assert cli.main(["count", str(tmp_path / "nothing*.png"), "--checkpoint", str(ckpt)]) == 2
    assert "no image matches the pattern" in capsys.readouterr().err


def test_count_reports_a_bad_file_once_and_the_rest_goes_on(ckpt, tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert cli.main(["count", str(good), str(bad), "--checkpoint", str(ckpt), "--json"]) == 1
    captured = capsys.readouterr()
    assert [g["image"] for g in json.loads(captured.out)] == [str(good)]
    assert "1 file(s) skipped" in captured.err
    for line in captured.err.splitlines():
        assert line.count("broken.jpg") <= 1, line  # the skipped-file report used to print the path twice
    assert cli.main(["count", str(good), str(bad), "--checkpoint", str(ckpt), "--strict"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_count_sixteen_bit_png_counts_as_its_eight_bit_twin(ckpt, tmp_path, capsys):
    """Defect 2 end to end: a 16-bit PNG used to load white and count about double."""
    from test_datasets import _write_png16

    gray8 = (np.random.default_rng(3).random((40, 56)) * 255).astype(np.uint8)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    _write_png16(tmp_path / "g16.png", gray8.astype(np.uint16) * 257)
    assert cli.main(["count", str(tmp_path / "g8.png"), str(tmp_path / "g16.png"), "--checkpoint", str(ckpt), "--json"]) == 0
    c8, c16 = (g["count"] for g in json.loads(capsys.readouterr().out))
    assert c16 == pytest.approx(c8, rel=1e-5)


def test_count_pictures_with_and_without_an_annotation(ckpt, tmp_path, capsys):
    _png(tmp_path / "in" / "plain.png", 30, 44)
    _png(tmp_path / "in" / "known.png", 30, 44, seed=1)
    (tmp_path / "in" / "known.txt").write_text("5 5\n20 12\n")
    save = tmp_path / "pics"
    assert cli.main(["count", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--save-dir", str(save), "--amp"]) == 0
    err = capsys.readouterr().err
    assert "crowdkernels count: warning: amp" in err
    with Image.open(save / "plain.png") as im:
        assert im.size == _documented_size(30, 44, 2)  # image | predicted
    with Image.open(save / "known.png") as im:
        assert im.size == _documented_size(30, 44, 3)  # image | predicted | true


# ----------------------------------------------------------------------------------------- every command
def test_an_output_path_that_is_a_file_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    """Defect 5: --out / --save-dir naming an existing file gave a Python traceback."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    img = _png(tmp_path / "x.png")
    root = tmp_path / "crowds"
    _png(root / "a.png")
    (root / "a.txt").write_text("1 1\n")
    runs = {
        "density": ["density", str(root), "--format", "folder", "--out", str(blocker)],
        "train": ["train", "--model", "csrnet", "--out", str(blocker), "--epochs", "1", "--workers", "0",
                  "--synthetic", "4", "2", "32"],
        "eval": ["eval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--workers", "0", "--save-dir", str(blocker)],
        "eval --out": ["eval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--workers", "0",
                       "--out", str(blocker / "m.json")],
        "count": ["count", str(img), "--checkpoint", str(ckpt), "--save-dir", str(blocker)],
        "count below": ["count", str(img), "--checkpoint", str(ckpt), "--save-dir", str(blocker / "sub")],
        "demo": ["demo", "--fast", "--out", str(blocker)],
    }
    for what, argv in runs.items():
        assert cli.main(argv) == 2, what
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "is an existing file" in lines[0] and str(blocker) in lines[0], (what, captured.err)
        assert "Traceback" not in captured.err and captured.out == ""
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"crowdkernels {ck.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_eval_strict_stops_at_an_image_that_does_not_decode(ckpt, tmp_path, capsys, workers):
    """A file whose header reads but whose pixels do not: skipped and named, or with --strict one line and
    exit 1, also when DataLoader workers decode it (it used to surface as a worker's RuntimeError)."""
    root = tmp_path / "crowds"
    for name in ("a", "b"):
        _png(root / "val" / f"{name}.png", 40, 56)
        (root / "val" / f"{name}.txt").write_text("3 4\n")
    data = (root / "val" / "b.png").read_bytes()
    (root / "val" / "b.png").write_bytes(data[: len(data) // 2])  # truncated: the header survives
    args = ["--dataset", "folder", "--root", str(root), "--workers", workers]
    assert cli.main(["eval", "--checkpoint", str(ckpt), *args]) == 0
    captured = capsys.readouterr()
    assert "1 images" in captured.out and "1 file(s) skipped" in captured.out and "b.png" in captured.err
    assert "eval: 1/2 img evaluated, 1 skipped, in" in captured.err  # issue 21: not "2/2 img (done)"
    assert cli.main(["eval", "--checkpoint", str(ckpt), *args, "--strict"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("crowdkernels eval: error: ") and "b.png" in err[-1] and "Traceback" not in err[-1]


def test_count_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`crowdkernels count FOLDER | head -1` gave a BrokenPipeError traceback once head had its line."""
    import subprocess
    import sys

    shots = tmp_path / "shots"
    for i in range(30):
        _png(shots / f"s{i}.png", 16, 16, seed=i)
    # a subprocess: a real small CSRNet (the tiny stand-in of the other tests exists in this process only)
    from test_inference import _checkpoint

    real = _checkpoint(tmp_path / "real" / "best.pt", "csrnet")
    from conftest import CHILD_CWD, child_env

    proc = subprocess.Popen([sys.executable, "-m", "crowdkernels", "count", str(shots), "--checkpoint", str(real)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=CHILD_CWD)
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert first.startswith(str(shots).encode()) and "Traceback" not in err


# ----------------------------------------------------------------------------------------- issue 21
def _train_tiny(out, *extra):
    """`crowdkernels train` of the tiny stand-in (registered as csrnet by the fixture), a couple of steps."""
    return cli.main(["train", "--model", "csrnet", "--out", str(out), "--lr", "3e-3", "--workers", "0",
                     "--batch-size", "4", "--crop", "16", "--epochs", "1", *extra])


def _log_val_mae(run) -> float:
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [e["val"]["mae"] for e in entries if e["val"]][-1]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(train_mod.MODEL_BUILDERS, "csrnet", lambda **kw: TinyNet(8))


def test_eval_of_a_checkpoint_reproduces_its_training_log(tiny, tmp_path, capsys):
    """Issue 21, item 1: a model trained with --max-size was evaluated (and counted) at full size: `eval
    --checkpoint best.pt` disagreed with the training log by 17x. Now the checkpoint's own settings are used
    (and said), so eval without flags gives the log's validation MAE."""
    run = tmp_path / "run"
    assert _train_tiny(run, "--synthetic", "8", "3", "64", "--max-size", "24") == 0
    logged = _log_val_mae(run)
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert _eval(run / "best.pt", "--dataset", "synthetic", "--out", str(report)) == 0
    got = json.loads(report.read_text())
    assert got["mae"] == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert got["settings"]["max_size"] == 24 and got["settings"]["sources"]["max_size"] == "checkpoint"
    assert got["settings"]["tile"] == 2048 and got["settings"]["pad_multiple"] == 16
    err = capsys.readouterr().err
    assert "input settings: max size 24 (checkpoint)" in err and "normalization ImageNet mean/std (checkpoint)" in err
    # an explicit --max-size overrides the checkpoint's (and 'none' turns it off): other numbers, said so
    assert _eval(run / "best.pt", "--dataset", "synthetic", "--max-size", "none", "--out", str(report)) == 0
    full = json.loads(report.read_text())
    assert full["settings"]["max_size"] is None and full["settings"]["sources"]["max_size"] == "override"
    assert full["mae"] != pytest.approx(logged, rel=1e-3)
    assert "max size none (override)" in capsys.readouterr().err

    # count, and ck.load, feed images as the training did: 24 px, not 64
    img = _png(tmp_path / "crowd.png", 64, 64)
    counter = ck.load(run / "best.pt")
    assert counter.max_size == 24 and counter.settings()["sources"]["max_size"] == "checkpoint"
    assert counter.predict(img).input_size == (24, 24)
    assert counter.count(img) == pytest.approx(ck.load(run / "best.pt", max_size=24).count(img), rel=1e-6)
    assert ck.load(run / "best.pt", max_size=None).predict(img).input_size == (64, 64)
    assert cli.main(["count", str(img), "--checkpoint", str(run / "best.pt"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["count"] == pytest.approx(counter.count(img), rel=1e-6)
    assert "input settings: max size 24 (checkpoint)" in captured.err


def test_eval_reproduces_the_log_on_real_images_held_out_by_val_from_train(tiny, tmp_path, capsys):
    """Item 1 on the shared ShanghaiTech B samples (1024 x 768, trained at --max-size 96, validated on the
    images --val-from-train held out): eval without flags takes the same images, at the same size."""
    from conftest import require_data

    root = require_data("ShanghaiTech")
    run = tmp_path / "run"
    assert _train_tiny(run, "--dataset", "shanghaitech-b", "--root", str(root), "--max-size", "96",
                       "--val-from-train", "0.25", "--seed", "3") == 0
    logged = _log_val_mae(run)
    report = tmp_path / "eval.json"
    assert _eval(run / "best.pt", "--dataset", "shanghaitech-b", "--root", str(root), "--out", str(report)) == 0
    got = json.loads(report.read_text())
    assert got["images"] == 6 and got["mae"] == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert "--val-from-train" in capsys.readouterr().err


def test_eval_knows_the_training_data_given_by_another_path(tiny, tmp_path, monkeypatch, capsys):
    """A run started with a relative --root, evaluated from another folder with the absolute path: the same
    dataset, so the images --val-from-train held out (not every 10th image, most of them trained on)."""
    from conftest import require_data

    root = require_data("ShanghaiTech")
    monkeypatch.chdir(root.parent)
    run = tmp_path / "run"
    assert _train_tiny(run, "--dataset", "shanghaitech-b", "--root", root.name, "--max-size", "96",
                       "--val-from-train", "0.25", "--seed", "3") == 0
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "eval.json"
    assert _eval(run / "best.pt", "--dataset", "shanghaitech-b", "--root", str(root.resolve()), "--out", str(report)) == 0
    got = json.loads(report.read_text())
    assert got["images"] == 6 and got["mae"] == pytest.approx(_log_val_mae(run), rel=1e-5, abs=1e-6)
    assert "--val-from-train" in capsys.readouterr().err


def test_an_explicit_split_the_dataset_does_not_have_is_an_error(ckpt, tmp_path, capsys):
    """Item 2: `eval --split test` on a dataset without a test split evaluated training images and exited 0."""
    from conftest import require_data

    root = require_data("ShanghaiTech")  # part_B/train_data only
    for split in ("test", "val"):
        assert _eval(ckpt, "--dataset", "shanghaitech-b", "--root", str(root), "--split", split) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"crowdkernels eval: error: there is no {split} split under"), err
        assert "part_B/train_data/" in err[0] and "part_B/test_data/" in err[0]  # found, and looked for
        assert captured.out == ""
    # the default is still the held-out tenth of the training images, and says so
    assert _eval(ckpt, "--dataset", "shanghaitech-b", "--root", str(root)) == 0
    captured = capsys.readouterr()
    assert "eval shanghaitech-b/val (trained on synthetic): 2 images" in captured.out
    assert "every 10th image" in captured.err
    crowds = tmp_path / "crowds"
    for name in ("a", "b"):
        _png(crowds / "train" / f"{name}.png")
        (crowds / "train" / f"{name}.txt").write_text("3 4\n")
    _png(crowds / "test" / "c.png")
    (crowds / "test" / "c.txt").write_text("3 4\n")
    assert _eval(ckpt, "--dataset", "folder", "--root", str(crowds), "--split", "test") == 0  # there: fine
    capsys.readouterr()
    assert _eval(ckpt, "--dataset", "folder", "--root", str(crowds), "--split", "val") == 0  # val: the test split
    assert "eval folder/val (trained on synthetic): 1 images" in capsys.readouterr().out


def test_count_save_dir_keeps_images_of_the_same_name(ckpt, tmp_path, capsys):
    """Item 3: a/crowd.jpg and b/crowd.jpg were drawn to the same crowd.png, the second over the first."""
    a = _png(tmp_path / "a" / "crowd.png", 30, 40, seed=1)
    b = _png(tmp_path / "b" / "crowd.png", 36, 40, seed=2)
    c = _png(tmp_path / "a" / "other.png", 24, 40, seed=3)
    Image.open(a).convert("RGB").save(tmp_path / "a" / "crowd.jpg")
    d = tmp_path / "a" / "crowd.jpg"
    save = tmp_path / "pics"
    assert cli.main(["count", str(a), str(b), str(c), str(d), "--checkpoint", str(ckpt), "--save-dir", str(save)]) == 0
    names = sorted(p.name for p in save.iterdir())
    assert names == sorted(["a__crowd.png.png", "b__crowd.png.png", "a__crowd.jpg.png", "other.png"]), names
    assert cli.main(["count", str(a), str(b), "--checkpoint", str(ckpt), "--save-dir", str(tmp_path / "two")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["a__crowd.png", "b__crowd.png"]
    for name, h in (("a__crowd.png", 30), ("b__crowd.png", 36)):
        with Image.open(tmp_path / "two" / name) as im:
            assert im.size == _documented_size(h, 40, 2)  # each image's own picture
    helptext = cli.build_parser()._subparsers._group_actions[0].choices["count"].format_help()
    assert "a__crowd.png" in helptext


def test_count_tile_below_the_minimum_is_one_line(ckpt, tmp_path, capsys):
    """Item 5: `count --tile 100` ended in a traceback from the tiler; the minimum is in --help."""
    img = _png(tmp_path / "big.png", 200, 300)
    for command in (["count", str(img)], ["eval", "--dataset", "synthetic"]):
        assert cli.main([*command, "--checkpoint", str(ckpt), "--tile", "100"]) == 2
        err = capsys.readouterr().err
        assert "at least 144" in err.strip().splitlines()[-1] and "Traceback" not in err  # argparse: usage, error
    assert cli.main(["count", str(img), "--checkpoint", str(ckpt), "--tile", "144"]) == 0
    tiled = float(capsys.readouterr().out.split("\t")[1])
    assert tiled == pytest.approx(ck.load(ckpt, tile=None).count(img), rel=1e-4)
    parser = cli.build_parser()._subparsers._group_actions[0].choices
    for name in ("count", "eval"):
        assert "at least 144" in " ".join(parser[name].format_help().split())
    with pytest.raises(ValueError, match="at least 144"):
        ck.load(ckpt, tile=100)


def test_count_says_what_a_url_a_folder_and_a_video_are(ckpt, tmp_path, capsys):
    """Item 8: a URL was reported as `https:/example.com/crowd.jpg: image file not found`; videos were
    "not found" or silently left out of a folder."""
    shots = tmp_path / "shots"
    img = _png(shots / "s1.png")
    (shots / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    url = "https://example.com/crowd.jpg"
    assert cli.main(["count", url, str(shots / "clip.mp4"), str(shots), "--checkpoint", str(ckpt), "--json"]) == 1
    captured = capsys.readouterr()
    assert [g["image"] for g in json.loads(captured.out)] == [str(img)]
    assert f"{url}: a URL: crowdkernels reads local image files only" in captured.err
    assert "https:/example" not in captured.err.replace("https://", "")
    assert f"{shots / 'clip.mp4'}: a video" in captured.err
    assert f"crowdkernels count: warning: {shots}: 1 video file(s) left out (clip.mp4)" in captured.err
    assert "count: 1/3 img counted, 2 skipped, in" in captured.err  # item 13: not "3/3 img (done)"
    (shots / "s1.png").unlink()
    assert cli.main(["count", str(shots), "--checkpoint", str(ckpt)]) == 2
    assert "video file(s) are not read" in capsys.readouterr().err
