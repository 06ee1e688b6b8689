"""The training loop: Adam, step decay, validation by MAE, atomic checkpoints, exact resume, DDP.

:class:`Trainer` trains any model whose forward returns ``.final`` [B, 1, h, w] with any criterion
called as ``criterion(output, targets)`` -> ``{"total": loss, ...}`` (``targets = {"density": [B, 1, H, W],
"points": [[N_i, 2]]}``), e.g. ``model.criterion()`` of the models in :mod:`crowdkernels.models`. Its parts,
as in torchvision's ``references/classification/train.py``: a :class:`RunState` (what a run carries and
``last.pt`` keeps: :meth:`RunState.restore`, :meth:`RunState.snapshot`), :meth:`Trainer.train_one_epoch`,
:meth:`Trainer.validate_and_select`, and :meth:`Trainer.run`, which calls them.

Files in ``config.out`` (written by rank 0):

- ``last.pt``: written atomically at the end of every epoch (and on Ctrl-C / SIGTERM, mid-epoch): model,
  optimizer, scheduler, grad scaler, RNG states, epoch, step, best metric, history, config.
  ``resume=True`` continues from it exactly: the same batches, augmentations and updates as a run that
  was never stopped. A SIGKILL loses at most the epoch in progress.
- ``best.pt``: the model of the epoch with the lowest validation MAE (model, config, epoch, step, best).
- ``log.jsonl``: one line per epoch (mean losses, learning rate, images/s, validation metrics).
- ``config.json``: the settings of the run.

The settings of a run are a :class:`crowdkernels.engine.config.TrainConfig`; :func:`build_run` turns them
into the model (with its pretrained encoder or initial weights), its criterion and the datasets.

Distributed (torchrun): each process takes ``batch_size`` images per step from a DistributedSampler; DDP
averages the gradients, so N processes with batch B step like one process with batch N x B when the
criterion's "total" is a mean over the batch. Validation is sharded and its sums all-reduced.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as dist_utils
from .._io import atomic_write
from ..models.conventions import conventions_of
from ..models.registry import build_model
from .checkpoint import (CheckpointError, check_model, load_checkpoint, load_initial_weights, rng_state, save_checkpoint,
                         set_rng_state)
from .evaluate import evaluate
from .pipeline import build_datasets, mean_count_baseline, target_from_config
from .predict import autocast
from .config import TrainConfig, TrainError, check_model_options, start_warnings
from ..data.targets import CrowdCollate
from .workers import StopSafeLoader
from ..data.transforms import check_norm

__all__ = ["Trainer", "RunState", "build_run", "make_optimizer", "train", "validation_due"]


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so a stop never lands inside an
    optimizer update; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def validation_due(epoch: int, config: TrainConfig) -> bool:
    """Whether the end of ``epoch`` (1-based) is validated: from ``val_start`` on, every ``val_every`` epochs
    (the released HMoDE train.py: every epoch from the 100th); and the last epoch always, so that every
    finished run has a validated model."""
    if epoch == config.epochs:
        return True
    return epoch >= config.val_start and epoch % config.val_every == 0


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


class RunState:
    """What a run carries from step to step, and what ``last.pt`` keeps of it so that a resumed run continues
    bit for bit: the model (on ``device``) and its criterion (which may hold state: L2SM's centres), the
    optimizer, the lr scheduler (``config.lr_step``), the grad scaler (float16 autocast only), where the run
    is (``epoch`` epochs finished, ``step`` batches into the next one), the best validation so far, the
    history (one entry per epoch and per budget stop), and, after :meth:`restore` mid-epoch, the stopped
    epoch's running sums and RNG states (``epoch_state``, ``rng``)."""

    def __init__(self, model, criterion, config: TrainConfig, device: torch.device):
        self.config = config
        self.model = model.to(device)
        self.criterion = criterion
        if isinstance(criterion, torch.nn.Module):
            criterion.to(device)
        params = list(self.model.parameters())
        if isinstance(criterion, torch.nn.Module):
            params += [p for p in criterion.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, config)
        milestones = [config.lr_step] if config.lr_step else []
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=config.lr_gamma)
        use_scaler = config.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.epoch, self.step = 0, 0
        self.best = {"mae": None, "epoch": None}
        self.history: list[dict] = []
        self.epoch_state: dict = {}
        self.rng: dict | None = None

    def restore(self, ckpt: dict, path) -> None:
        """Puts back everything :meth:`snapshot` wrote to ``ckpt`` (read from ``path``). At an epoch's end the RNG
        states are put back now; mid-epoch the epoch is replayed from its start (see
        :meth:`Trainer.train_one_epoch`) and they are put back after the last batch that was done."""
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its weights do not fit the {self.config.model!r} model of this run ({exc})") from None
        if ckpt.get("criterion") and isinstance(self.criterion, torch.nn.Module):
            self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best, self.history = dict(ckpt["best"]), list(ckpt["history"])
        self.epoch_state = ckpt.get("epoch_state", {})
        self.rng = ckpt["rng"]
        if self.step == 0:
            set_rng_state(self.rng)

    def snapshot(self, path, epoch: int, step: int, *, resumable: bool = True, epoch_state: dict | None = None) -> None:
        """Writes the run at ``path`` atomically, at ``epoch`` (epochs finished, or the 1-based epoch validated)
        and ``step``: ``last.pt`` (``resumable``: all that :meth:`restore` reads, with the RNG states of this
        moment and, mid-epoch, ``epoch_state``) or ``best.pt`` (not ``resumable``: the model, its settings,
        where it was validated and the best metric). Both come from this one dict, so they agree on the
        model and the settings."""
        cfg = self.config
        state = {"model_name": cfg.model, "config": cfg.to_dict(), "model": self.model.state_dict()}
        if resumable:
            state.update(criterion=self.criterion.state_dict() if isinstance(self.criterion, torch.nn.Module) else {},
                         optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict())
        state.update(epoch=epoch, step=step, best=dict(self.best))
        if resumable:
            state.update(history=list(self.history), rng=rng_state())
            if epoch_state is not None:
                state["epoch_state"] = epoch_state
        save_checkpoint(path, state)


