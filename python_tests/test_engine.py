"""The training engine with a tiny model (a few convolutions; the engine depends on no model class):
the loss decreases on synthetic crowds, checkpoints and exact resume (after a Ctrl-C mid-epoch and
after a kill), checkpoint/model mismatches, tiled full-image inference, and 2-process gloo DDP
against one process on the same global batch."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crowdkernels.data import CrowdCollate, SyntheticCrowds
from crowdkernels.engine import CheckpointError, TrainConfig, Trainer, TrainError, evaluate, load_checkpoint, predict_density


# ----------------------------------------------------------------------------------------- tiny model
@dataclass
class TinyOutput:
    final: torch.Tensor


class TinyCriterion(nn.Module):
    """Mean squared error against the target summed to the model's 1/2 resolution (a mean over the
    batch, as DDP's gradient averaging needs)."""

    def forward(self, output, targets):
        target = F.avg_pool2d(targets["density"], 2) * 4.0
        mse = F.mse_loss(output.final, target, reduction="none").sum(dim=(1, 2, 3)).mean()
        count = (output.final.sum(dim=(1, 2, 3)) - target.sum(dim=(1, 2, 3))).abs().mean()
        return {"total": mse * 100.0, "count": count.detach()}


class TinyNet(nn.Module):
    """Three convolutions and a 2x2 pooling: output stride 2, receptive field 10 px."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.width = width
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images):
        x = F.max_pool2d(F.relu(self.c1(images)), 2)
        return TinyOutput(final=self.head(F.relu(self.c2(x))))

    def criterion(self, **options):
        return TinyCriterion(**options)


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(out=str(out), model="tiny", model_kwargs={"width": 8}, dataset="synthetic", epochs=3, batch_size=4,
                lr=3e-3, lr_step=None, crop=32, multiple=2, workers=0, quiet=True, tile=None,
                synthetic={"train": 12, "val": 4, "size": 48})
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(cfg: TrainConfig, seed: int = 0, **kw) -> Trainer:
    from crowdkernels.engine.pipeline import build_datasets

    torch.manual_seed(seed)
    model = TinyNet(**cfg.model_kwargs)
    train, val = build_datasets(cfg)
    return Trainer(model, model.criterion(), train, val, cfg, **kw)


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_writes_its_files(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=6, val_every=2)
    summary = make_trainer(cfg).run()
    assert summary["status"] == "finished" and summary["epoch"] == 6
    losses = [h["loss"]["total"] for h in summary["history"]]
    assert losses[-1] < 0.6 * losses[0], losses
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 7))
    assert [e["val"] is not None for e in log] == [False, True, False, True, False, True]
    assert {"lr", "loss", "images_per_s"} <= set(log[0]) and log[0]["images"] == 12
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 6 and ckpt["step"] == 0 and ckpt["model_name"] == "tiny"
    assert {"model", "optimizer", "scheduler", "rng", "best", "config"} <= set(ckpt)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["best"]["mae"] == min(e["val"]["mae"] for e in log if e["val"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny"


def test_lr_is_halved_after_lr_step(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=3, lr=1e-3, lr_step=2, val_every=10, synthetic={"train": 4, "val": 1, "size": 32})
    hist = make_trainer(cfg).run()["history"]
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 1e-3, 5e-4])


def test_an_existing_run_needs_resume(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1, synthetic={"train": 4, "val": 1, "size": 32})
    make_trainer(cfg).run()
    with pytest.raises(TrainError, match="--resume"):
        make_trainer(cfg).run()


class Kill(Exception):
    """Stands in for SIGKILL: leaves the loop without any saving."""


@pytest.mark.parametrize("how", ["ctrl-c mid-epoch", "kill mid-epoch"])
def test_resume_continues_exactly(tmp_path, how):
    # flips, random crops and shuffling all draw from the RNG: resume must replay them exactly
    kw = dict(epochs=3, val_every=1, synthetic={"train": 10, "val": 2, "size": 40})
    ref = make_trainer(tiny_config(tmp_path / "ref", **kw))
    ref_summary = ref.run()

    def stop(trainer, epoch, step):
        if epoch == 1 and step == 2:
            if how.startswith("kill"):
                raise Kill
            trainer.stop.requested = True  # what the SIGINT handler does

    cfg = tiny_config(tmp_path / "run", **kw)
    first = make_trainer(cfg, on_step=stop)
    if how.startswith("kill"):
        with pytest.raises(Kill):
            first.run()
        assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1  # the end of epoch 1
    else:
        assert first.run()["status"] == "interrupted"
        ck = load_checkpoint(tmp_path / "run" / "last.pt")
        assert (ck["epoch"], ck["step"]) == (1, 2)
    assert not list((tmp_path / "run").glob(".*.tmp"))
    second = make_trainer(tiny_config(tmp_path / "run", resume=True, **kw), seed=123)  # other init: overwritten
    summary = second.run()
    assert summary["status"] == "finished"
    assert torch.equal(params(second.model), params(ref.model))
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in ref_summary["history"]]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1, synthetic={"train": 4, "val": 1, "size": 32})
    make_trainer(cfg).run()
    other = tiny_config(tmp_path / "run", model="l2sm", resume=True, epochs=2)
    with pytest.raises(CheckpointError, match=r"holds a 'tiny'.*'l2sm'"):
        make_trainer(other).run()
    wider = tiny_config(tmp_path / "run", model_kwargs={"width": 16}, resume=True, epochs=2)
    with pytest.raises(CheckpointError, match="width 8.*width 16"):
        make_trainer(wider).run()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1, lr=1e-3, synthetic={"train": 4, "val": 1, "size": 32})
    tr = make_trainer(cfg)
    with torch.no_grad():
        tr.model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainError, match="loss is nan"):
        tr.run()


# ----------------------------------------------------------------------------------------- inference
def test_tiled_inference_equals_whole_image_inference():
    torch.manual_seed(0)
    model = TinyNet(4).eval()
    image = torch.rand(3, 150, 230)
    whole = predict_density(model, image, tile=None, align=16)
    assert whole.shape == (1, 1, 75, 115)
    # overlap 16 >= the receptive field (10 px): every kept output pixel sees the same inputs
    tiled = predict_density(model, image, tile=64, overlap=16, align=16)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    # without overlap the borders differ, but no pixel is counted twice or missed
    coarse = predict_density(model, image, tile=32, overlap=0, align=16)
    assert coarse.shape == whole.shape and not torch.allclose(coarse, whole)
    with pytest.raises(ValueError, match="overlap"):
        predict_density(model, image, tile=64, overlap=8, align=16)


def test_evaluate_reports_counts_metrics_and_levels():
    class Constant(nn.Module):  # predicts 5 heads per image, spread uniformly
        def forward(self, x):
            h, w = x.shape[-2:]
            return TinyOutput(final=torch.full((x.shape[0], 1, h, w), 5.0 / (h * w)))

    ds = SyntheticCrowds(3, 32, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=CrowdCollate(target=None))
    metrics, acc = evaluate(Constant(), loader, torch.device("cpu"), levels={"few": (0, 9), "many": (10, None)})
    counts = ds.counts
    errors = [abs(5 - c) for c in counts]
    assert metrics["images"] == 3 and metrics["skipped"] == 0
    assert metrics["mae"] == pytest.approx(sum(errors) / 3, rel=1e-9)
    assert metrics["mse"] == pytest.approx((sum(e * e for e in errors) / 3) ** 0.5, rel=1e-9)
    assert metrics["game0"] == pytest.approx(metrics["mae"], rel=1e-9)
    assert metrics["game3"] >= metrics["game0"]
    few = [e for e, c in zip(errors, counts) if c <= 9]
    assert metrics["levels"]["few"]["images"] == len(few)
    assert [r["true"] for r in acc.per_image] == counts


# ----------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_gloo_group(rank: int, world: int, port: int):
    """This spawned process joins a CPU (gloo) group of `world` processes on loopback, as torchrun would."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from crowdkernels.engine import distributed

    assert distributed.init_from_env("cpu")
    return distributed


