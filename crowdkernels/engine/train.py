"""The training loop: Adam, step decay, validation by MAE, atomic checkpoints, exact resume, DDP.

:class:`Trainer` trains any model whose forward returns ``.final`` [B, 1, h, w] with any criterion
called as ``criterion(output, targets)`` -> ``{"total": loss, ...}`` (``targets = {"density": [B, 1, H, W],
"points": [[N_i, 2]]}``), e.g. ``model.criterion()`` of the models in :mod:`crowdkernels.models`.

Files in ``config.out`` (written by rank 0):

- ``last.pt``: written atomically at the end of every epoch (and on Ctrl-C / SIGTERM, mid-epoch): model,
  optimizer, scheduler, grad scaler, RNG states, epoch, step, best metric, history, config.
  ``resume=True`` continues from it exactly: the same batches, augmentations and updates as a run that
  was never stopped. A SIGKILL loses at most the epoch in progress.
- ``best.pt``: the model of the epoch with the lowest validation MAE (same format).
- ``log.jsonl``: one line per epoch (mean losses, learning rate, images/s, validation metrics).
- ``config.json``: the settings of the run.

The settings of a run are a :class:`TrainConfig`, made by :func:`build_config` from a named recipe
(:mod:`crowdkernels.engine.recipes`: the papers' and the released code's settings) or from a model's
defaults, plus explicit overrides; :func:`build_run` turns it into the model (with its pretrained encoder
or initial weights), its criterion and the datasets.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dist_utils
from .checkpoint import CheckpointError, atomic_write, check_model, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import MODEL_DEFAULTS, PAPER_DEFAULTS, TrainConfig, TrainError, build_config, check_model_options, resume_config
from .evaluate import autocast, evaluate
from ..data.transforms import IMAGENET_NORM

__all__ = [
    "MODEL_NAMES",
    "MODEL_BUILDERS",
    "MODEL_DEFAULTS",
    "TrainConfig",
    "TrainError",
    "Trainer",
    "build_model",
    "build_config",
    "check_model_options",
    "resume_config",
    "build_run",
    "build_datasets",
    "load_initial_weights",
    "model_from_checkpoint",
]

MODEL_NAMES = ("hmode", "hmode-official", "l2sm", "spn", "csrnet")


def _models():
    from .. import models  # imported late: the engine itself does not depend on any model class

    return models


#: name -> constructor(**model_kwargs). A new architecture is one more entry.
MODEL_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "hmode": lambda **kw: _models().HMoDE(variant="paper", **kw),
    "hmode-official": lambda **kw: _models().HMoDE(variant="official", **kw),
    "l2sm": lambda **kw: _models().L2SM(**kw),
    "spn": lambda **kw: _models().SPN(**kw),
    "csrnet": lambda **kw: _models().CSRNet(**kw),
}

def build_model(name: str, **model_kwargs) -> torch.nn.Module:
    if name not in MODEL_BUILDERS:
        raise ValueError(f"model must be one of {sorted(MODEL_BUILDERS)}, got {name!r}")
    return MODEL_BUILDERS[name](**model_kwargs)


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


def _mean_losses(sums: dict, n: float) -> dict:
    return {k: v / n for k, v in sums.items()} if n else {}


def validation_due(epoch: int, config: TrainConfig) -> bool:
    """Whether the end of ``epoch`` (1-based) is validated: from ``val_start`` on, every ``val_every`` epochs
    (the released HMoDE train.py: every epoch from the 100th); and the last epoch always, so that every
    finished run has a validated model."""
    if epoch == config.epochs:
        return True
    return epoch >= config.val_start and epoch % config.val_every == 0


def mean_count_baseline(train_set, val_set) -> dict | None:
    """The MAE on ``val_set`` of predicting the training images' mean count for every image: the score a
    model that learned nothing about the images gets. None when the counts are not known."""
    import numpy as np

    train = getattr(train_set, "counts", None)
    val = getattr(val_set, "counts", None)
    if not train or not val:
        return None
    mean = float(np.mean(train))
    return {"count": mean, "mae": float(np.mean(np.abs(np.asarray(val, dtype=np.float64) - mean)))}


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_set`` and validates on ``val_set`` (datasets of
    samples; see :mod:`crowdkernels.data`). ``collate`` defaults to :class:`crowdkernels.data.CrowdCollate`
    with the default density target. ``on_step(trainer, epoch, step)`` runs after every update (tests
    use it to stop a run). ``log`` prints messages (rank 0 only)."""

    def __init__(self, model, criterion, train_set, val_set, config: TrainConfig, *, collate=None, on_step=None, log=None):
        from ..data.targets import CrowdCollate

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
        self.history: list[dict] = []
        self.best = {"mae": None, "epoch": None}
        self.skipped: dict[str, str] = dict(getattr(train_set, "skipped", {}) or {})
        self.skipped.update(getattr(val_set, "skipped", {}) or {})
        self.baseline = mean_count_baseline(train_set, val_set)

    # ------------------------------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        if dist_utils.is_main() and not self.config.quiet:
            self._print(msg)

    def _loaders(self):
        from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset

        from ..data.targets import CrowdCollate
        from .workers import StopSafeLoader

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

    def _state(self, epoch: int, step: int, optimizer, scheduler, scaler, extra: dict) -> dict:
        return {
            "model_name": self.config.model,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict() if isinstance(self.criterion, torch.nn.Module) else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "best": dict(self.best),
            "history": list(self.history),
            "rng": rng_state(),
            **extra,
        }

    def _write_log(self) -> None:
        text = "".join(json.dumps(h, allow_nan=True) + "\n" for h in self.history)
        atomic_write(self.out / "log.jsonl", lambda f: f.write(text), mode="w")

    def _append_log(self, entry: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry, allow_nan=True) + "\n")

    # ------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        """Trains to ``config.epochs``; returns ``{"status": "finished" | "interrupted", "epoch", "best",
        "history", "skipped"}``."""
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

        model = self.model.to(self.device)
        if isinstance(self.criterion, torch.nn.Module):
            self.criterion.to(self.device)
        params = list(model.parameters())
        if isinstance(self.criterion, torch.nn.Module):
            params += [p for p in self.criterion.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        milestones = [cfg.lr_step] if cfg.lr_step else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma)
        use_scaler = cfg.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        start_epoch, start_step, epoch_extra = 0, 0, {}
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as exc:
                raise CheckpointError(f"{last}: its weights do not fit the {cfg.model!r} model of this run ({exc})") from None
            if ckpt.get("criterion") and isinstance(self.criterion, torch.nn.Module):
                self.criterion.load_state_dict(ckpt["criterion"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
            self.best, self.history = dict(ckpt["best"]), list(ckpt["history"])
            epoch_extra = ckpt.get("epoch_state", {})
            if start_step == 0:
                set_rng_state(ckpt["rng"])
            if main:
                self._write_log()  # drop lines of an epoch that was lost to a kill
            self.log(f"resuming {self.out} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))
        elif main:
            (self.out / "log.jsonl").write_text("")
        if ckpt is None and cfg.fit_levels and hasattr(model, "fit_levels"):
            self._fit_levels(model)

        ddp_model = model
        if dist_utils.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp_model = DistributedDataParallel(model, device_ids=ids)

        train_loader, sampler, val_loader = self._loaders()
        status, epoch, step = "finished", start_epoch, start_step
        if cfg.max_steps is not None and start_epoch * len(train_loader) + start_step >= cfg.max_steps:
            self.log(f"step limit: the run in {self.out} has already taken {cfg.max_steps} steps or more")
            return {"status": "step limit", "epoch": start_epoch, "best": dict(self.best),
                    "history": list(self.history), "skipped": dict(self.skipped)}
        run_start = time.perf_counter()
        completed = start_epoch
        with self.stop:
            for epoch in range(start_epoch, cfg.epochs):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                resumed_mid_epoch = epoch == start_epoch and start_step > 0
                if resumed_mid_epoch:
                    set_rng_state(epoch_extra["rng_epoch_start"])
                rng_epoch_start = rng_state()
                sums = dict(epoch_extra.get("sums", {})) if resumed_mid_epoch else {}
                seen = float(epoch_extra.get("seen", 0.0)) if resumed_mid_epoch else 0.0
                elapsed = float(epoch_extra.get("seconds", 0.0)) if resumed_mid_epoch else 0.0
                skip = start_step if resumed_mid_epoch else 0
                step = skip
                t0 = time.perf_counter()
                bar = None
                if main and not cfg.quiet:
                    from tqdm import tqdm

                    # disable=None: a bar on a terminal only; logs get the line per epoch that log() writes
                    bar = tqdm(total=len(train_loader), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                               file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
                model.train()
                stopped, budget = False, None
                for i, batch in enumerate(train_loader):
                    if i < skip:
                        if i == skip - 1:  # the batches before the stop are drawn again, then the RNG is put back
                            set_rng_state(ckpt["rng"])
                        continue
                    for name, reason in batch["skipped"]:
                        if cfg.strict:
                            raise TrainError(reason)
                        if name not in self.skipped:
                            self.skipped[name] = reason
                            self.log(f"warning: skipping {reason}")
                    if self._all_ranks_have(batch["images"] is not None):
                        losses = self._step(ddp_model, batch, optimizer, scaler)
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
                    budget = self._budget_spent(run_start, epoch * len(train_loader) + step)
                    if budget or self._stop_everywhere():
                        stopped = step < len(train_loader)
                        break
                if bar is not None:
                    bar.close()
                elapsed += time.perf_counter() - t0
                if stopped:
                    if budget:  # validated before the save, so that last.pt's history holds this entry
                        self._validate_at_stop(epoch, step, len(train_loader), budget, val_loader)
                    if main:
                        extra = {"epoch_state": {"rng_epoch_start": rng_epoch_start, "sums": sums, "seen": seen, "seconds": elapsed}}
                        save_checkpoint(last, self._state(epoch, step, optimizer, scheduler, scaler, extra))
                        if budget:
                            self._write_log()
                    self.log(f"{budget + ' reached' if budget else 'stopped'} at epoch {epoch + 1}, step {step}: "
                             f"saved {last}; continue with --resume")
                    status = budget or "interrupted"
                    break
                entry = self._end_epoch(epoch, sums, seen, elapsed, optimizer, val_loader, (epoch + 1) * len(train_loader))
                scheduler.step()
                if main:
                    save_checkpoint(last, self._state(epoch + 1, 0, optimizer, scheduler, scaler, {}))
                    self._append_log(entry)
                completed = epoch + 1
                if budget and epoch + 1 < cfg.epochs:
                    if entry["val"] is None:
                        self._validate_at_stop(epoch + 1, 0, len(train_loader), budget, val_loader)
                        if main:
                            save_checkpoint(last, self._state(epoch + 1, 0, optimizer, scheduler, scaler, {}))
                            self._write_log()
                    self.log(f"{budget} reached after epoch {epoch + 1}: saved {last}; continue with --resume")
                    status = budget
                    break
                if self.stop.requested and epoch + 1 < cfg.epochs:
                    self.log(f"stopped after epoch {epoch + 1}: saved {last}; continue with --resume")
                    status = "interrupted"
                    break
        if status != "interrupted":
            dist_utils.barrier()
        return {"status": status, "epoch": completed, "best": dict(self.best),
                "history": list(self.history), "skipped": dict(self.skipped)}

    def _fit_levels(self, model) -> None:
        """L2SM sec. 4.2: the G density levels over every region of the training set's ground truth (whole
        images, the run's target settings), before the first step."""
        from torch.utils.data import DataLoader

        from ..data.targets import CrowdCollate

        base = getattr(self.train_set, "unaugmented", lambda: self.train_set)()
        collate = CrowdCollate(target_from_config(self.config), multiple=getattr(model, "pad_multiple", 1))
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

    def _validate(self, val_loader) -> dict:
        cfg = self.config
        metrics, _ = evaluate(self.model, val_loader, self.device, tile=cfg.tile, amp=cfg.amp, game_levels=0,
                              all_reduce=dist_utils.all_reduce_sum if dist_utils.is_distributed() else None,
                              strict=cfg.strict)
        if self.baseline is not None:
            metrics["baseline_mae"], metrics["baseline_count"] = self.baseline["mae"], self.baseline["count"]
        return metrics

    def _select(self, metrics: dict, epoch: int, step: int = 0) -> None:
        """Keeps ``best.pt`` the model with the lowest validation MAE so far."""
        cfg = self.config
        mae = metrics.get("mae")
        if mae is not None and (self.best["mae"] is None or mae < self.best["mae"]):
            self.best = {"mae": mae, "mse": metrics.get("mse"), "epoch": epoch, **({"step": step} if step else {})}
            if dist_utils.is_main():
                save_checkpoint(self.out / "best.pt", {
                    "model_name": cfg.model, "config": cfg.to_dict(), "model": self.model.state_dict(),
                    "epoch": epoch, "step": step, "best": dict(self.best),
                })

    def _validate_at_stop(self, epoch: int, step: int, steps_per_epoch: int, reason: str, val_loader) -> None:
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
        self._select(metrics, label, step)
        at = label - 1 + step / steps_per_epoch if step else float(label)  # epochs trained, fractional
        self.history.append({"epoch": label, "step": step or steps_per_epoch, "at_epoch": at,
                             "global_step": (label - 1) * steps_per_epoch + (step or steps_per_epoch), "stop": reason,
                             "val": metrics})
        self.log(f"{reason}: epoch {label} step {step or steps_per_epoch}  val mae {metrics['mae']:.3f} mse {metrics['mse']:.3f}"
                 + (f" (mean-count baseline {metrics['baseline_mae']:.3f})" if metrics.get("baseline_mae") is not None else ""))

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

    def _step(self, model, batch, optimizer, scaler) -> dict:
        images = batch["images"].to(self.device, non_blocking=True)
        targets = {
            "density": batch["density"].to(self.device, non_blocking=True),
            "points": [p.to(self.device) for p in batch["points"]],
        }
        with autocast(self.device, self.config.amp):
            output = model(images)
        losses = self.criterion(output, targets)
        total = losses["total"]
        if not torch.isfinite(total.detach()).all():
            raise TrainError(f"the loss is {float(total.detach())} on images {batch['names']}: lower --lr, or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}

    def _end_epoch(self, epoch, sums, seen, elapsed, optimizer, val_loader, global_step: int) -> dict:
        cfg = self.config
        totals = dist_utils.all_reduce_sum(torch.tensor([seen, *sums.values()], dtype=torch.float64))
        seen_all = float(totals[0])
        losses = {k: float(v) / seen_all for k, v in zip(sums, totals[1:])} if seen_all else {}
        entry = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": losses,
            "images": int(seen_all),
            "seconds": elapsed,
            "images_per_s": seen_all / elapsed if elapsed > 0 else None,
            "val": None,
        }
        due = validation_due(epoch + 1, cfg)
        if val_loader is not None and due:
            metrics = self._validate(val_loader)
            entry["val"] = metrics
            self._select(metrics, epoch + 1)
        self.history.append(entry)
        val = entry["val"]
        self.log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {losses.get('total', float('nan')):.5g}  lr {entry['lr']:.3g}"
            + (f"  val mae {val['mae']:.3f} mse {val['mse']:.3f}" if val and val.get("mae") is not None else "")
            + (f" (mean-count baseline {val['baseline_mae']:.3f})" if val and val.get("baseline_mae") is not None else "")
            + f"  ({elapsed:.1f} s)"
        )
        return entry


