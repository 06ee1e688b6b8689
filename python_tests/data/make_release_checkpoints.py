"""Writes the checkpoints of python_tests/data/release-0.1.0/ with the crowdkernels this runs under.

They were written by crowdkernels 0.1.0 (commit 30ec1ee, before issue 19), whose checkpoints pickle the NumPy
RNG state as a NumPy array, so that test_safe_loading.py checks that files of that release still load with
torch.load(weights_only=True) and resume exactly. Rerunning it with a later crowdkernels writes that version's
files instead, which is not what the test data is for. A tiny CSRNet (width 1/32) on synthetic crowds, two
epochs of three steps:

- interrupted.pt: the run's last.pt after a Ctrl-C at epoch 2, step 1 (mid-epoch: its "rng" and its
  "epoch_state" hold RNG states);
- finished.pt: the last.pt of the same run left uninterrupted (the result a resume of interrupted.pt must give).

    python python_tests/data/make_release_checkpoints.py python_tests/data/release-0.1.0
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from crowdkernels.engine.config import build_config
from crowdkernels.engine.trainer import Trainer, build_run

OVERRIDES = {"model": "csrnet", "model_kwargs.width": 0.03125, "epochs": 2, "batch_size": 2, "crop": 32,
             "optimizer": "adam", "lr": 1e-3, "lr_step": None, "workers": 0, "quiet": True,
             "synthetic": {"train": 6, "val": 2, "size": 48}}
STOP_AT = (1, 1)  # (epoch index, step): the second epoch, after its first step


def run(out: Path, stop_at=None) -> dict:
    """What `crowdkernels train --model csrnet --width 0.03125 ...` does (cli._run_train), with a Ctrl-C at
    ``stop_at`` (what the SIGINT handler does: trainer.stop.requested = True)."""
    config = build_config(dataset="synthetic", overrides=OVERRIDES)
    config.out = str(out)

    def on_step(trainer, epoch, step):
        if (epoch, step) == stop_at:
            trainer.stop.requested = True

    torch.manual_seed(config.seed)
    model, criterion, train_set, val_set = build_run(config)
    return Trainer(model, criterion, train_set, val_set, config, on_step=on_step).run()


def main(dest: str) -> None:
    dest_path = Path(dest)
    dest_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        assert run(Path(tmp) / "interrupted", STOP_AT)["status"] == "interrupted"
        assert run(Path(tmp) / "finished")["status"] == "finished"
        shutil.copy(Path(tmp) / "interrupted" / "last.pt", dest_path / "interrupted.pt")
        shutil.copy(Path(tmp) / "finished" / "last.pt", dest_path / "finished.pt")


if __name__ == "__main__":
    main(sys.argv[1])
