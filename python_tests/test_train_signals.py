"""A SIGTERM to the whole process group (what `timeout`, Slurm and Kubernetes send) stops a training run with
DataLoader workers as a SIGTERM to the main process does: it saves and exits 130, and --resume goes on
(issue 21, item 6). The runs are subprocesses in their own sessions, the tiny model of test_engine standing
in for the architectures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CHILD_CWD, REPO, child_env
from crowdkernels.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")

#: `crowdkernels train` with the tiny model registered as "csrnet" (as the in-process CLI tests do). HOOK:
#: "term-at-worker-start": once epoch 1 is logged, every worker SIGTERMs its process group just after PyTorch
#: installed its worker signal handlers (the moment before the worker_init_fn runs); "raise-in-a-worker": from
#: epoch 2 on, a worker fails on image 5, which the main process raises (uncaught) from the loader.
_TRAIN = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO / "python_tests")!r})
from crowdkernels import cli
from crowdkernels.models import registry
from test_engine import TinyNet
hook, out = os.environ.get("HOOK"), sys.argv[sys.argv.index("--out") + 1]
if hook == "term-at-worker-start":
    from torch.utils.data._utils import signal_handling
    torch_handlers = signal_handling._set_worker_signal_handlers

    def set_handlers():
        torch_handlers()
        log = os.path.join(out, "log.jsonl")
        if os.path.isfile(log) and open(log).read().strip():
            os.killpg(os.getpgrp(), signal.SIGTERM)

    signal_handling._set_worker_signal_handlers = set_handlers
if hook == "raise-in-a-worker":
    from crowdkernels.data import datasets
    synthetic_item = datasets.SyntheticCrowds.__getitem__

    def failing_item(self, index):
        if index == 5 and os.path.isfile(os.path.join(out, "log.jsonl")):
            raise RuntimeError("a data error")
        return synthetic_item(self, index)

    datasets.SyntheticCrowds.__getitem__ = failing_item
registry.MODEL_BUILDERS["csrnet"] = lambda **kw: TinyNet(8)
sys.exit(cli.main(["train", "--model", "csrnet", "--lr", "3e-3", "--batch-size", "2", "--crop", "16",
                   "--synthetic", "48", "2", "40", *sys.argv[1:]]))
"""


def _train(*args, hook=None):
    return subprocess.Popen([sys.executable, "-c", _TRAIN, *args], cwd=CHILD_CWD,
                            env=child_env(OMP_NUM_THREADS="1", HOOK=hook or ""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, timeout=120):
    """(stdout, stderr) of ``proc``; its whole group is killed when it has not ended within ``timeout`` s."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s:\n{err[-3000:]}")


def _logged_epochs(run) -> int:
    log = run / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.mark.parametrize("when", ["mid-epoch", "while the workers start"])
def test_sigterm_to_the_process_group_saves_and_resume_goes_on(tmp_path, when):
    run = tmp_path / "run"
    args = ("--out", str(run), "--workers", "2", "--epochs", "1000")
    if when == "mid-epoch":
        proc = _train(*args)
        deadline = time.monotonic() + 120
        while _logged_epochs(run) < 1:  # the loop runs, with its workers, from then on
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the run did not log an epoch: {proc.communicate()}")
            time.sleep(0.05)
        time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its DataLoader workers, as `timeout` does
    else:
        proc = _train(*args, hook="term-at-worker-start")
    out, err = _finish(proc)
    assert "killed by signal" not in err and "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "train: interrupted after" in out
    ckpt = load_checkpoint(run / "last.pt")
    done = ckpt["epoch"] + (1 if ckpt["step"] else 0)
    assert 1 <= done < 1000

    resumed = _train("--out", str(run), "--workers", "2", "--epochs", str(done + 1), "--resume")
    out, err = _finish(resumed, 300)
    assert resumed.returncode == 0, err
    assert f"train: finished after {done + 1} epoch(s)" in out
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, done + 2))


def test_an_uncaught_error_with_workers_running_ends_the_process(tmp_path):
    """The workers ignore SIGTERM, which is how multiprocessing ends them at exit; an error raised from the
    loader keeps it alive in the traceback, without shutting its workers down: the run must end all the same."""
    proc = _train("--out", str(tmp_path / "run"), "--workers", "2", "--epochs", "5", hook="raise-in-a-worker")
    out, err = _finish(proc, 60)
    assert proc.returncode == 1 and "RuntimeError: a data error" in err