@dataclass
class EpochProgress:
    """Where :meth:`Trainer.train_one_epoch` left an epoch: ``step`` batches done (of ``steps``), the budget
    that was reached (None: none), and ``state``, what ``last.pt`` keeps of an epoch in progress: the RNG
    states at its start and the running loss sums, images and seconds."""

    step: int
    steps: int
    budget: str | None
    state: dict

    @property
    def stopped(self) -> bool:
        """Whether the epoch was left before its last batch."""
        return self.step < self.steps


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_set`` and validates on ``val_set`` (datasets of
    samples; see :mod:`crowdkernels.data`). ``collate`` defaults to :class:`crowdkernels.data.CrowdCollate`
    with the default density target. ``on_step(trainer, epoch, step)`` runs after every update (tests
    use it to stop a run). ``log`` prints messages (rank 0 only)."""

    def __init__(self, model, criterion, train_set, val_set, config: TrainConfig, *, collate=None, on_step=None, log=None):
        self.config = config
        self.model = model
        self.criterion = criterion
        self.train_set, self.val_set = train_set, val_set
        self.collate = collate or CrowdCollate(target_from_config(config), multiple=config.multiple, tiles=config.tiles)
        self.on_step = on_step
        self._print = log or (lambda msg: print(msg, file=sys.stderr))
        self.out = Path(config.out)
        self.device = dist_utils.local_device(config.device)
        self.stop = _StopRequest()
        self.skipped: dict[str, str] = dict(getattr(train_set, "skipped", {}) or {})
        self.skipped.update(getattr(val_set, "skipped", {}) or {})
        self.baseline = mean_count_baseline(train_set, val_set)

    # ------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        """Trains to ``config.epochs``; returns ``{"status": "finished" | "interrupted" | "time limit" |
        "step limit", "epoch", "best", "history", "skipped"}``."""
        cfg = self.config
        state = self._start()
        net = self._distributed(state.model)
        train_loader, sampler, val_loader = self._loaders()
        steps = len(train_loader)
        if cfg.max_steps is not None and state.epoch * steps + state.step >= cfg.max_steps:
            self.log(f"step limit: the run in {self.out} has already taken {cfg.max_steps} steps or more")
            return self._summary("step limit", state)
        status, run_start = "finished", time.perf_counter()
        with self.stop:
            for epoch in range(state.epoch, cfg.epochs):
                progress = self.train_one_epoch(state, net, epoch, train_loader, sampler, run_start)
                if progress.stopped:
                    status = self._stop_mid_epoch(state, epoch, progress, val_loader)
                    break
                entry = self.validate_and_select(state, epoch, progress, val_loader)
                self._end_epoch(state, epoch, entry)
                status = self._stop_after_epoch(state, epoch, progress, entry, val_loader) or status
                if status != "finished":
                    break
        if status != "interrupted":
            dist_utils.barrier()
        return self._summary(status, state)

    def _start(self) -> RunState:
        """The run's state: new, or restored from ``last.pt`` with ``resume`` (refused without it, and for
        another model); ``config.json`` written and ``log.jsonl`` started (or cut back to ``last.pt``'s
        history); L2SM's density levels fitted before a new run's first step."""
        cfg = self.config
        main = dist_utils.is_main()
        last = self.out / "last.pt"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        ckpt = None
        if last.is_file():
            if not cfg.resume:
                raise TrainError(f"{self.out} already holds a run (last.pt): pass --resume to continue it, or choose another --out")
            ckpt = load_checkpoint(last)
            check_model(ckpt, last, cfg.model, cfg.model_kwargs)
        elif cfg.resume:
            raise TrainError(f"--resume: there is no run to continue in {self.out} (no last.pt there); check --out, "
                             "or leave out --resume to start a new run")
        if main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        state = RunState(self.model, self.criterion, cfg, self.device)
        if ckpt is not None:
            state.restore(ckpt, last)
            if main:
                self._write_log(state)  # drop lines of an epoch that was lost to a kill
            self.log(f"resuming {self.out} at epoch {state.epoch + 1}" + (f", step {state.step}" if state.step else ""))
        elif main:
            (self.out / "log.jsonl").write_text("")
        if ckpt is None and cfg.fit_levels and hasattr(state.model, "fit_levels"):
            self._fit_levels(state.model)
        return state

    def _distributed(self, model):
        """``model`` wrapped in DistributedDataParallel under torchrun (it steps; the model itself is saved)."""
        if not dist_utils.is_distributed():
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _summary(self, status: str, state: RunState) -> dict:
        return {"status": status, "epoch": state.epoch, "best": dict(state.best), "history": list(state.history),
                "skipped": dict(self.skipped)}

    # ------------------------------------------------------------------------------------- one epoch
    def train_one_epoch(self, state: RunState, net, epoch: int, loader, sampler, run_start: float) -> EpochProgress:
        """Steps ``net`` (the model, or its DDP wrapper) through epoch ``epoch`` (0-based) until its end, a budget
        (checked after every step: :meth:`_budget_spent`) or a stop request. An epoch resumed mid-way
        (``state.step`` > 0) is replayed from its start: its first ``state.step`` batches are drawn again (the
        same shuffle, crops and flips) but not stepped on, and the RNG states of the stop are put back after
        the last of them, so the run continues as if it had never stopped."""
        cfg = self.config
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = state.step
        if skip:
            set_rng_state(state.epoch_state["rng_epoch_start"])
        rng_epoch_start = rng_state()
        sums = dict(state.epoch_state.get("sums", {})) if skip else {}
        seen = float(state.epoch_state.get("seen", 0.0)) if skip else 0.0
        elapsed = float(state.epoch_state.get("seconds", 0.0)) if skip else 0.0
        step = skip
        t0 = time.perf_counter()
        bar = None
        if dist_utils.is_main() and not cfg.quiet:
            from tqdm import tqdm

            # disable=None: a bar on a terminal only; logs get the line per epoch that log() writes
            bar = tqdm(total=len(loader), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        state.model.train()
        budget = None
        for i, batch in enumerate(loader):
            if i < skip:
                if i == skip - 1:  # the batches before the stop are drawn again, then the RNG is put back
                    set_rng_state(state.rng)
                continue
            for name, reason in batch["skipped"]:
                if cfg.strict:
                    raise TrainError(reason)
                if name not in self.skipped:
                    self.skipped[name] = reason
                    self.log(f"warning: skipping {reason}")
            if self._all_ranks_have(batch["images"] is not None):
                losses = self._step(net, state, batch)
                n = float(batch["images"].shape[0])
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                seen += n
                if bar is not None:
                    bar.set_postfix(loss=f"{losses['total']:.4g}")
            step = i + 1
            if bar is not None:
                bar.update(1)
            if self.on_step is not None:
                self.on_step(self, epoch, step)
            budget = self._budget_spent(run_start, epoch * len(loader) + step)
            if budget or self._stop_everywhere():
                break
        if bar is not None:
            bar.close()
        elapsed += time.perf_counter() - t0
        return EpochProgress(step, len(loader), budget,
                             {"rng_epoch_start": rng_epoch_start, "sums": sums, "seen": seen, "seconds": elapsed})

    def _step(self, net, state: RunState, batch) -> dict:
        images = batch["images"].to(self.device, non_blocking=True)
        targets = {
            "density": batch["density"].to(self.device, non_blocking=True),
            "points": [p.to(self.device) for p in batch["points"]],
        }
        with autocast(self.device, self.config.amp):
            output = net(images)
        losses = self.criterion(output, targets)
        total = losses["total"]
        if not torch.isfinite(total.detach()).all():
            raise TrainError(f"the loss is {float(total.detach())} on images {batch['names']}: lower --lr, or check the data")
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}

    # ------------------------------------------------------------------------------------- validation
    def validate_and_select(self, state: RunState, epoch: int, progress: EpochProgress, val_loader) -> dict:
        """The history entry of epoch ``epoch`` (0-based), just trained: its mean losses over every process, lr
        and images/s, and, when :func:`validation_due`, the validation metrics, the model kept in ``best.pt``
        when it is the best so far (:meth:`_select`); the entry is added to ``state.history`` and logged."""
        cfg = self.config
        sums, elapsed = progress.state["sums"], progress.state["seconds"]
        totals = dist_utils.all_reduce_sum(torch.tensor([progress.state["seen"], *sums.values()], dtype=torch.float64))
        seen_all = float(totals[0])
        losses = {k: float(v) / seen_all for k, v in zip(sums, totals[1:])} if seen_all else {}
        entry = {
            "epoch": epoch + 1,
            "global_step": (epoch + 1) * progress.steps,
            "lr": state.optimizer.param_groups[0]["lr"],
            "loss": losses,
            "images": int(seen_all),
            "seconds": elapsed,
            "images_per_s": seen_all / elapsed if elapsed > 0 else None,
            "val": None,
        }
        if val_loader is not None and validation_due(epoch + 1, cfg):
            metrics = self._validate(val_loader)
            entry["val"] = metrics
            self._select(state, metrics, epoch + 1)
        state.history.append(entry)
        val = entry["val"]
        self.log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {losses.get('total', float('nan')):.5g}  lr {entry['lr']:.3g}"
            + (f"  val mae {val['mae']:.3f} mse {val['mse']:.3f}" if val and val.get("mae") is not None else "")
            + (f" (mean-count baseline {val['baseline_mae']:.3f})" if val and val.get("baseline_mae") is not None else "")
            + f"  ({elapsed:.1f} s)"
        )
        return entry

    def _validate(self, val_loader) -> dict:
        cfg = self.config
        metrics, _ = evaluate(self.model, val_loader, self.device, tile=cfg.tile, amp=cfg.amp, game_levels=0,
                              all_reduce=dist_utils.all_reduce_sum if dist_utils.is_distributed() else None,
                              strict=cfg.strict)
        if self.baseline is not None:
            metrics["baseline_mae"], metrics["baseline_count"] = self.baseline["mae"], self.baseline["count"]
        return metrics

    def _select(self, state: RunState, metrics: dict, epoch: int, step: int = 0) -> None:
        """Keeps ``best.pt`` the model with the lowest validation MAE so far."""
        mae = metrics.get("mae")
        if mae is not None and (state.best["mae"] is None or mae < state.best["mae"]):
            state.best = {"mae": mae, "mse": metrics.get("mse"), "epoch": epoch, **({"step": step} if step else {})}
            if dist_utils.is_main():
                state.snapshot(self.out / "best.pt", epoch, step, resumable=False)

    def _validate_at_stop(self, state: RunState, epoch: int, step: int, steps_per_epoch: int, reason: str,
                          val_loader) -> None:
        """A budget ends the run between validations: the model it has is validated (and selected) too, so
        that every run that stops by itself leaves a validated best.pt. The RNG is put back afterwards, so
        a resumed run continues exactly as if this validation had not happened."""
        if val_loader is None:
            return
        saved = rng_state()
        metrics = self._validate(val_loader)
        set_rng_state(saved)
        self.model.train()
        label = epoch + 1 if step else epoch  # the epoch in progress (1-based), or the one just finished
        self._select(state, metrics, label, step)
        at = label - 1 + step / steps_per_epoch if step else float(label)  # epochs trained, fractional
        state.history.append({"epoch": label, "step": step or steps_per_epoch, "at_epoch": at,
                              "global_step": (label - 1) * steps_per_epoch + (step or steps_per_epoch), "stop": reason,
                              "val": metrics})
        self.log(f"{reason}: epoch {label} step {step or steps_per_epoch}  val mae {metrics['mae']:.3f} mse {metrics['mse']:.3f}"
                 + (f" (mean-count baseline {metrics['baseline_mae']:.3f})" if metrics.get("baseline_mae") is not None else ""))

    # ------------------------------------------------------------------------------------- epoch ends and stops
    def _end_epoch(self, state: RunState, epoch: int, entry: dict) -> None:
        """After epoch ``epoch`` (0-based) and its validation: the lr schedule steps, ``last.pt`` is written
        and the epoch's line added to ``log.jsonl``."""
        state.scheduler.step()
        state.epoch, state.step = epoch + 1, 0
        if dist_utils.is_main():
            state.snapshot(self.out / "last.pt", state.epoch, 0)
            self._append_log(entry)

    def _stop_mid_epoch(self, state: RunState, epoch: int, progress: EpochProgress, val_loader) -> str:
        """A budget or a stop request left epoch ``epoch`` before its end: the model is validated (a budget;
        before the save, so that last.pt's history holds this entry), last.pt written with the epoch's
        progress to resume from. Returns the run's status."""
        last, budget = self.out / "last.pt", progress.budget
        if budget:
            self._validate_at_stop(state, epoch, progress.step, progress.steps, budget, val_loader)
        state.step = progress.step
        if dist_utils.is_main():
            state.snapshot(last, epoch, progress.step, epoch_state=progress.state)
            if budget:
                self._write_log(state)
        self.log(f"{budget + ' reached' if budget else 'stopped'} at epoch {epoch + 1}, step {progress.step}: "
                 f"saved {last}; continue with --resume")
        return budget or "interrupted"

    def _stop_after_epoch(self, state: RunState, epoch: int, progress: EpochProgress, entry: dict, val_loader) -> str | None:
        """The run's status when a budget or a stop request ends it after epoch ``epoch`` (0-based) and before
        the last epoch (a model not validated at this epoch is validated now, and last.pt written again);
        None when it goes on."""
        last, budget = self.out / "last.pt", progress.budget
        if budget and epoch + 1 < self.config.epochs:
            if entry["val"] is None:
                self._validate_at_stop(state, epoch + 1, 0, progress.steps, budget, val_loader)
                if dist_utils.is_main():
                    state.snapshot(last, epoch + 1, 0)
                    self._write_log(state)
            self.log(f"{budget} reached after epoch {epoch + 1}: saved {last}; continue with --resume")
            return budget
        if self.stop.requested and epoch + 1 < self.config.epochs:
            self.log(f"stopped after epoch {epoch + 1}: saved {last}; continue with --resume")
            return "interrupted"
        return None

    # ------------------------------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        if dist_utils.is_main() and not self.config.quiet:
            self._print(msg)

    def _loaders(self):
        from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset


        cfg = self.config
        if dist_utils.is_distributed():
            sampler = DistributedSampler(self.train_set, shuffle=cfg.shuffle, seed=cfg.seed, drop_last=False)
        else:
            # RandomSampler draws its permutation from torch's global RNG, restored on resume
            sampler = RandomSampler(self.train_set) if cfg.shuffle else SequentialSampler(self.train_set)
        common = {"num_workers": cfg.workers, "pin_memory": self.device.type == "cuda"}
        # workers that outlive a SIGTERM to the process group: the stop handler saves between steps
        train = StopSafeLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=self.collate, **common)
        val = None
        if self.val_set is not None and len(self.val_set):
            # each process evaluates a disjoint shard (no padding repeats, unlike DistributedSampler)
            shard = Subset(self.val_set, list(range(dist_utils.rank(), len(self.val_set), dist_utils.world_size())))
            val = StopSafeLoader(shard, batch_size=1, shuffle=False, collate_fn=CrowdCollate(target=None), **common)
        return train, sampler, val

    def _write_log(self, state: RunState) -> None:
        text = "".join(json.dumps(h, allow_nan=True) + "\n" for h in state.history)
        atomic_write(self.out / "log.jsonl", lambda f: f.write(text), mode="w")

    def _append_log(self, entry: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry, allow_nan=True) + "\n")

    def _fit_levels(self, model) -> None:
        """L2SM sec. 4.2: the G density levels over every region of the training set's ground truth (whole
        images, the run's target settings, on the canvas the model pads them to), before the first step."""
        from torch.utils.data import DataLoader


        base = getattr(self.train_set, "unaugmented", lambda: self.train_set)()
        collate = CrowdCollate(target_from_config(self.config), multiple=conventions_of(model).forward_multiple)
        loader = DataLoader(base, batch_size=1, shuffle=False, collate_fn=collate, num_workers=0)
        levels = model.fit_levels({"density": b["density"]} for b in loader if b["images"] is not None)
        self.log(f"L2SM density levels fitted over {len(base)} training images: {[round(float(v), 6) for v in levels]}")

    def _budget_spent(self, run_start: float, global_step: int) -> str | None:
        """"time limit" or "step limit" once this process has trained ``config.max_seconds`` (wall clock) or
        the run has taken ``config.max_steps`` optimizer steps in all; the same answer on every rank."""
        cfg = self.config
        reason = None
        if cfg.max_steps is not None and global_step >= cfg.max_steps:
            reason = "step limit"
        elif cfg.max_seconds is not None and time.perf_counter() - run_start >= cfg.max_seconds:
            reason = "time limit"
        if dist_utils.is_distributed():  # rank 0's clock decides, so that every rank stops at the same step
            code = torch.tensor([{None: 0.0, "step limit": 1.0, "time limit": 2.0}[reason] if dist_utils.is_main() else 0.0])
            reason = {0: None, 1: "step limit", 2: "time limit"}[int(dist_utils.all_reduce_sum(code).item())]
        return reason

    def _stop_everywhere(self) -> bool:
        flag = self.stop.requested
        if dist_utils.is_distributed():  # every rank must leave the loop at the same step
            flag = bool(dist_utils.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)
            self.stop.requested = flag
        return flag

    def _all_ranks_have(self, have_batch: bool) -> bool:
        """Whether every process has a batch to step on. Under DDP a rank whose whole batch failed to load
        must not skip the step alone: the others would wait for its gradients forever. So all ranks skip
        that step together (its images are already reported as skipped)."""
        if not dist_utils.is_distributed():
            return have_batch
        missing = dist_utils.all_reduce_sum(torch.tensor([0.0 if have_batch else 1.0]))
        if float(missing.item()) > 0:
            if have_batch:
                self.log("warning: another process has no loadable image in this step; every process skips it")
            return False
        return True