def _ddp_worker(rank: int, world: int, port: int, out: str):
    distributed = _join_gloo_group(rank, world, port)
    try:
        cfg = tiny_config(out, epochs=1, batch_size=2, shuffle=False, flip=False, crop=None, val_every=1,
                          synthetic={"train": 8, "val": 3, "size": 32})
        tr = make_trainer(cfg)
        summary = tr.run()
        if rank == 0:
            torch.save({"params": params(tr.model), "summary": summary}, os.path.join(out, "ddp.pt"))
    finally:
        distributed.cleanup()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp" / "ddp.pt", weights_only=False)
    # one process, global batch 4 = the two ranks' batches of 2 (DistributedSampler without shuffling
    # gives rank r the images r, r+2, ...: the same four images per step)
    cfg = tiny_config(tmp_path / "one", epochs=1, batch_size=4, shuffle=False, flip=False, crop=None,
                      synthetic={"train": 8, "val": 3, "size": 32})
    one = make_trainer(cfg)
    summary = one.run()
    torch.testing.assert_close(got["params"], params(one.model), rtol=1e-5, atol=1e-6)
    # the validation metrics are reduced over the ranks: the whole held-out set
    assert got["summary"]["history"][0]["val"]["images"] == 3
    assert got["summary"]["history"][0]["val"]["mae"] == pytest.approx(summary["history"][0]["val"]["mae"], rel=1e-4)
    assert got["summary"]["history"][0]["images"] == 8


