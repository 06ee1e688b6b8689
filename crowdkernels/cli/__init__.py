"""The `crowdkernels` command line: one module per command (:data:`COMMANDS`), each with ``NAME``, ``HELP`` and
``add_arguments(parser)``, which adds the command's arguments and returns its handler ``(args) -> exit code``.
The commands parse arguments and call the library, where the jobs live (:mod:`crowdkernels.engine.config`,
:class:`crowdkernels.engine.Trainer`, :class:`crowdkernels.Counter`, :mod:`crowdkernels.viz`, ...).

``main(argv)`` runs in-process and returns the exit code (0 success, 1 some files failed, 2 bad usage, a wrong
dataset layout or an unusable output path). Results go to stdout; progress, warnings and errors to stderr
(``--json`` output is the only thing on stdout).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from . import count, demo, density, eval as eval_, export, info, train
from ._args import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_USAGE, CliError
from .. import __version__
from .._io import OutputPathError
from ..data import AnnotationError, ImageError, LayoutError
from ..data.density_job import DensityJobError
from ..engine.checkpoint import CheckpointError
from ..engine.config import TrainError

__all__ = ["COMMANDS", "build_parser", "main"]

#: the commands, in --help order
COMMANDS = (info, density, train, eval_, count, export, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdkernels", description="Fast density maps and crowd-counting tools (L2SM, HMoDE + REL)."
    )
    parser.add_argument("--version", action="version", version=f"crowdkernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        p.set_defaults(_handler=command.add_arguments(p))
    return parser


def _show_warning(command_name: str):
    """Python warnings raised by crowdkernels during a command, as one line each on stderr (not the
    file:line: Category: form); warnings of other packages keep their usual form."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package + os.sep) or filename.startswith("<"):
            print(f"crowdkernels {command_name}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (argparse's usage errors included, as 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2) end here, without leaving the process
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning(args.command)
        try:
            return args._handler(args)
        except (CliError, LayoutError, CheckpointError, TrainError, OutputPathError, DensityJobError) as exc:
            print(f"crowdkernels {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (AnnotationError, ImageError) as exc:  # --strict: the first bad file stops the command
            print(f"crowdkernels {args.command}: error: {exc} (--strict)", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print(f"crowdkernels {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `crowdkernels count ... | head`: the reader has gone, which is no error of ours
            _silence_stdout()
            return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in a test)
        pass
