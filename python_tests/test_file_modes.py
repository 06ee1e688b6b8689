"""Files the commands write get the mode the user's umask gives (issue 21, item 9): the atomic writer's temp
file (mode 0o600) used to leak its mode into pictures, metrics.json, predictions.csv, checkpoints and a
resumed run's log.jsonl. The tiny model of test_engine stands in for the architectures."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from crowdkernels import cli
from crowdkernels._io import atomic_write
from crowdkernels.models import registry
from test_engine import TinyNet


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process's umask for the test; the old one is restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _modes(folder) -> dict:
    """{relative path: permission bits} of every file under ``folder``."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_open_gives(umask, tmp_path, mask, want):
    umask(mask)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    atomic_write(tmp_path / "b.txt", lambda f: f.write("x"), mode="w")
    with open(tmp_path / "plain.txt", "w") as f:  # what a plain open() gives under this umask
        f.write("x")
    assert _modes(tmp_path) == {"a.bin": want, "b.txt": want, "plain.txt": want}


def test_every_file_each_command_writes_is_0644_under_umask_022(umask, monkeypatch, tmp_path, capsys):
    umask(0o022)
    out = tmp_path / "out"
    assert cli.main(["demo", "--fast", "--out", str(out / "demo")]) == 0  # its own model, not the tiny one
    monkeypatch.setitem(registry.MODEL_BUILDERS, "csrnet", lambda **kw: TinyNet(8))
    work = tmp_path / "work"  # inputs made by the test stay outside the folders checked
    work.mkdir()
    root = work / "crowds"
    for split, names in (("train", ("t1", "t2", "t3")), ("val", ("v1", "v2"))):
        (root / split).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray((np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)).save(
                root / split / f"{name}.png")
            (root / split / f"{name}.txt").write_text("3 4\n" * (i + 1))

    run = out / "run"
    common = ["--model", "csrnet", "--out", str(run), "--lr", "3e-3", "--workers", "0", "--batch-size", "2",
              "--crop", "16", "--synthetic", "4", "2", "32"]
    assert cli.main(["train", *common, "--epochs", "1"]) == 0
    assert cli.main(["train", *common, "--epochs", "2", "--resume"]) == 0  # rewrites log.jsonl
    assert cli.main(["eval", "--checkpoint", str(run / "best.pt"), "--dataset", "folder", "--root", str(root),
                     "--split", "val", "--workers", "0", "--out", str(out / "eval.json"),
                     "--save-dir", str(out / "eval")]) == 0
    assert cli.main(["count", str(root / "val"), "--checkpoint", str(run / "best.pt"),
                     "--save-dir", str(out / "count")]) == 0
    assert cli.main(["density", str(root / "train"), "--format", "folder", "--out", str(out / "density")]) == 0
    capsys.readouterr()

    modes = _modes(out)
    for must in ("run/last.pt", "run/best.pt", "run/log.jsonl", "run/config.json", "eval.json",
                 "eval/predictions.csv", "eval/metrics.json", "eval/scatter.png",
                 "density/manifest.json", "density/t1.npy", "demo/metrics.json", "demo/run/last.pt"):
        assert must in modes
    for pictures in ("eval/pictures/", "count/", "demo/pictures/"):
        assert any(p.startswith(pictures) and p.endswith(".png") for p in modes)
    wrong = {p: oct(m) for p, m in modes.items() if m != 0o644}
    assert not wrong, f"files not 0o644 under umask 0o022: {wrong}"
