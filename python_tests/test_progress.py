"""Progress for long jobs (crowdkernels._progress): a tqdm bar on a terminal, lines in a log, silence when
asked; an in-between line at most every `interval` seconds; "stopped" when the job raised."""
from __future__ import annotations

import io
import re

import pytest

from crowdkernels._progress import Progress, is_terminal


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_lines_in_a_log():
    term, log = _Terminal(), io.StringIO()
    assert is_terminal(term) and not is_terminal(log) and not is_terminal(object())
    for stream in (term, log):
        with Progress(200, "job", stream=stream) as p:
            for _ in range(200):
                p.update()
            p.write("a message")
    assert "\r" in term.getvalue() and "200/200" in term.getvalue()
    assert re.fullmatch(r"a message\njob: 200/200 img in [0-9.]+ s \(done\)\n", log.getvalue())


def test_interval_lines_silence_and_a_stopped_job():
    log = io.StringIO()
    with Progress(3, "job", stream=log, interval=0.0) as p:
        for _ in range(3):
            p.update()
    assert [line.split(" in ")[0] for line in log.getvalue().splitlines()] == ["job: 1/3 img", "job: 2/3 img",
                                                                               "job: 3/3 img", "job: 3/3 img"]
    assert log.getvalue().splitlines()[-1].endswith("(done)")
    quiet = io.StringIO()
    with Progress(3, "job", stream=quiet, lines=False) as p:
        p.update(3)
    assert quiet.getvalue() == ""
    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress(5, "job", stream=log) as p:
            p.update(2)
            raise KeyboardInterrupt
    assert log.getvalue().startswith("job: 2/5 img in") and log.getvalue().endswith("(stopped)\n")


def test_the_end_line_says_how_many_were_skipped():
    """Issue 21, item 13: the line said "count: 9/9 img (done)" when 3 of the 9 were skipped."""
    log = io.StringIO()
    with Progress(9, "count", stream=log, done_word="counted") as p:
        for i in range(9):
            p.update(1, skipped=int(i % 3 == 0))
    assert re.fullmatch(r"count: 6/9 img counted, 3 skipped, in [0-9.]+ s \(done\)\n", log.getvalue())
    term = _Terminal()
    with Progress(2, "eval", stream=term) as p:
        p.update(1, skipped=1)
        p.update(1)
    assert "1 skipped" in term.getvalue()
