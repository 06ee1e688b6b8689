"""Guards for tests of extreme inputs: a crash, a hang or a huge allocation must fail a test, not kill or
stall the run, nor swap the machine.

- `run_isolated(code)`: runs Python code in a fresh interpreter (a segfault there is a failed test), with a
  wall-clock timeout and an address-space limit a little above what the imports took.
- `bounded(mem_bytes=..., seconds=...)`: the same limits in-process, for code that no longer crashes: an
  allocation past the budget raises (MemoryError / RuntimeError: a failure, since the ops may only raise
  ValueError or TypeError), and a call that runs past the deadline aborts the process with a traceback
  (faulthandler), which pytest reports as a crash rather than hanging for ever.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import resource
import subprocess
import sys
import textwrap



def _vm_size() -> int:
    """This process's current virtual size in bytes (VmSize), which RLIMIT_AS limits."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded(mem_bytes: int = 1 << 30, seconds: float = 60.0):
    """Caps this process's address space at its current size + `mem_bytes` and aborts it (with every
    thread's traceback) if the block runs longer than `seconds`. Both are restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + mem_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_isolated(code: str, timeout: float = 120.0, mem_bytes: int = 1 << 30) -> str:
    """Runs `code` (after `import torch, crowdkernels as ck`) in a fresh interpreter whose address space is
    capped at its size after the imports + `mem_bytes`. Returns its stdout; raises AssertionError naming
    the crash (signal), the timeout or the exception the code died of."""
    prelude = textwrap.dedent(
        f"""
        import math, resource, sys
        import numpy as np
        import torch
        import crowdkernels as ck
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from guards import _vm_size
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + {int(mem_bytes)}, resource.getrlimit(resource.RLIMIT_AS)[1]))
        """
    )
    from conftest import CHILD_CWD, child_env  # the crowdkernels this process imported, not the checkout's sources

    try:
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, env=child_env(), cwd=CHILD_CWD)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the code ran past {timeout} s (a hang?):\n{code}") from None
    if proc.returncode < 0:
        raise AssertionError(f"the interpreter crashed with signal {-proc.returncode}:\n{code}\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"the code failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout
