"""The parts of the redesigned engine (issue 18): the run state's one snapshot writes last.pt and best.pt alike
and restores exactly, the models' declared conventions and their registry, and the data pipeline's single
held-out seed and --root check. The tiny model of test_engine stands in for the architectures."""
from __future__ import annotations

import pytest
import torch

from crowdkernels.engine.checkpoint import load_checkpoint
from crowdkernels.engine.pipeline import build_datasets, evaluation_dataset, held_out_seed, require_root
from crowdkernels.engine.predict import predict_density
from crowdkernels.engine.config import TrainError
from crowdkernels.engine.trainer import RunState
from crowdkernels.models import (CSRNet, HMoDE, L2SM, MODEL_NAMES, SPN, Conventions, build_model, conventions_of,
                                 register_model)
from crowdkernels.models.registry import MODEL_BUILDERS
from test_engine import TinyNet, make_trainer, tiny_config

BEST_KEYS = {"format", "model_name", "config", "model", "epoch", "step", "best"}
RESUME_KEYS = {"criterion", "optimizer", "scheduler", "scaler", "history", "rng"}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- run state
@pytest.mark.parametrize("how", ["epoch end", "step budget mid-epoch"])
def test_best_and_last_are_one_snapshot_of_the_same_state(tmp_path, how):
    """best.pt is last.pt less what only resuming needs: the same model, settings and best metric, written at
    the moment the model was validated (the end of the only epoch, or the budget's stop at step 2 of 3)."""
    kw = {"epochs": 1} if how == "epoch end" else {"epochs": 3, "val_every": 10, "max_steps": 2}
    run = tmp_path / "run"
    make_trainer(tiny_config(run, synthetic={"train": 12, "val": 2, "size": 32}, **kw)).run()
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert set(best) == BEST_KEYS
    assert BEST_KEYS | RESUME_KEYS <= set(last)
    assert best["model_name"] == last["model_name"] == "tiny" and best["config"] == last["config"]
    assert best["best"] == last["best"] and best["best"]["mae"] is not None
    assert _same_weights(best["model"], last["model"])
    if how == "epoch end":
        assert (best["epoch"], best["step"]) == (last["epoch"], last["step"]) == (1, 0)
    else:  # best.pt names the epoch in progress (1-based); last.pt the epochs finished and the step
        assert (best["epoch"], best["step"], best["best"]["step"]) == (1, 2, 2)
        assert (last["epoch"], last["step"]) == (0, 2) and "epoch_state" in last


