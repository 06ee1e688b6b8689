"""``crowdkernels info``: what this installation can run (:func:`crowdkernels.backends`)."""
from __future__ import annotations

import argparse
import json

from ._args import EXIT_OK
from .._ext import backends_text
import crowdkernels

NAME = "info"
HELP = "what this installation can run: compiled backends, CUDA archs, Triton, threads"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return run


def run(args) -> int:
    info = {"crowdkernels": crowdkernels.__version__, **crowdkernels.backends()}
    print(json.dumps(info, indent=1) if args.json else backends_text(info))
    return EXIT_OK
