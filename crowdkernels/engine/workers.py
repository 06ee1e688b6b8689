"""DataLoader workers that outlive a SIGINT or SIGTERM sent to the whole process group.

``timeout``, Slurm, Kubernetes and Ctrl-C signal every process of a job, the DataLoader workers included.
A worker that dies of it makes the main process raise "DataLoader worker ... killed by signal" wherever it
is, instead of stopping between two steps and saving (what the trainer's handler does with the same
signal). So the training loaders' workers ignore both signals, and the main process alone decides when to
stop; the workers end with the loader, as always.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import weakref

import torch

__all__ = ["STOP_SIGNALS", "ignore_stop_signals", "StopSafeLoader"]

#: the signals the trainer turns into "save and stop" (see :class:`crowdkernels.engine.trainer.Trainer`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_workers: weakref.WeakSet = weakref.WeakSet()
_hooked = False


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: the worker ignores SIGINT and SIGTERM from now on, then unblocks them (they were
    blocked when it started, see :class:`StopSafeLoader`; one sent meanwhile is discarded, not delivered)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _init_worker(user_init, worker_id: int) -> None:
    ignore_stop_signals(worker_id)
    if user_init is not None:
        user_init(worker_id)


def _kill_workers() -> None:
    # at exit after an uncaught exception the loader iterator is kept alive by the traceback and never shuts
    # its workers down; multiprocessing's own exit hook would then SIGTERM them (ignored) and wait forever
    for proc in list(_workers):
        if proc.is_alive():
            proc.kill()


class StopSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers ignore SIGINT and SIGTERM (:func:`ignore_stop_signals` is its
    ``worker_init_fn``; pass ``worker_init_fn`` to run one of your own after it).

    The workers start with both signals blocked: between their start and the worker_init_fn, PyTorch's
    worker handler would die of a SIGTERM that does not come from the main process. A signal that reaches
    the main process meanwhile is handled when the workers have started.
    """

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(_init_worker, worker_init_fn), **kwargs)

    def __iter__(self):
        global _hooked
        if not self.num_workers:
            return super().__iter__()
        before = set(multiprocessing.active_children())
        blocked = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if blocked else None
        try:
            iterator = super().__iter__()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _workers.update(set(multiprocessing.active_children()) - before)
        if not _hooked:  # registered after multiprocessing's exit hook, so it runs before it
            atexit.register(_kill_workers)
            _hooked = True
        return iterator
