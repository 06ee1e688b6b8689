"""``crowdkernels count``: the people in images, folders or glob patterns (:meth:`crowdkernels.Counter.predictions`),
with pictures (:func:`crowdkernels.viz.save_count_picture`) and located heads on request."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from ._args import EXIT_FAILED, EXIT_OK, CliError, add_options, load_counter, report_skipped, warn
from .._io import output_dir
from ..data import ImageError
from ..inference import COUNT_OPTIONS, COUNTER_OPTIONS, image_paths
from ..viz import picture_names, save_count_picture

NAME = "count"
HELP = "count the people in images, folders or glob patterns with a trained checkpoint"


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Prints one line per image (path TAB count), or with --json one JSON list [{\"image\": PATH, \"count\": "
        "FLOAT}, ...] and nothing else on stdout. IMAGE may be a file, a folder (its images, sorted; video files "
        "in it are left out with a warning) or a glob pattern ('shots/*.jpg'); URLs are not read (download the "
        "image first). Images are fed as the checkpoint's training validated them (its max size, tiling, "
        "normalization, density scale; --max-size and --tile override); the settings used are printed on stderr. "
        "Images that fail are named on stderr and left out; the exit code is then 1."
    )
    add_options(p, COUNTER_OPTIONS + COUNT_OPTIONS)
    return run


def _print_heads(source: str, heads, header: bool) -> None:
    """CSV rows 'image,x,y,score' of one image's located heads on stdout (the header before the first)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    if header:
        writer.writerow(["image", "x", "y", "score"])
    writer.writerows([source, f"{x:.2f}", f"{y:.2f}", f"{c:.4f}"] for x, y, c in heads.tolist())
    sys.stdout.flush()


def run(args) -> int:
    save_dir = None if args.save_dir is None else output_dir(args.save_dir, "--save-dir")
    try:
        paths = image_paths(args.images)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    counter = load_counter(args)
    warn(f"input settings: {counter.describe_settings()}")
    pictures = {}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        pictures = picture_names(paths)
    results, failed = [], {}
    try:
        for pred in counter.predictions(paths, args.batch_size, errors="raise" if args.strict else "skip"):
            if pred.error is not None:
                failed[pred.source] = pred.error
                warn(f"skipping {pred.error}")
                continue
            results.append({"image": pred.source, "count": pred.count})
            heads = pred.points() if args.points else None
            if heads is not None and args.json:
                results[-1]["points"] = [[round(x, 2), round(y, 2), round(c, 4)] for x, y, c in heads.tolist()]
            elif heads is not None:
                _print_heads(pred.source, heads, header=len(results) == 1)
            elif not args.json:
                print(f"{pred.source}\t{pred.count:.2f}", flush=True)
            if save_dir is not None:
                save_count_picture(save_dir / pictures[pred.source], pred, heads=heads, warn=warn)
    except ImageError as exc:  # --strict
        raise CliError(f"{exc} (--strict)") from None
    if args.json:
        print(json.dumps(results))
    if failed:
        report_skipped(failed)
        return EXIT_FAILED
    return EXIT_OK
