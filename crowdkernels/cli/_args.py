"""What the commands share: exit codes, the one-line error, messages on stderr, the argument types of eval and
count (the settings' own types are :mod:`crowdkernels.engine.config`'s), and the checkpoint they load."""
from __future__ import annotations

import argparse
import sys

from .. import inference
from .._io import parse_device
from ..engine.checkpoint import CheckpointError
from ..engine.config import int_at_least, max_size_arg

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away

#: what `--max-size none` and `--tile none` give: no cap, no tiles (overriding the checkpoint's own setting)
NONE = "none"


class CliError(Exception):
    """An error reported as one line on stderr with exit code 2 (bad usage, wrong layout, ...)."""


def warn(msg: str) -> None:
    print(f"crowdkernels: {msg}", file=sys.stderr)


def report_skipped(skipped: dict) -> None:
    """Names every skipped file once: the readers' reasons already start with the file's path."""
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for name, reason in skipped.items():
            print(f"  {reason}" if str(name) in str(reason) else f"  {name}: {reason}", file=sys.stderr)


def max_size_or_none(text: str):
    """eval/count --max-size: a side, a box, or 'none' (no cap, whatever the checkpoint's training used)."""
    if text.strip().lower() == NONE:
        return NONE
    try:
        return max_size_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels (2048), a box (1920x1080) or 'none', got {text!r}") from None


def tile_arg(text: str):
    """eval/count --tile: a side of at least min_tile() pixels, or 'none' (never tile)."""
    if text.strip().lower() == NONE:
        return NONE
    return int_at_least(inference.min_tile(), f"a tile side of at least {inference.min_tile()} pixels (2 x the 64-pixel "
                                              "overlap + 16) or 'none'")(text)


def add_input_settings(p: argparse.ArgumentParser) -> None:
    """eval's and count's --max-size and --tile: the checkpoint's own by default."""
    def what(text):
        return f"{text}; default: the checkpoint's own (its training's setting), 'none' turns it off"

    p.add_argument("--max-size", type=max_size_or_none, metavar="SIZE",
                   help=what("shrink larger images first: a side (2048) or a box (1920x1080)"))
    p.add_argument("--tile", type=tile_arg, metavar="PIXELS",
                   help=what(f"run images beyond this side in overlapping tiles (at least {inference.min_tile()}: 2 x "
                             "the 64-pixel overlap + 16)"))


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
        return inference.CHECKPOINT if value is None else (None if value == NONE else value)

    try:
        return inference.load(args.checkpoint, args.device, model=args.model, tile=setting(args.tile), amp=args.amp,
                              max_size=setting(args.max_size))
    except CheckpointError:  # reported by main
        raise
    except ImportError as exc:  # an ONNX file without onnxruntime: what to install
        raise CliError(str(exc)) from None
    except ValueError as exc:  # e.g. a tile too small for the model
        raise CliError(str(exc)) from None
