"""``crowdkernels demo``: a small model trained and evaluated on synthetic crowds
(:func:`crowdkernels.engine.demo.run_demo`)."""
from __future__ import annotations

import argparse

from ._args import EXIT_FAILED, EXIT_OK, CliError, add_options
from .._io import output_dir
from ..engine.demo import DEMO, DEMO_OPTIONS, FAST, run_demo

NAME = "demo"
HELP = "train a small model on synthetic crowds, evaluate it against the mean-count baseline, draw it"


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Renders a synthetic crowd set (train and held-out), makes its density maps with the kernel, trains a "
        "reduced-width model on the CPU (under a minute), and evaluates it on the held-out images against "
        "the mean-count baseline. Writes OUT/metrics.json, OUT/learning_curve.png, OUT/pictures/*.png "
        "(image | predicted | true density), OUT/density/*.npy, OUT/data/{train,val}/ (the images and their "
        "points, a 'folder' dataset), OUT/summary.json and the run in OUT/run/ (last.pt, best.pt)."
    )
    add_options(p, DEMO_OPTIONS)
    return run


def run(args) -> int:
    output_dir(args.out, "--out")
    base = FAST if args.fast else DEMO
    size = args.size or base["size"]
    if size < 16:
        raise CliError(f"--size must be >= 16, got {size}")
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    summary = run_demo(
        args.out, num_images=args.num_images or base["train"], val_images=args.val_images or base["val"],
        size=size, seed=args.seed, epochs=args.epochs or base["epochs"], minutes=args.minutes,
        model=args.model, width=args.width, lr=base["lr"], batch_size=base["batch_size"],
    )
    ok = summary["ok"] and (args.fast or summary["metrics"]["ok"])
    return EXIT_OK if ok else EXIT_FAILED
