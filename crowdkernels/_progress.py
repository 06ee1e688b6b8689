"""Progress for long jobs (the density job, eval, ``Counter.count_many``): a tqdm bar on a terminal, plain
lines in a log.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe (a CI log, ``nohup``,
``2> log``), every redraw becomes a frame in the file, hundreds per job. So the bar is shown only when
its stream is a terminal. Otherwise :class:`Progress` writes one line when the job ends ("density: 300
images in 41.2 s") and, for long jobs, at most one line a minute in between, so a log still shows that
the job is alive.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


class Progress:
    """Counts the items of a job. ``bar``: True (always a tqdm bar), False (never), None (default: a bar
    when ``stream`` is a terminal). Without a bar, ``lines`` (default True) prints the end line and, every
    ``interval`` seconds (None: never), an in-between line; ``lines=False`` is silent. Use as a context
    manager; ``update(n, skipped=k)`` after each item (``k`` of the ``n`` failed and were left out),
    ``postfix(text)`` for the bar's tail, ``write(msg)`` for a message that does not break the bar.

    Lines read "count: 9/9 img in 1.2 s (done)", or, when items were left out, "count: 6/9 img counted,
    3 skipped, in 1.2 s (done)" (``done_word``, ``skip_word``)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", stream=None, bar: bool | None = None,
                 lines: bool = True, interval: float | None = 60.0, done_word: str = "done",
                 skip_word: str = "skipped"):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit = total, desc, unit
        self.done_word, self.skip_word = done_word, skip_word
        self.done = 0
        self.skipped = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        if bar or (bar is None and is_terminal(self.stream)):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        self._lines = lines and self._bar is None
        self._interval = interval

    def update(self, n: int = 1, *, skipped: int = 0) -> None:
        self.done += n
        self.skipped += skipped
        if self._bar is not None:
            if skipped:
                self._bar.set_postfix_str(f"{self.skipped} {self.skip_word}", refresh=False)
            self._bar.update(n)
        elif self._lines and self._interval is not None and time.monotonic() - self._last >= self._interval:
            self._last = time.monotonic()
            self._line("so far")

    def postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, msg: str) -> None:
        """A message on the stream, above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def _line(self, when: str) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        if self.skipped:
            what = f"{self.done - self.skipped}{of} {self.unit} {self.done_word}, {self.skipped} {self.skip_word},"
        else:
            what = f"{self.done}{of} {self.unit}"
        print(f"{self.desc}: {what} in {time.monotonic() - self.t0:.1f} s ({when})", file=self.stream, flush=True)

    def close(self, status: str = "done") -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line(status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close("done" if exc_type is None else "stopped")
        return False