def test_run_state_restores_what_it_snapshots(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    torch.manual_seed(0)
    model = TinyNet(8)
    state = RunState(model, model.criterion(), cfg, torch.device("cpu"))
    loss = model(torch.rand(2, 3, 16, 16)).final.square().sum()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.best, state.history = {"mae": 1.5, "mse": 2.0, "epoch": 1}, [{"epoch": 1}]
    state.snapshot(tmp_path / "last.pt", 1, 0)
    rng = torch.get_rng_state()
    torch.rand(5)  # moves the RNG on: restore puts it back at an epoch's end

    torch.manual_seed(1)
    other = TinyNet(8)
    again = RunState(other, other.criterion(), cfg, torch.device("cpu"))
    again.restore(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")
    assert _same_weights(other.state_dict(), model.state_dict())
    assert (again.epoch, again.step, again.best, again.history) == (1, 0, state.best, state.history)
    assert again.scheduler.state_dict() == state.scheduler.state_dict()
    assert torch.equal(again.optimizer.state_dict()["state"][0]["exp_avg"], state.optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------------------- conventions
def test_each_model_declares_its_conventions_once():
    hp, ho = HMoDE(width=0.125), HMoDE(variant="official", width=0.125)
    l2sm, spn, csr = L2SM(width=0.125, k=2), SPN(width=0.125), CSRNet(width=0.125)
    # (stride, input_multiple: what callers pad to, forward_multiple: what forward pads to itself, scale)
    got = {m: (c.stride, c.input_multiple, c.forward_multiple, c.density_scale)
           for m, c in (("hmode", hp.conventions), ("hmode-official", ho.conventions), ("l2sm", l2sm.conventions),
                        ("spn", spn.conventions), ("csrnet", csr.conventions))}
    assert got == {"hmode": (4, 16, 16, 1.0), "hmode-official": (1, 1, 1, 100.0), "l2sm": (4, 16, 16, 1.0),
                   "spn": (4, 16, 8, 1.0), "csrnet": (8, 16, 8, 1.0)}
    assert hp.input_norm == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    # the attributes read the declaration; a run's conventions replace it on that model only
    assert (ho.stride, ho.input_multiple, ho.density_scale) == (1, 1, 100.0)
    a, b = CSRNet(width=0.125), CSRNet(width=0.125)
    a.density_scale, a.input_norm = 100, None
    assert a.conventions.density_scale == 100.0 and a.conventions.input_norm is None
    assert b.density_scale == CSRNet.conventions.density_scale == 1.0 and b.input_norm is not None


def test_conventions_of_any_module_and_the_padding_they_give():
    class Plain(torch.nn.Module):  # a user's model: a few attributes, no declaration
        input_multiple = 8

        def forward(self, x):
            self.seen = tuple(x.shape[-2:])
            return x[:, :1]

    assert conventions_of(Plain()) == Conventions(input_multiple=8)
    net = Plain()
    net.density_scale = 4.0
    assert conventions_of(net).density_scale == 4.0
    # predict_density pads to the model's input_multiple, crops the map back and divides it by the scale
    out = predict_density(net, torch.ones(3, 10, 13))
    assert net.seen == (16, 16) and out.shape == (1, 1, 10, 13) and torch.allclose(out, torch.full_like(out, 0.25))
    for variant, fed in (("official", (37, 45)), ("paper", (48, 48))):  # run unpadded as the released test.py
        model = HMoDE(variant=variant, width=0.125).eval()
        model.register_forward_pre_hook(lambda m, a: setattr(m, "seen", tuple(a[0].shape[-2:])))
        predict_density(model, torch.rand(3, 37, 45))
        assert model.seen == fed, variant


def test_the_registry_lists_and_builds_every_model():
    assert MODEL_NAMES == ("hmode", "hmode-official", "l2sm", "spn", "csrnet")
    assert set(MODEL_BUILDERS) >= set(MODEL_NAMES)
    m = build_model("hmode-official", width=0.125)
    assert isinstance(m, HMoDE) and m.variant == "official"
    with pytest.raises(ValueError, match=r"model must be one of \[.*'csrnet'.*\], got 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("csrnet", rank=9)(CSRNet)


# ----------------------------------------------------------------------------------------- pipeline
def test_training_and_evaluation_hold_out_the_same_synthetic_images(tmp_path):
    cfg = tiny_config(tmp_path / "run", seed=7, input_norm=None, synthetic={"train": 3, "val": 2, "size": 32})
    _, val = build_datasets(cfg)
    ev, note = evaluation_dataset(cfg, "val")
    assert held_out_seed(7) != 7 and f"seed {held_out_seed(7)}" in note
    for i in range(len(val)):
        assert torch.equal(val[i]["image"], ev[i]["image"]) and torch.equal(val[i]["points"], ev[i]["points"])


def test_root_is_required_for_datasets_read_from_files(tmp_path):
    require_root("synthetic", None)
    require_root("folder", tmp_path)
    with pytest.raises(TrainError, match=r"^--root is required for --dataset folder$"):
        require_root("folder", None)
    for call in (lambda c: build_datasets(c), lambda c: evaluation_dataset(c, "val")):
        with pytest.raises(TrainError, match="--root is required for --dataset shanghaitech-b"):
            call(tiny_config(tmp_path / "run", dataset="shanghaitech-b"))