class _FailSome(torch.utils.data.Dataset):
    """Images `bad` fail to load, as a corrupt file does: the sample reports an error instead."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i in self.bad:
            return {"name": f"broken_{i}", "error": f"broken_{i}.jpg: cannot identify image file"}
        return self.base[i]


def _ddp_worker_broken_batch(rank: int, world: int, port: int, out: str):
    from crowdkernels.engine.pipeline import build_datasets

    distributed = _join_gloo_group(rank, world, port)
    try:
        cfg = tiny_config(out, epochs=1, batch_size=2, shuffle=False, flip=False, crop=None, val_every=1,
                          synthetic={"train": 8, "val": 3, "size": 32})
        torch.manual_seed(0)
        model = TinyNet(**cfg.model_kwargs)
        train, val = build_datasets(cfg)
        # without shuffling rank 1 draws images 1, 3, 5, 7: its whole first batch (1, 3) fails
        tr = Trainer(model, model.criterion(), _FailSome(train, {1, 3}), val, cfg)
        summary = tr.run()
        torch.save({"summary": summary, "skipped": tr.skipped}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def test_ddp_rank_with_no_loadable_image_does_not_hang_the_others(tmp_path):
    """A rank whose whole batch fails to load used to skip its step alone while the other rank waited
    for its gradients forever. Now every rank skips that step together, and the run finishes."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_ddp_worker_broken_batch, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP ranks hung on a step that one rank had no images for")
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=False)
    assert r0["summary"]["status"] == r1["summary"]["status"] == "finished"
    assert set(r1["skipped"]) == {"broken_1", "broken_3"}
    # step 1 was skipped everywhere: rank 0's images 0 and 2 were not stepped on either
    assert r0["summary"]["history"][0]["images"] == 4


# ----------------------------------------------------------------------------------------- budgets
def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_step_budget_stops_mid_epoch_saved_validated_and_resumes_exactly(tmp_path):
    # 10 images at batch 4: 3 steps an epoch; the budget of 5 steps ends inside epoch 2
    kw = dict(epochs=3, val_every=10, synthetic={"train": 10, "val": 2, "size": 40})
    ref = make_trainer(tiny_config(tmp_path / "ref", **kw))
    ref_summary = ref.run()
    run = tmp_path / "run"
    first = make_trainer(tiny_config(run, max_steps=5, **kw))
    summary = first.run()
    assert summary["status"] == "step limit"
    ck = load_checkpoint(run / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 2)  # epoch 2 (0-based 1), 2 of its 3 steps
    stop = [e for e in _log(run) if e.get("stop")]
    assert len(stop) == 1 and stop[0]["step"] == 2 and stop[0]["at_epoch"] == pytest.approx(1 + 2 / 3)
    assert stop[0]["val"]["mae"] == summary["best"]["mae"]  # val_every=10: the stop is the only validation
    best = load_checkpoint(run / "best.pt")
    assert best["best"]["mae"] == stop[0]["val"]["mae"] and (best["epoch"], best["step"]) == (2, 2)
    assert stop[0]["global_step"] == 5 and [e["global_step"] for e in _log(run) if "loss" in e] == [3]
    # the same budget again: nothing more to do, no step taken
    again = make_trainer(tiny_config(run, resume=True, max_steps=5, **kw), seed=5)
    assert again.run()["status"] == "step limit"
    assert torch.equal(params(again.model), params(first.model))
    # the budget's validation leaves no trace in the training: resuming gives the uninterrupted run
    second = make_trainer(tiny_config(run, resume=True, **kw), seed=123)
    assert second.run()["status"] == "finished"
    assert torch.equal(params(second.model), params(ref.model))
    epochs = [e for e in _log(run) if "loss" in e]
    assert [e["loss"] for e in epochs] == [h["loss"] for h in ref_summary["history"]]
    assert any(e.get("stop") for e in _log(run))  # the stop's validation stays in the log after a resume


def test_a_step_budget_at_an_epoch_end_validates_and_stops(tmp_path):
    run = tmp_path / "run"
    summary = make_trainer(tiny_config(run, epochs=3, val_every=10, max_steps=3,
                                       synthetic={"train": 10, "val": 2, "size": 40})).run()
    assert summary["status"] == "step limit" and summary["epoch"] == 1
    ck = load_checkpoint(run / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 0)
    log = _log(run)
    assert [e.get("stop") for e in log] == [None, "step limit"] and log[1]["val"]["mae"] == summary["best"]["mae"]


def test_a_time_limit_is_checked_after_every_step(tmp_path):
    run = tmp_path / "run"
    steps = []
    summary = make_trainer(tiny_config(run, epochs=50, max_seconds=1e-9, synthetic={"train": 10, "val": 2, "size": 40}),
                           on_step=lambda t, e, s: steps.append((e, s))).run()
    assert summary["status"] == "time limit" and steps == [(0, 1)]
    ck = load_checkpoint(run / "last.pt")
    assert (ck["epoch"], ck["step"]) == (0, 1) and (run / "best.pt").is_file()
