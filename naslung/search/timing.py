"""Timing modules on a device: warm, interleaved, median latencies, and how long the process
waited for a CPU meanwhile (`CpuWait`). What `naslung.search.latency` measures its table and
whole models with, and the benchmarks their CPU rounds."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def time_once_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One call's latency in ms. On a GPU the call sits between two CUDA events and is synchronised,
    so a timing is the latency of one call, launch overhead included, never of a queue of them."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_latencies_ms(fns: list[Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
                on_round: Callable[[], None] | None = None) -> list[float]:
    """Median latency in ms of each call, after ``warmup`` untimed rounds, over ``repeats`` rounds.

    Calls are interleaved: each round times every call once, in a fresh random order, so a
    machine that gets busier for a while slows all of them alike instead of a few, and no call
    finds the caches warmed by itself (inside a model, each block follows another).
    """
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if on_round:
                on_round()
        for _ in range(repeats):
            shuffle.shuffle(order)
            for i in order:
                times[i].append(time_once_ms(fns[i], device))
            if on_round:
                on_round()
    return [float(np.median(t)) for t in times]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def runqueue_wait_s() -> float | None:
    """Seconds the threads of this process have spent ready to run but waiting for a CPU (Linux)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    if not tasks.is_dir():
        return None
    total = 0
    for stat in tasks.glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])  # on-CPU ns, runqueue-wait ns, timeslices
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9


class CpuWait:
    """Measures how long this process's threads waited for a CPU while timing.

    Another process on the cores inflates timings unevenly (one torch thread waiting for a core
    stalls the others: on a 2-core machine with one core busy elsewhere, a 2-thread model that
    takes 20 ms took 800 ms), so every table and correlation records the fraction (summed over
    threads, per second of wall time) and warns above 10 %.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.wall = 0.0
        self.waiting: float | None = None

    def __enter__(self) -> CpuWait:
        self._wait0, self._t0 = runqueue_wait_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        end = runqueue_wait_s()
        if self._wait0 is not None and end is not None:
            self.waiting = max(0.0, end - self._wait0)
        fraction = self.fraction
        if exc[0] is None and fraction is not None and fraction > 0.1:
            from naslung.console import console

            console.print(f"[yellow]warning[/yellow]: while timing {self.what}, this process's threads "
                          f"waited for a CPU {fraction:.0%} of the time: other processes compete for the "
                          "cores, so these timings are inflated; measure again on a quiet machine")

    @property
    def fraction(self) -> float | None:
        """Seconds waiting (summed over threads) per second of wall time; None where unknown."""
        return None if self.waiting is None or self.wall <= 0 else self.waiting / self.wall


def runnable(module: nn.Module, shape: tuple[int, ...], device: torch.device) -> Callable[[], Any]:
    """``module`` in eval mode on ``device`` with a fixed random input, as a no-argument call."""
    module = module.eval().to(device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    return lambda: module(x)


def check_timing_settings(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
