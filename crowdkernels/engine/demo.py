"""The demo: the whole job on built-in synthetic crowds, on a CPU, in under a minute (about 35 s of CPU time).

:func:`run_demo` renders a training set and a held-out set of synthetic crowds, makes their density maps
with the kernel, trains a width-reduced model from scratch, evaluates it on the held-out images against
the mean-count baseline, and draws pictures. ``crowdkernels demo`` runs it with :data:`DEMO` (or
:data:`FAST` with ``--fast``, a seconds-long smoke run).

Files in OUT:

- ``metrics.json``: mae, mse (an RMSE, the papers' name), nae, game0-3, baseline_mae, baseline_mse, ``ok``
  (mae <= baseline_mae / 2) and per-image counts;
- ``summary.json``: image counts, head counts, map sums, timings, ``ok`` (every map sums to its heads);
- ``learning_curve.png``; ``pictures/heldout_<name>.png`` (image | predicted | true density,
  :func:`crowdkernels.viz.save_picture`) for the first ``pictures`` held-out images;
- ``density/<name>.npy`` (float32 maps);
- ``data/train/`` and ``data/val/``: the images as PNG with their heads as ``<name>.txt`` (x y per
  line), a dataset in the ``folder`` format, to try ``crowdkernels eval --dataset folder --root OUT/data``
  and ``crowdkernels count OUT/data/val`` on.

A held-out image has one name everywhere: ``heldout_synthetic_0000`` in ``data/val/``, ``density/``,
``pictures/``, ``metrics.json`` and ``summary.json`` (the two sets number their images alike, so the training
images are ``synthetic_0000``, ...);
- ``run/``: the training run (``last.pt`` = the final model, ``best.pt``, ``log.jsonl``), loadable with
  :func:`crowdkernels.load`.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, save_json, save_npy
from .._options import Option, positive_float, positive_int
from ..data.targets import CrowdCollate, DensityTarget
from ..data.datasets import SyntheticCrowds
from ..data.transforms import Compose, IMAGENET_NORM, Normalize, RandomHorizontalFlip
from ..inference import Counter
from ..models import MODEL_NAMES
from ..models.registry import build_model
from ..viz import save_learning_curve, save_picture
from .evaluate import evaluate
from .metrics import MSE_NOTE
from .pipeline import held_out_seed
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["DEMO", "DEMO_OPTIONS", "FAST", "run_demo"]

#: The demo's settings: a width-reduced model from scratch on the CPU; its held-out MAE must reach half
#: the mean-count baseline's within the time budget.
DEMO = {"train": 160, "val": 40, "size": 96, "epochs": 30, "minutes": 7.0, "model": "csrnet", "width": 0.125, "lr": 1e-3,
        "batch_size": 8}
FAST = {"train": 8, "val": 4, "size": 64, "epochs": 1, "lr": 3e-3, "batch_size": 4}

#: ``crowdkernels demo``'s options (:func:`run_demo`'s arguments; those without a default take :data:`DEMO`'s, or
#: with ``--fast`` :data:`FAST`'s)
DEMO_OPTIONS = (
    Option("--out", default=Path("crowdkernels-demo"), type=Path, help="default: ./crowdkernels-demo"),
    Option("--num-images", type=positive_int, help=f"training images; default: {DEMO['train']}"),
    Option("--val-images", type=positive_int, help=f"held-out images; default: {DEMO['val']}"),
    Option("--size", type=positive_int, help=f"image side in pixels (>= 16); default: {DEMO['size']}"),
    Option("--epochs", type=positive_int, help=f"default: {DEMO['epochs']}"),
    Option("--minutes", type=positive_float, default=DEMO["minutes"],
           help=f"training time budget (stops after the epoch that passes it); default: {DEMO['minutes']}"),
    Option("--model", choices=MODEL_NAMES, default=DEMO["model"], help=f"default: {DEMO['model']}"),
    Option("--width", type=positive_float, default=DEMO["width"], help=f"model width multiplier; default: {DEMO['width']}"),
    Option("--seed", type=int, default=0, help="default: 0"),
    Option("--fast", action="store_true", help="a seconds-long smoke run (few small images, one epoch)"),
)


def _demo_targets(samples):
    """[B, 1, H, W] float32 maps of the samples in one batched call (adaptive sigma, style exact)."""
    return DensityTarget()([s.points_tensor() for s in samples], samples[0].size)


#: the prefix of the held-out images' names in every output (the two sets number their images alike)
HELDOUT = "heldout_"


def _write_folder_dataset(folder: Path, samples, prefix: str = "") -> None:
    """The samples as a dataset of the ``folder`` format: PREFIX+NAME.png and PREFIX+NAME.txt (one "x y" per head)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in samples:
        name = prefix + s.name
        atomic_write(folder / f"{name}.png", lambda f, s=s: Image.fromarray(s.image).save(f, format="PNG"))
        text = "".join(f"{x:.3f} {y:.3f}\n" for x, y in s.points)
        atomic_write(folder / f"{name}.txt", lambda f, text=text: f.write(text), mode="w")


