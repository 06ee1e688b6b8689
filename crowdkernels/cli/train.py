"""``crowdkernels train``: a run of :class:`crowdkernels.engine.Trainer` with the settings of
:func:`crowdkernels.engine.config.build_config` (or, with --resume, of
:func:`crowdkernels.engine.config.resume_config`). The options that set a setting are generated from the settings'
own declarations (:func:`crowdkernels.engine.config.cli_options`); --print-config and --set are this command's."""
from __future__ import annotations

import argparse
import json

from ._args import EXIT_OK, CliError, add_options, check_device, report_skipped, warn
from .._io import output_dir
from .._options import Option
from ..engine.config import cli_options, require_root, run_config, setting_arg
from ..engine.recipes import RECIPE_NAMES, SUMMARIES
from ..engine.trainer import train

NAME = "train"
HELP = "train a counting model (HMoDE, L2SM, SPN, CSRNet), with a paper's recipe or your settings"

#: the options that set no setting, placed among the settings' options by their order
_OWN = (
    Option("--print-config", 20, action="store_true", help="print the resolved configuration as JSON and exit"),
    Option("--set", 250, action="append", metavar="KEY=JSON",
           help="override any setting, e.g. --set criterion_kwargs.reduction='\"sum\"' (repeatable)"),
)


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Trains a model. --recipe NAME sets every training choice of a paper (or of the authors' released "
        "code) at once: " + "; ".join(f"{n}: {SUMMARIES[n]}" for n in RECIPE_NAMES) + ". Explicit options "
        "override single values; --print-config shows the result as JSON. Without a recipe, --model's defaults "
        "are used (ours, for quick runs). Writes OUT/last.pt every epoch (atomically), OUT/best.pt (lowest "
        "validation MAE), OUT/log.jsonl. Ctrl-C saves and exits; --resume continues exactly; --time-limit and "
        "--max-steps stop a run within one step, saved and validated. Runs under "
        "torchrun for DDP (--batch-size per process)."
    )
    overrides = add_options(p, cli_options() + list(_OWN))
    return lambda args: run(args, overrides)


def _settings(args, overrides: dict) -> dict:
    """The settings the command line gave explicitly (argparse.SUPPRESS leaves the others out of args), then
    those of --set."""
    out = {o.key: getattr(args, dest) if o.convert is None else o.convert(getattr(args, dest))
           for dest, o in overrides.items() if hasattr(args, dest)}
    return {**out, **dict(setting_arg(item) for item in args.set or [])}


def run(args, overrides: dict) -> int:
    if args.out is not None:
        output_dir(args.out, "--out")  # an existing file: one line and exit 2, before anything starts
    config = run_config(recipe=args.recipe, dataset=args.dataset, root=args.root, out=args.out, resume=args.resume,
                        overrides=_settings(args, overrides))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return EXIT_OK
    if args.out is None:
        raise CliError("--out is required (the run folder)")
    require_root(config.dataset, config.root)
    check_device(config.device)
    summary = train(config, warn=warn)
    if summary["main"]:
        best = summary["best"]
        where = (f"best val MAE {best['mae']:.3f} at epoch {best['epoch']} ({args.out / 'best.pt'})"
                 if best.get("mae") is not None else "no validation yet")
        print(f"train: {summary['status']} after {summary['epoch']} epoch(s); {where}; "
              f"{len(summary['skipped'])} file(s) skipped")
        report_skipped(summary["skipped"])
    return 130 if summary["status"] == "interrupted" else EXIT_OK
