"""``crowdkernels count``: the people in images, folders or glob patterns (:meth:`crowdkernels.Counter.predictions`),
with pictures (:func:`crowdkernels.viz.save_count_picture`) and located heads on request."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ._args import EXIT_FAILED, EXIT_OK, CliError, add_input_settings, load_counter, report_skipped, warn
from .._io import output_dir
from ..data import ImageError
from ..engine import MODEL_NAMES
from ..engine.config import positive_int
from ..inference import image_paths
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
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt from crowdkernels train")
    p.add_argument("--json", action="store_true", help="print one JSON list on stdout (progress and logs on stderr)")
    p.add_argument("--save-dir", type=Path,
                   help="write DIR/<image stem>.png: the image beside its density map, the count in the title (and "
                        "the true count and map when a point file <image stem>.txt/.csv/.json lies beside it). Images "
                        "that share a stem (a/crowd.jpg, b/crowd.jpg) are named after their paths below the folder they "
                        "have in common, '/' written '__' (a__crowd.png, b__crowd.png; crowd.jpg.png and crowd.png.png "
                        "for two files of one folder), so that no picture overwrites another")
    p.add_argument("--model", choices=MODEL_NAMES, help="refuse a checkpoint of another model")
    p.add_argument("--points", action="store_true",
                   help="locate the heads (as many as the rounded count; see Counter.points): stdout becomes a CSV "
                        "'image,x,y,score' (pixels; score: people near the point), with --json each image gets "
                        "\"points\": [[x, y, score], ...]; --save-dir pictures mark them")
    add_input_settings(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="images of one size run together; default: 1")
    p.add_argument("--device", help="default: cuda when visible, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on a GPU (no effect on the CPU: a warning says so)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image")
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
