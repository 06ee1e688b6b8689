"""What the commands share: exit codes, the one-line error, messages on stderr, the arguments generated from the
library's option declarations (:class:`crowdkernels._options.Option`), and the checkpoint eval and count load."""
from __future__ import annotations

import argparse
import sys

from .. import inference
from .._io import parse_device
from ..engine.checkpoint import CheckpointError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away


class CliError(Exception):
    """An error reported as one line on stderr with exit code 2 (bad usage, wrong layout, ...)."""


def warn(msg: str) -> None:
    print(f"crowdkernels: {msg}", file=sys.stderr)


def add_options(p: argparse.ArgumentParser, options) -> dict:
    """Adds the declared options to a command's parser in ``--help`` order; returns argparse dest -> option for
    those that override a setting (train's)."""
    overrides = {}
    for option in sorted(options, key=lambda o: o.order):
        action = p.add_argument(option.flag, **option.argparse_kwargs())
        if option.override:
            overrides[action.dest] = option
    return overrides


def report_skipped(skipped: dict) -> None:
    """Names every skipped file once: the readers' reasons already start with the file's path."""
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for name, reason in skipped.items():
            print(f"  {reason}" if str(name) in str(reason) else f"  {name}: {reason}", file=sys.stderr)


def check_device(device) -> None:
    """A usable ``--device`` (None: the default), or a CliError naming the option."""
    if device is not None:
        try:
            parse_device(device, "--device")
        except ValueError as exc:
            raise CliError(str(exc)) from None


def load_counter(args) -> inference.Counter:
    """The Counter of ``--checkpoint`` on ``--device`` (``--model`` refuses another model's checkpoint), with the
    checkpoint's own input settings where ``--max-size`` and ``--tile`` are not given ('none': off)."""
    check_device(args.device)

    def setting(value):
        return inference.CHECKPOINT if value is None else (None if value == inference.NONE else value)

    try:
        return inference.load(args.checkpoint, args.device, model=args.model, tile=setting(args.tile), amp=args.amp,
                              max_size=setting(args.max_size))
    except CheckpointError:  # reported by main
        raise
    except ImportError as exc:  # an ONNX file without onnxruntime: what to install
        raise CliError(str(exc)) from None
    except ValueError as exc:  # e.g. a tile too small for the model
        raise CliError(str(exc)) from None