def run_demo(out, *, num_images: int = 160, val_images: int = 40, size: int = 128, seed: int = 0, epochs: int = 40,
             minutes: float = 7.0, model: str = "csrnet", width: float = 0.125, lr: float = 1e-3, batch_size: int = 8,
             pictures: int = 8, stream=None) -> dict:
    """The demo, end to end:

    1. render ``num_images`` synthetic crowds to train on and ``val_images`` held out (another seed);
    2. make their density maps with the kernel (OUT/density/<name>.npy, float32; each sums to its
       head count, checked: ``ok``);
    3. train a ``width``-reduced ``model`` from scratch (flips, Adam at ``lr``) for ``epochs`` or until
       ``minutes`` are spent (OUT/run/: checkpoints and log.jsonl);
    4. evaluate the final model on the held-out images against the mean-count baseline (always the
       training set's mean count): OUT/metrics.json with mae, mse (an RMSE, the papers' name), nae,
       game0-3, baseline_mae, baseline_mse and ``ok`` (mae <= baseline_mae / 2);
    5. draw OUT/learning_curve.png and OUT/pictures/heldout_<name>.png for the first ``pictures``
       held-out images.

    Messages go to ``stream`` (default: stdout). Returns the summary also written to OUT/summary.json
    (``metrics`` holds metrics.json).
    """
    stream = sys.stdout if stream is None else stream
    out = Path(out)
    for sub in ("density", "pictures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own previous run: each demo trains afresh
    t0 = time.perf_counter()

    # 1-2. data and targets (the datasets cache their renderings, so training reuses these)
    train_set = SyntheticCrowds(num_images, size, seed, transform=Compose([RandomHorizontalFlip(), Normalize(IMAGENET_NORM)]))
    val_set = SyntheticCrowds(val_images, size, held_out_seed(seed), transform=Normalize(IMAGENET_NORM))
    train_samples = [train_set.base[i] for i in range(len(train_set))]
    val_samples = [val_set.base[i] for i in range(len(val_set))]
    samples = train_samples + val_samples
    t1 = time.perf_counter()
    maps = _demo_targets(samples)[:, 0].numpy()
    t2 = time.perf_counter()
    rows = []
    for i, (sample, density) in enumerate(zip(samples, maps)):
        prefix = "" if i < len(train_samples) else HELDOUT
        save_npy(out / "density" / f"{prefix}{sample.name}.npy", density)
        rows.append({"name": prefix + sample.name, "heads": sample.count, "map_sum": float(np.sum(density, dtype=np.float64))})
    _write_folder_dataset(out / "data" / "train", train_samples)
    _write_folder_dataset(out / "data" / "val", val_samples, prefix=HELDOUT)
    worst = max(abs(r["map_sum"] - r["heads"]) / max(1, r["heads"]) for r in rows)
    heads = sum(r["heads"] for r in rows)
    print(f"demo: {len(train_samples)} + {len(val_samples)} held-out synthetic images {size}x{size}, {heads} heads, "
          f"density maps in {t2 - t1:.2f} s (worst relative sum error {worst:.1e})", file=stream)

    # 3. training
    torch.manual_seed(seed)
    config = TrainConfig(
        out=str(out / "run"), model=model, model_kwargs={"width": width}, dataset="synthetic", epochs=epochs,
        batch_size=batch_size, lr=lr, lr_step=None, crop=None, flip=True, val_every=1, workers=0, seed=seed, tile=None,
        max_seconds=minutes * 60.0, synthetic={"train": num_images, "val": val_images, "size": size},
    )
    net = build_model(model, width=width)
    # REL off: its hinge on predicted window counts is exactly zero for a flat map, and from scratch it
    # outweighs the per-pixel density loss and pulls a small untrained model to one (it predicts the mean
    # count; measured). On top of a pretrained backbone, as in the papers, it refines an informative map.
    criterion = net.criterion(rel=False) if model in ("csrnet", "hmode", "hmode-official") else net.criterion()
    trainer = Trainer(net, criterion, train_set, val_set, config, log=lambda msg: print(msg, file=stream))
    summary_run = trainer.run()
    t3 = time.perf_counter()

    # 4. held-out evaluation of the final model, against the mean-count baseline
    device = trainer.device
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, collate_fn=CrowdCollate(target=None))
    metrics, acc = evaluate(net, loader, device, tile=None)
    mean_count = float(np.mean([s.count for s in train_samples]))
    truth = np.array([s.count for s in val_samples], dtype=np.float64)
    result = {
        "mae": metrics["mae"],
        "mse": metrics["mse"],
        "nae": metrics["nae"],
        **{f"game{lv}": metrics[f"game{lv}"] for lv in range(4)},
        "baseline_mae": float(np.mean(np.abs(truth - mean_count))),
        "baseline_mse": float(np.sqrt(np.mean((truth - mean_count) ** 2))),
        "baseline_count": mean_count,
        "held_out_images": len(val_samples),
        "train_images": len(train_samples),
        "epochs": summary_run["epoch"],
        "stopped_by": summary_run["status"],
        "model": model,
        "width": width,
        "seconds_training": t3 - t2,
        "note": MSE_NOTE,
        "per_image": [{**r, "name": HELDOUT + r["name"]} for r in acc.per_image],
    }
    result["ok"] = result["mae"] <= result["baseline_mae"] / 2

    # 5. pictures and learning curve
    counter = Counter(net, device, tile=None)
    truth_maps = maps[len(train_samples):]
    for sample, density in list(zip(val_samples, truth_maps))[:pictures]:
        pred = counter.predict(sample.image)
        save_picture(out / "pictures" / f"{HELDOUT}{sample.name}.png", pred.image, pred.density(), truth=density,
                     name=f"{HELDOUT}{sample.name}", count=pred.count, true_count=sample.count)
    save_learning_curve(out / "learning_curve.png", summary_run["history"], result["baseline_mae"],
                        title="crowdkernels demo: learning curve")
    save_json(out / "metrics.json", result)

    summary = {
        "images": len(rows),
        "size": [size, size],
        "seed": seed,
        "heads": heads,
        "map_sum": float(sum(r["map_sum"] for r in rows)),
        "max_relative_error": worst,
        "ok": worst <= 1e-4,
        "seconds": {"render": t1 - t0, "density": t2 - t1, "training": t3 - t2, "total": time.perf_counter() - t0},
        "per_image": rows,
        "metrics": {k: v for k, v in result.items() if k != "per_image"},
    }
    save_json(out / "summary.json", summary)
    verdict = "met" if result["ok"] else "NOT met"
    print(
        f"demo: held-out MAE {result['mae']:.2f}, MSE {result['mse']:.2f} vs mean-count baseline MAE "
        f"{result['baseline_mae']:.2f} (target mae <= baseline/2: {verdict}); {summary_run['epoch']} epochs of "
        f"{model} (width {width}) in {t3 - t2:.0f} s; total {summary['seconds']['total']:.0f} s; outputs in {out}",
        file=stream,
    )
    return summary
