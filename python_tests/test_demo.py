"""The demo as a library function (crowdkernels.engine.demo.run_demo): its files, and that what it leaves
behind works with the rest of the library: the checkpoint loads with crowdkernels.load and counts the
written held-out images as the demo's own evaluation did; the data folder is a `folder` dataset."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import crowdkernels as ck
from crowdkernels.data import SyntheticCrowds, list_samples
from crowdkernels.engine.demo import FAST, run_demo


def test_run_demo_files_and_a_checkpoint_that_counts_like_the_demo(tmp_path):
    out = tmp_path / "demo"
    log = io.StringIO()
    summary = run_demo(out, num_images=6, val_images=3, size=48, epochs=1, lr=FAST["lr"], batch_size=3, pictures=2,
                       stream=log)
    assert summary["ok"] and summary["images"] == 9
    assert "held-out MAE" in log.getvalue()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_images"] == 3 and json.loads((out / "summary.json").read_text())["metrics"]["mae"] == metrics["mae"]
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["heldout_synthetic_0000.png", "heldout_synthetic_0001.png"]
    assert (out / "learning_curve.png").is_file() and (out / "run" / "last.pt").is_file()

    # the data folders: lossless images and their heads, in the `folder` format
    val = SyntheticCrowds(3, 48, 1000).base
    samples = list_samples(out / "data" / "val", "folder")
    assert [s.name for s in samples] == ["heldout_" + val[i].name for i in range(3)]
    for s, ref in zip(samples, (val[i] for i in range(3))):
        np.testing.assert_array_equal(np.asarray(Image.open(s.image)), ref.image)
        np.testing.assert_allclose(s.points(), ref.points, atol=5e-4)
    assert len(list_samples(out / "data" / "train", "folder")) == 6

    # the final model (last.pt) counts the written images as the demo's evaluation counted the rendered ones
    counter = ck.load(out / "run" / "last.pt", device="cpu")
    got = counter.count_many([s.image for s in samples], progress=False)
    assert got == pytest.approx([r["pred"] for r in metrics["per_image"]], rel=1e-5, abs=1e-6)


def test_a_held_out_image_has_one_name_in_every_output(tmp_path):
    """Issue 21, item 13: pictures/ and density/ said heldout_synthetic_0000, data/val/ and metrics.json
    synthetic_0000."""
    out = tmp_path / "demo"
    run_demo(out, num_images=4, val_images=2, size=32, epochs=1, lr=FAST["lr"], batch_size=2, pictures=2,
             stream=io.StringIO())
    names = ["heldout_synthetic_0000", "heldout_synthetic_0001"]
    assert sorted(p.stem for p in (out / "pictures").iterdir()) == names
    assert sorted(p.stem for p in (out / "density").glob("heldout_*.npy")) == names
    assert sorted(p.stem for p in (out / "data" / "val").glob("*.png")) == names
    assert sorted(p.stem for p in (out / "data" / "val").glob("*.txt")) == names
    assert [r["name"] for r in json.loads((out / "metrics.json").read_text())["per_image"]] == names
    held = [r["name"] for r in json.loads((out / "summary.json").read_text())["per_image"] if r["name"].startswith("heldout_")]
    assert held == names
