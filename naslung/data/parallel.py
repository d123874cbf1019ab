"""Running one function over many scans in worker processes, with a progress bar.

Whatever goes wrong with one scan is caught in the worker and returned as one line (and the
traceback's last lines), so one bad scan never stops a build. Two things do stop it, because no
later scan could do better: an output that cannot be written (`OutputError`: a full disk, a
read-only folder) and a worker that died. Workers follow `naslung.processes`: they ignore
Ctrl-C, die with this process, and are killed, not waited for, when the build stops early.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.progress import MofNCompleteColumn, Progress

from naslung.console import console
from naslung.fileio import OutputError
from naslung.processes import WorkerError, process_pool, stop_pool

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """A task and either its result or why it failed."""

    task: Any
    result: T | None = None
    error: str | None = None
    """One line: the reason the task failed."""
    detail: str | None = None
    """The last lines of the traceback, for the record."""


def reason(err: BaseException) -> str:
    """An exception as one line: naslung's own errors are written for the user as they are,
    others are prefixed with their type."""
    text = " ".join(str(err).split())
    if type(err).__module__.startswith("naslung"):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _guarded(function: Callable[[Any], T], task: Any) -> Outcome[T]:
    try:
        return Outcome(task, function(task))
    except OutputError:
        raise  # not this task's fault: every later one would fail the same way
    except Exception as err:  # reported to the caller, never fatal to the other tasks
        return Outcome(task, error=reason(err), detail=traceback.format_exc(limit=-3).strip())


def run_tasks(function: Callable[[Any], T], tasks: Sequence[Any], *, workers: int | None,
              description: str, progress: bool = True) -> Iterator[Outcome[T]]:
    """``function(task)`` for every task, as they finish; in this process for one worker.

    ``function`` must be a module-level function (workers import it by name).
    """
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console,
                  disable=not progress) as bar:
        job = bar.add_task(description, total=len(tasks))
        if workers == 1:
            for task in tasks:
                yield _guarded(function, task)
                bar.advance(job)
            return
        pool = process_pool(workers)
        try:
            for future in as_completed([pool.submit(_guarded, function, t) for t in tasks]):
                yield future.result()
                bar.advance(job)
        except BrokenProcessPool as err:
            stop_pool(pool)
            raise WorkerError(f"{description}: a worker process died (out of memory, or a crash in "
                              "native code); run again with fewer --workers") from err
        except BaseException:
            stop_pool(pool)
            raise
        pool.shutdown()
