"""Where search trials run: in the driver's process, in a local process pool, or on Ray.

Every executor has the same small interface, so the driver does not care which one it has:
``slots`` (how many trials it runs at once), ``submit(trial)`` returning a
`concurrent.futures.Future` of a `TrialResult`, and ``close()``. Executors only run trials; the
driver alone draws candidates, retries failures and writes the journal.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Protocol

import torch
from rich.progress import Progress

from naslung.data.store import CropStore
from naslung.processes import process_pool, stop_pool
from naslung.search.trial import Trial, TrialData, TrialResult, run_trial

EXECUTORS = ("inprocess", "process", "ray")


class ExecutorError(RuntimeError):
    """An executor that cannot run trials as asked (bad settings, too few resources)."""


class TrialExecutor(Protocol):
    slots: int

    def submit(self, trial: Trial) -> Future[TrialResult]: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Trains each trial in the driver's own process, one at a time, when it is submitted."""

    slots = 1

    def __init__(self, data: TrialData, device: torch.device, progress: Progress | None = None) -> None:
        self.data, self.device, self.progress = data, device, progress
        self.description = f"in-process on {device}"

    def submit(self, trial: Trial) -> Future[TrialResult]:
        future: Future[TrialResult] = Future()
        try:
            future.set_result(run_trial(trial, self.data, self.device, self.progress))
        except Exception as err:  # the driver decides what a failure means
            future.set_exception(err)
        return future

    def close(self) -> None:
        pass


# --- local process pool ---------------------------------------------------------------------

_worker: dict = {}
"""This worker process's store and device, set once by `_start_worker`."""


def _start_worker(store_root: str, devices: multiprocessing.Queue, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker["data"] = TrialData.of(CropStore.open(store_root))
    device = _worker["device"] = torch.device(devices.get())
    if device.type == "cuda":  # this worker's GPU is its current device for everything it runs
        torch.cuda.set_device(device)


def _run_in_worker(trial: Trial) -> TrialResult:
    return run_trial(trial, _worker["data"], _worker["device"])


def worker_devices(device: torch.device, workers: int) -> list[str]:
    """One device per worker: the GPUs round-robin on CUDA (all of them for ``cuda``, or the one
    named), else the CPU."""
    if device.type != "cuda":
        return ["cpu"] * workers
    gpus = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(workers)]


class ProcessPoolTrialExecutor:
    """``workers`` spawned processes, each with its own device and its own copy of the store.

    CPU workers share the cores evenly (torch threads = cores // workers). A worker that dies
    (out of memory, a crash in native code) breaks the pool: its trials fail, which the driver
    retries, and the next submit starts a fresh pool. Workers follow `naslung.processes`
    (quiet on Ctrl-C, dead with the driver), and `close` kills them rather than waiting for
    trials nobody will record.
    """

    def __init__(self, store: CropStore, device: torch.device, workers: int) -> None:
        if workers < 1:
            raise ExecutorError(f"--workers must be >= 1, got {workers}")
        self.slots = workers
        self.store_root = str(store.root)
        self.devices = worker_devices(device, workers)
        self.threads = max(1, (os.cpu_count() or 1) // workers) if device.type == "cpu" else 1
        self.description = f"{workers} worker process(es) on {', '.join(sorted(set(self.devices)))}"
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        devices = multiprocessing.get_context("spawn").Queue()  # CUDA cannot be forked
        for device in self.devices:
            devices.put(device)
        return process_pool(self.slots, _start_worker, (self.store_root, devices, self.threads))

    def submit(self, trial: Trial) -> Future[TrialResult]:
        try:
            return self.pool.submit(_run_in_worker, trial)
        except BrokenProcessPool:
            stop_pool(self.pool)
            self.pool = self._new_pool()
            return self.pool.submit(_run_in_worker, trial)

    def close(self) -> None:
        stop_pool(self.pool)


# --- Ray ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayResources:
    """What one trial asks of the cluster; fractional GPUs let small candidates share one."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def slots(self, cluster: dict[str, float]) -> int:
        """Trials the cluster can run at once, or a clear error if it cannot run even one."""
        cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ExecutorError("cpus per trial must be > 0 and --gpus-per-trial >= 0, got "
                                f"{self.cpus_per_trial:g} and {self.gpus_per_trial:g}")
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ExecutorError(f"--gpus-per-trial {self.gpus_per_trial:g}: above 1 it must be whole")
        if cpus < self.cpus_per_trial:
            raise ExecutorError(f"the Ray cluster has {cpus:g} CPU(s); a trial needs {self.cpus_per_trial:g}")
        if self.gpus_per_trial > gpus:
            raise ExecutorError(f"--gpus-per-trial {self.gpus_per_trial:g}, but the Ray cluster has "
                                f"{gpus:g} GPU(s); use --gpus-per-trial 0 to train on CPUs")
        fit = math.floor(cpus / self.cpus_per_trial)
        if self.gpus_per_trial > 0:
            fit = min(fit, math.floor(gpus / self.gpus_per_trial + 1e-9))
        return max(1, fit)


def _run_on_ray(trial: Trial, data: TrialData, cpus: float) -> TrialResult:
    import ray

    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
    return run_trial(trial, data, device)


class RayExecutor:
    """Trials as Ray tasks on a local Ray runtime or the cluster at ``address``.

    The store goes into Ray's object store once; each task asks for ``cpus_per_trial`` CPUs and
    ``gpus_per_trial`` GPUs. The cluster's resources are checked before anything is submitted.
    Ray's own retries are off: the driver retries a failed trial once.
    """

    def __init__(self, data: TrialData, resources: RayResources, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as err:
            raise ExecutorError("--executor ray needs Ray: pip install 'naslung[distributed]'") from err
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ExecutorError(f"cannot start or reach Ray at {address or 'a new local runtime'}: "
                                    f"{err}") from err
        try:
            self.slots = resources.slots(ray.cluster_resources())
        except ExecutorError:
            self.close()
            raise
        self.data = ray.put(data)
        self.remote = ray.remote(_run_on_ray).options(
            num_cpus=resources.cpus_per_trial, num_gpus=resources.gpus_per_trial, max_retries=0)
        self.cpus = resources.cpus_per_trial
        self.description = (f"Ray ({address or 'local'}): {self.slots} trial(s) at once, "
                            f"{resources.cpus_per_trial:g} CPU + {resources.gpus_per_trial:g} GPU each")

    def submit(self, trial: Trial) -> Future[TrialResult]:
        return self.remote.remote(trial, self.data, self.cpus).future()

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
