"""``crowdkernels eval``: a checkpoint's metrics on a dataset split (:meth:`crowdkernels.Counter.evaluate` on
the data of :func:`crowdkernels.engine.config.evaluation_config`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._args import EXIT_OK, CliError, add_input_settings, load_counter, report_skipped, warn
from .._io import output_dir, output_file, save_json
from ..data import DATASET_NAMES, DENSITY_LEVELS
from ..engine import MODEL_NAMES
from ..engine.config import evaluation_config, nonnegative_int, require_root
from ..engine.evaluate import EvaluationWriter
from ..engine.pipeline import evaluation_dataset
from ..engine.metrics import MSE_NOTE

NAME = "eval"
HELP = "evaluate a checkpoint on a dataset split: MAE, MSE (RMSE), NAE, GAME(0-3), per density level"


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Full-image inference (tiled with overlap beyond --tile pixels) over a split. Images are fed as the "
        "checkpoint's training validated them (its max size, tiling, normalization, density scale; --max-size and "
        "--tile override), so on the training's own data it reproduces the validation MAE of its log.jsonl; the "
        "settings used are printed on stderr (and saved with --out). The dataset may differ "
        "from the training one (cross-dataset evaluation). Results are binned by true count into JHU's "
        "levels low 0-50, medium 51-500, high 501+. 'mse' is an RMSE, named as in the papers."
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", type=Path, help="the dataset folder")
    p.add_argument("--split", choices=("val", "test", "train"),
                   help="default: the images the checkpoint's training validated on (on its own dataset: those "
                        "--val-from-train held out; else the val split, the test split where there is no val, every "
                        "10th training image where there is neither). A val or test split the dataset does not have "
                        "is an error naming the folders found")
    p.add_argument("--fold", type=int, choices=range(1, 6), metavar="K", help="UCF_CC_50 fold 1-5; default: the training's")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    add_input_settings(p)
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on a GPU (no effect on the CPU: a warning says so)")
    p.add_argument("--workers", type=nonnegative_int, default=2, help="default: 2")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file")
    p.add_argument("--out", type=Path, help="write the metrics, the input settings used and the per-image counts as "
                                            "JSON here")
    p.add_argument("--save-dir", type=Path,
                   help="write DIR/predictions.csv (image, true count, predicted count, error), DIR/metrics.json, "
                        "DIR/scatter.png (predicted against true counts) and DIR/pictures/<image>.png")
    p.add_argument("--pictures", type=nonnegative_int, help="with --save-dir: draw at most this many pictures; default: all")
    return run


def run(args) -> int:
    out = None if args.out is None else output_file(args.out, "--out")
    save_dir = None if args.save_dir is None else output_dir(args.save_dir, "--save-dir")
    require_root(args.dataset, args.root)
    counter = load_counter(args)
    trained = counter.info.get("config") or {}
    cfg = evaluation_config(trained, args.dataset, args.root, split=args.split, fold=args.fold,
                            max_size=counter.max_size, strict=args.strict)
    split = args.split or "val"
    data, note = evaluation_dataset(cfg, args.split, warn=warn, must_exist=args.split is not None)
    warn(f"{split}: {len(data)} images ({note})")
    warn(f"input settings: {counter.describe_settings()}")
    writer = None
    if save_dir is not None:
        paths = {s.name: str(s.image) for s in getattr(data, "samples", [])}
        writer = EvaluationWriter(save_dir, pictures=args.pictures, paths=paths)
    metrics, acc = counter.evaluate(data, levels=DENSITY_LEVELS, strict=args.strict, warn=warn,
                                    workers=args.workers, on_image=writer)
    result = {
        "checkpoint": str(args.checkpoint),
        "model": counter.info.get("model"),
        "trained_on": trained.get("dataset"),
        "evaluated_on": args.dataset,
        "split": split,
        "settings": counter.settings(),
        **metrics,
        "note": MSE_NOTE,
        "per_image": acc.per_image,
    }
    cross = f" (trained on {result['trained_on']})" if result["trained_on"] not in (None, args.dataset) else ""
    if metrics["images"] == 0:
        raise CliError("no image could be evaluated")
    print(f"eval {args.dataset}/{split}{cross}: {metrics['images']} images  MAE {metrics['mae']:.3f}  "
          f"MSE {metrics['mse']:.3f}  NAE {metrics['nae'] if metrics['nae'] is None else round(metrics['nae'], 4)}  "
          + "  ".join(f"GAME{lv} {metrics[f'game{lv}']:.3f}" for lv in range(4)))
    for name, m in metrics.get("levels", {}).items():
        if m["images"]:
            print(f"  {name:<6} {m['images']:5d} images  MAE {m['mae']:.3f}  MSE {m['mse']:.3f}")
    print(f"  ('MSE' is the root mean squared error, the papers' name); {metrics['skipped']} file(s) skipped")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_json(out, result)
    if writer is not None:
        writer.finish(metrics, result, title=f"{result['model']} ({args.checkpoint.name}) on {args.dataset}/{split}")
        print(f"  predictions.csv, scatter.png, metrics.json and {writer.drawn} picture(s) in {save_dir}")
    report_skipped(getattr(data, "skipped", {}))
    return EXIT_OK