def build_run(config: TrainConfig, *, warn=None):
    """(model, criterion, train_set, val_set) of a run: the model with its pretrained encoder
    (``config.pretrained``) or initial weights (``config.init``), its input and output conventions
    (``input_norm``, ``density_scale`` = the target's scale), its criterion with ``config.criterion_kwargs``,
    and the datasets (:func:`crowdkernels.engine.pipeline.build_datasets`)."""
    kwargs = dict(config.model_kwargs)
    if config.pretrained is not None:
        kwargs["pretrained"] = config.pretrained
    if config.weight_init != "auto":
        kwargs["init"] = config.weight_init
    try:
        model = build_model(config.model, **kwargs)
    except (OSError, ValueError) as exc:  # a missing or wrong weights file, or a width that cannot take it
        if config.pretrained is None:
            raise
        raise TrainError(f"--pretrained: {exc}") from None
    if config.init is not None:
        load_initial_weights(model, config.init)
    model.input_norm = check_norm(config.input_norm)
    model.density_scale = float((config.target or {}).get("scale", 1.0))
    check_model_options(config)  # a config made without build_config: its loss settings, named, not a TypeError
    criterion = model.criterion(**config.criterion_kwargs)
    train_set, val_set = build_datasets(config, warn=warn)
    return model, criterion, train_set, val_set


def train(config: TrainConfig, *, warn=None) -> dict:
    """The whole run of ``config``, as ``crowdkernels train`` does it: joins torchrun's process group when
    launched by torchrun, warns (on the main process) what :func:`crowdkernels.engine.config.start_warnings`
    names, seeds torch with ``config.seed``, builds the run (:func:`build_run`) and trains it
    (:meth:`Trainer.run`). Returns the run's summary with ``"main"``: whether this process is rank 0 (the one
    that writes and reports)."""
    dist_utils.init_from_env(torch.device(config.device).type if config.device else None)
    main = dist_utils.is_main()  # read before cleanup(): afterwards every process would say rank 0
    say = (warn or (lambda msg: None)) if main else (lambda msg: None)
    for msg in start_warnings(config, dist_utils.local_device(config.device).type):
        say(msg)
    try:
        torch.manual_seed(config.seed)
        model, criterion, train_set, val_set = build_run(config, warn=say)
        if len(train_set) == 0:
            raise TrainError(f"no usable training images in {config.root}")
        summary = Trainer(model, criterion, train_set, val_set, config).run()
    finally:  # a bad file under --strict goes on to the caller, which reports it
        dist_utils.cleanup()
    return {**summary, "main": main}