def target_from_config(config: TrainConfig):
    """The run's :class:`crowdkernels.data.DensityTarget` (``config.target`` without its scale)."""
    from ..data.targets import DensityTarget

    t = {k: v for k, v in (config.target or {}).items() if k != "scale"}
    return DensityTarget(**t)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def build_run(config: TrainConfig, *, warn=None):
    """(model, criterion, train_set, val_set) of a run: the model with its pretrained encoder
    (``config.pretrained``) or initial weights (``config.init``), its input and output conventions
    (``input_norm``, ``density_scale`` = the target's scale), its criterion with ``config.criterion_kwargs``,
    and the datasets (:func:`build_datasets`)."""
    from ..data.transforms import check_norm

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


def load_initial_weights(model, path) -> str:
    """Loads ``path`` into ``model`` (a fresh run's starting point, nothing else of the file): a crowdkernels
    checkpoint (its "model"), or one of the authors' released HMoDE files (a plain state_dict, or their
    training checkpoint ``{"model": state_dict with "module." keys, ...}``), detected by their key names and
    mapped with :func:`crowdkernels.models.hmode.official_key_map` (HMoDE models, K = 3, N = 2). Returns
    "crowdkernels" or "released". CheckpointError naming the file when it does not fit."""
    from .checkpoint import read_weights_file

    kind, state = read_weights_file(path)
    if kind == "released":
        from ..models.hmode import HMoDE, official_key_map

        if not isinstance(model, HMoDE) or model.num_experts != 3 or model.group_size != 2 or model.fusion != "hmode":
            raise CheckpointError(f"{path} holds the authors' released HMoDE weights (K = 3, N = 2): train an 'hmode' or "
                                  "'hmode-official' model from it")
        state = {official_key_map(k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: its weights do not fit the {type(model).__name__} model of this run "
                              f"({first[0] if first else exc}{'; ' + first[1].strip() if len(first) > 1 else ''})") from None
    return kind


# ----------------------------------------------------------------------------------------- data
def build_transforms(config: TrainConfig, train: bool, sha: bool = False):
    """The sample pipeline of a run: resizing, cropping and flipping (training) on RGB in [0, 1], then the
    model's input normalization (``config.input_norm``), always last."""
    from ..data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, Resize

    steps = []
    max_size = _max_size(config)
    if train:
        if config.crop:
            steps += [Resize(max_size=max_size, min_size=config.crop), RandomCrop(config.crop)]
        elif max_size is not None:
            steps.append(Resize(max_size=max_size, multiple=config.multiple))
        if config.flip:
            steps.append(RandomHorizontalFlip())
    elif max_size is not None:
        steps.append(Resize(max_size=max_size))
    if config.input_norm is not None:
        steps.append(Normalize(config.input_norm))
    return Compose(steps) if steps else None


def split_off(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): ``round(fraction * n)`` samples (at least 1, leaving at least 1) drawn with ``seed``
    from the samples in natural name order, so the split does not depend on the file system's order."""
    import numpy as np

    from ..data.datasets import natural_key

    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise ValueError(f"--val-from-train must be a fraction in (0, 1), got {fraction!r}")
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    n = len(ordered)
    if n < 2:
        raise TrainError(f"--val-from-train needs at least 2 training images, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [s for i, s in enumerate(ordered) if i not in held], [s for i, s in enumerate(ordered) if i in held]


def _warn_upsampling_crop(samples, crop: int, warn) -> None:
    """A crop larger than an image makes Resize(min_size=crop) upsample it first: slower (an epoch of
    small images at a large crop took 250x longer) and heads drawn larger than they are."""
    small = []
    for s in samples:
        try:
            h, w = s.size()
        except Exception:  # unreadable files are reported by the dataset itself
            continue
        if min(h, w) < crop:
            small.append(crop / min(h, w))
    if small and warn:
        warn(f"warning: {len(small)} training image(s) are smaller than --crop {crop} and are upsampled first "
             f"(up to {max(small):.1f}x): training is slower and heads look larger; pass a smaller --crop")


def build_datasets(config: TrainConfig, *, split: str = "train", warn=None, levels=None):
    """(train_set, val_set) of ``config.dataset`` with the training transforms (split "train"), or
    (None, eval_set) for ``split`` "val"/"test". Synthetic crowds: ``config.synthetic`` gives the sizes;
    the held-out set uses another seed. ``config.val_from_train`` holds a seeded fraction of the training
    images out as the validation set (instead of the dataset's val/test split); ``config.patches`` =
    "csrnet9" trains on CSRNet's nine patches per image (:class:`crowdkernels.data.patches.NinePatches`).
    ``config.repeat`` > 1 reads each training sample that many times an epoch (a new random crop and flip each
    time). The training set's ``unaugmented()`` gives its images once each, without the random transforms."""
    from ..data.datasets import CrowdDataset, SyntheticCrowds, dataset_samples

    if config.dataset == "synthetic":
        syn = config.synthetic
        val = SyntheticCrowds(int(syn["val"]), int(syn["size"]), config.seed + 1000, transform=build_transforms(config, False))
        if split != "train":
            return None, val
        if config.crop and config.crop > int(syn["size"]) and warn:
            warn(f"warning: the synthetic images ({syn['size']} px) are smaller than --crop {config.crop} and are upsampled first")
        train = SyntheticCrowds(int(syn["train"]), int(syn["size"]), config.seed, transform=build_transforms(config, True))
        train.unaugmented = lambda: SyntheticCrowds(int(syn["train"]), int(syn["size"]), config.seed,
                                                    transform=build_transforms(config, False))
        return _repeated(train, config), val
    if config.root is None:
        raise TrainError(f"--root is required for --dataset {config.dataset}")
    if split != "train":
        val_samples, note = dataset_samples(config.dataset, config.root, split, fold=config.fold)
        return None, CrowdDataset(val_samples, build_transforms(config, False), strict=config.strict, warn=warn, levels=levels)
    if config.val_from_train is not None:
        everything, train_note = dataset_samples(config.dataset, config.root, "train", fold=config.fold, whole=True)
        train_samples, val_samples = split_off(everything, config.val_from_train, config.seed)
        note = f"{config.val_from_train:g} of the training images held out with seed {config.seed} (--val-from-train)"
    else:
        val_samples, note = dataset_samples(config.dataset, config.root, "val", fold=config.fold)
        train_samples, train_note = dataset_samples(config.dataset, config.root, "train", fold=config.fold)
    val = CrowdDataset(val_samples, build_transforms(config, False), strict=config.strict, warn=warn, levels=levels)
    if warn:
        warn(f"train: {len(train_samples)} images ({train_note}); val: {len(val_samples)} images ({note})")
    if config.crop:
        _warn_upsampling_crop(train_samples, config.crop, warn)
    plain = build_transforms(config, False)
    if config.patches is not None:
        from ..data.patches import NinePatches
        from ..data.transforms import Normalize, Resize

        if config.patches != "csrnet9":
            raise ValueError(f"patches must be None or 'csrnet9', got {config.patches!r}")
        # the patches are cut from the (resized) RGB image, then normalized
        resize = None if config.max_size is None else Resize(max_size=_max_size(config))
        train = NinePatches(CrowdDataset(train_samples, resize, strict=config.strict, warn=warn),
                            post=Normalize(config.input_norm))
    else:
        train = CrowdDataset(train_samples, build_transforms(config, True), strict=config.strict, warn=warn)
    train.unaugmented = lambda: CrowdDataset(train_samples, plain, strict=config.strict)
    return _repeated(train, config), val


def _repeated(train, config: TrainConfig):
    """The training set with each of its samples ``config.repeat`` times an epoch (:class:`Repeated`)."""
    from ..data.patches import Repeated

    times = config.repeat
    return train if type(times) is int and times == 1 else Repeated(train, times)


def _max_size(config: TrainConfig):
    """``config.max_size`` as Resize takes it: an int, or a (a, b) box (JSON keeps it as a list)."""
    return tuple(config.max_size) if isinstance(config.max_size, (list, tuple)) else config.max_size


def model_from_checkpoint(path, device="cpu", *, model: str | None = None, model_kwargs: dict | None = None):
    """(model in eval mode on ``device``, checkpoint dict) from a checkpoint of :class:`Trainer`, or from one of
    the authors' released HMoDE files (a plain state_dict, or ``{"model": ...}``; the model is then the
    official variant fed as the released test.py feeds it: ImageNet normalization, unpadded, counts = sum /
    100; the dict returned has ``"released": True``). With ``model`` (and ``model_kwargs``) given, a
    checkpoint of another model or variant is refused with an error naming both. ``model.input_norm`` and
    ``model.density_scale`` are the checkpoint's conventions."""
    from ..data.transforms import IMAGENET_NORM as NORM
    from ..data.transforms import check_norm
    from .checkpoint import read_weights_file

    kind, payload = read_weights_file(path)
    if kind == "released":
        from ..models.hmode import HMoDE

        ckpt = {"model_name": "hmode-official", "released": True,
                "config": {"model": "hmode-official", "model_kwargs": {}, "input_norm": dict(NORM),
                           "target": {"scale": 100.0}}}
        if model is not None:
            check_model(ckpt, path, model, model_kwargs)
        try:
            net = HMoDE.from_official(payload)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a complete released HMoDE state_dict ({exc})") from None
        net.input_norm = check_norm(NORM)
        return net.to(device).eval(), ckpt
    ckpt = payload
    if model is not None:
        check_model(ckpt, path, model, model_kwargs)
    cfg = ckpt.get("config") or {}
    name = ckpt.get("model_name")
    net = build_model(name, **(cfg.get("model_kwargs") or {}))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit a {name!r} model ({exc})") from None
    # fed as it was trained: checkpoints from before the convention was saved were trained on raw [0, 1]
    net.input_norm = check_norm(cfg.get("input_norm")) if "input_norm" in cfg else None
    if isinstance(cfg.get("target"), dict) and "scale" in cfg["target"]:
        net.density_scale = float(cfg["target"]["scale"])
    return net.to(device).eval(), ckpt
