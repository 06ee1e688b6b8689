"""The options of the ``crowdkernels`` commands, declared in the library beside what they set
(:class:`Option`), and their argument types (text -> value, raising ``argparse.ArgumentTypeError``). The
command line generates its arguments from these declarations (``crowdkernels.cli._args.add_options``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Option", "duration", "float_list", "float_where", "fraction", "int_at_least", "max_size_arg",
           "nonnegative_float", "nonnegative_int", "positive_float", "positive_int", "sigma_arg"]


@dataclass(frozen=True)
class Option:
    """A command-line option, declared beside the setting or argument it gives. ``flag`` (``--name``, or a
    positional's name), ``help``, ``type``, ``choices`` (or a function giving them), ``metavar``, ``action``,
    ``nargs``, ``required``, ``default``: its argparse arguments; ``order``: its place in ``--help`` (equal orders
    keep the declarations' order). For a setting of ``crowdkernels train``: ``key``, the dotted setting it sets
    (default: its field; "target.sigma" sets a key of the group ``target``); ``convert``, the parsed value -> the
    setting's; an ``override`` option enters the settings only when it is given (its argparse default is
    SUPPRESS), on top of the recipe or of the resumed run. The others are read by the command, ``default`` when
    not given."""

    flag: str
    order: int = 0
    help: str | None = None
    type: Callable | None = None
    choices: Any = None
    metavar: Any = None
    action: Any = None
    nargs: int | None = None
    key: str | None = None
    convert: Callable | None = None
    override: bool = False
    default: Any = None
    required: bool = False

    def argparse_kwargs(self) -> dict:
        """The keyword arguments of ``parser.add_argument(self.flag, ...)``."""
        kw = {"type": self.type, "choices": self.choices() if callable(self.choices) else self.choices,
              "metavar": self.metavar, "action": self.action, "nargs": self.nargs, "help": self.help,
              "required": self.required or None}
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.override:
            kw["default"] = argparse.SUPPRESS  # only the options given become overrides
        elif self.default is not None:
            kw["default"] = self.default
        return kw


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= `minimum`, with an error that says so (`what`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def float_where(ok, what: str):
    """An argparse type: a finite float for which ``ok(value)`` holds, with an error that says so (`what`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "an integer >= 0")
positive_float = float_where(lambda v: v > 0, "a positive number")
nonnegative_float = float_where(lambda v: v >= 0, "a number >= 0")
fraction = float_where(lambda v: 0 < v < 1, "a fraction in (0, 1)")


def sigma_arg(text: str):
    """'adaptive' or a positive sigma in pixels."""
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a positive number, got {text!r}")
    return value


def max_size_arg(text: str):
    """'1920x1080' -> [1920, 1080]; '2048' -> 2048."""
    try:
        if "x" in text.lower():
            a, b = (int(t) for t in text.lower().split("x"))
            if a > 0 and b > 0:
                return [a, b]
        elif int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a side in pixels (2048) or a box (1920x1080), got {text!r}")


def float_list(text: str) -> list:
    """'1,1,2' -> [1.0, 1.0, 2.0]."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def duration(text: str) -> float:
    """Seconds from "900", "90s", "15m" or "1.5h"."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 900, 90s, 15m or 1.5h, got {text!r}")
    return value


