"""``crowdkernels eval``: a checkpoint's metrics on a dataset split (:meth:`crowdkernels.Counter.evaluate` on
the data of :func:`crowdkernels.engine.config.evaluation_config`)."""
from __future__ import annotations

import argparse

from ._args import EXIT_OK, CliError, add_options, load_counter, report_skipped, warn
from .._io import output_dir, output_file, save_json
from ..data import DENSITY_LEVELS
from ..engine.config import EVAL_OPTIONS, evaluation_config, require_root
from ..engine.evaluate import EvaluationWriter
from ..engine.pipeline import evaluation_dataset
from ..engine.metrics import MSE_NOTE, metrics_text
from ..inference import COUNTER_OPTIONS

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
    add_options(p, EVAL_OPTIONS + COUNTER_OPTIONS)
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
    print(metrics_text(metrics, f"eval {args.dataset}/{split}{cross}"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_json(out, result)
    if writer is not None:
        writer.finish(metrics, result, title=f"{result['model']} ({args.checkpoint.name}) on {args.dataset}/{split}")
        print(f"  predictions.csv, scatter.png, metrics.json and {writer.drawn} picture(s) in {save_dir}")
    report_skipped(getattr(data, "skipped", {}))
    return EXIT_OK
