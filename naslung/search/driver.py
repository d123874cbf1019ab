"""The architecture search: POP proposes a candidate, the trainer trains it, the journal keeps it.

Every candidate is trained on the training folds and scored on a validation fold; the test
fold (``test_fold``) is held out of the search entirely. The journal is the only state: a
resumed search replays it through the same seeded POP and goes on where it stopped, so it
ends with the same front as a search that was never interrupted.

Outputs in the run directory: ``journal.jsonl``, ``pareto.json`` (the front and the search's
own accounting), ``pareto.png`` (accuracy against cost, front highlighted) and
``checkpoints/<arch>/`` for every arch on the final front.
"""

from __future__ import annotations

import math
import shutil
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naslung.arch import Arch
from naslung.console import console
from naslung.data.store import CropStore
from naslung.fileio import write_atomically, write_json
from naslung.models import ConvRes
from naslung.models.fused import KERNEL_CHOICES
from naslung.search.executors import InProcessExecutor, TrialExecutor
from naslung.search.journal import Journal, JournalError
from naslung.search.latency import LatencyTable, latency_table, search_cost
from naslung.search.pop import PartialOrderPruning
from naslung.search.space import SearchSpace
from naslung.search.trial import Trial, TrialData, TrialResult
from naslung.search.view import SearchView
from naslung.train.checkpoint import save_checkpoint
from naslung.train.formats import PRECISIONS
from naslung.train.trainer import TrainConfig
from naslung.versions import versions

OBJECTIVES = ("params", "flops", "latency")
METRICS = ("accuracy", "auc")
FAILURES_BEFORE_GIVING_UP = 5
"""A search whose first this-many candidates all fail (each after a retry) stops: the settings
or the data are at fault, not the candidates."""


@dataclass
class SearchConfig:
    """What decides a search; a resumed search must be given the same."""

    widths: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    min_depth: int = 3
    max_depth: int = 9
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-4
    objective: str = "params"
    metric: str = "auc"
    score_epochs: int = 5
    """A candidate's score: the mean validation metric over its last this-many epochs (fewer
    when it trained fewer), steadier than the single best epoch of a ~120-nodule fold."""
    patience: int = 30
    max_candidates: int | None = None
    time_budget_s: float | None = None
    seed: int = 0
    test_fold: int = 0
    head: str = "asoftmax"
    cbam: str = "nas-lung"
    kernels: str = "auto"
    cuda_graphs: bool = False
    precision: str = "fp32"
    """fp32 unless asked: ``auto`` times formats per process, so two workers could train the
    same arch differently and a search would no longer repeat exactly."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.score_epochs < 1:
            raise ValueError(f"score_epochs must be >= 1, got {self.score_epochs}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 candidate, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose from {', '.join(KERNEL_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        """The settings that must match on resume (the time budget may change)."""
        settings = asdict(self)
        settings.pop("time_budget_s")
        settings["widths"] = list(self.widths)
        return settings


SETTINGS_ADDED_LATER = {"precision": "fp32"}
"""Settings younger than some journals, with the value those searches ran with."""


@dataclass
class SearchResult:
    run_dir: Path
    front: list[dict[str, Any]]
    stop_reason: str
    trained: int
    pruned: int
    remaining: int
    overhead_fraction: float
    records: list[dict[str, Any]] = field(default_factory=list)


def _checkpoint_dir(run_dir: Path, arch: str) -> Path:
    return run_dir / "checkpoints" / Arch.parse(arch).dirname


def _score(history: list[dict[str, Any]], metric: str, last: int) -> float:
    """The mean of the validation ``metric`` over the last ``last`` epochs of ``history``;
    an epoch whose metric is undefined (AUC on one class) counts with its accuracy."""
    def value(epoch: dict[str, Any]) -> float:
        v = epoch.get(f"val_{metric}", math.nan)
        return epoch["val_accuracy"] if v is None or math.isnan(v) else v

    return float(np.mean([value(epoch) for epoch in history[-last:]]))


def _fill(pop: PartialOrderPruning, slots: int) -> None:
    """Draw until ``slots`` candidates are in flight or POP stops."""
    while len(pop.in_flight) < slots and pop.draw() is not None:
        pass


def _check_entry(entry: dict[str, Any], space: SearchSpace, cost: np.ndarray, head: str) -> None:
    """`JournalError` unless a journalled candidate's arch, parameters, FLOPs and cost are what
    this search computes for its index: an edited line would otherwise steer the front."""
    index, where = entry["index"], f"the journal's candidate {entry['arch']!r} (index {entry['index']})"
    if index >= len(space):
        raise JournalError(f"{where}: index beyond this search space of {len(space):,} archs")
    arch = space.arch(index)
    found = {"arch": str(arch), "params": arch.params(head), "flops": arch.flops(head=head)}
    for name, value in found.items():
        if entry[name] != value:
            raise JournalError(f"{where}: {name} is {value!r} for this index, the journal says "
                               f"{entry[name]!r}; the journal was edited or belongs to another search")
    if not math.isclose(entry["cost"], float(cost[index]), rel_tol=1e-6, abs_tol=1e-9):
        raise JournalError(f"{where}: cost {entry['cost']!r} differs from this search's "
                           f"{float(cost[index])!r}")


def _replay(pop: PartialOrderPruning, entries: list[dict[str, Any]], slots: int, head: str) -> int:
    """Put POP back in the state the journal left it in; returns the slots in use at its end.

    The driver draws until ``slots`` candidates are in flight and records them in draw order,
    so replaying the same draws and records, with the slot changes the journal notes, leads
    POP through the same states. Every candidate is checked by `_check_entry` first.
    """
    for entry in entries:
        if entry.get("type") == "slots":
            slots = int(entry["slots"])
            continue
        _check_entry(entry, pop.space, pop.cost, head)
        _fill(pop, slots)
        if not pop.in_flight or pop.in_flight[0] != entry["index"]:
            raise JournalError(f"the journal's candidate {entry['arch']} is not the one this search "
                               "draws there: it was written by a search with other settings or code")
        if entry["status"] == "ok":
            pop.record(entry["index"], entry["score"])
        else:
            pop.record_failure(entry["index"])
    return slots


def replay_journal(records: list[dict[str, Any]], cfg: SearchConfig, space: SearchSpace,
                   cost: np.ndarray) -> tuple[PartialOrderPruning, int | None]:
    """POP in the state a journal's records (`Journal.read`) leave it in, every candidate
    checked against this search; and the slots in use at the journal's end (None when empty)."""
    pop = PartialOrderPruning(space, cost, cfg.seed, cfg.patience, cfg.max_candidates)
    if not records:
        return pop, None
    entries = [r for r in records if r["type"] in ("candidate", "slots")]
    return pop, _replay(pop, entries, records[0].get("slots", 1), cfg.head)


def _search_cost(space: SearchSpace, cfg: SearchConfig, run_dir: Path, device: torch.device,
                 progress: bool) -> np.ndarray:
    """Every arch's cost for ``cfg.objective``. A latency search keeps the table it ranks by in
    ``latency.json`` of its run directory, so that a resumed search (on any machine) ranks by
    the same numbers."""
    table = None
    if cfg.objective == "latency":
        saved = run_dir / "latency.json"
        if saved.exists():
            table = LatencyTable.load(saved)
        else:
            table = latency_table(space, device, cbam=cfg.cbam, head=cfg.head, progress=progress)
            table.save(saved)
    return search_cost(space, cfg.objective, head=cfg.head, table=table)


def run_search(store: CropStore, cfg: SearchConfig, run_dir: str | Path, device: torch.device,
               resume: bool = False, show_progress: bool = True,
               executor: TrialExecutor | None = None) -> SearchResult:
    """Search ``cfg``'s space on ``store`` and write the run directory (see the module doc).

    Trials run on ``executor`` (default: in this process on ``device``), as many at once as it
    has slots; results are recorded in the order the candidates were drawn, so a search is
    reproducible for a given number of slots whatever order the trials finish in.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    journal = Journal(run_dir / "journal.jsonl")
    header = {"type": "header", "config": cfg.to_dict(), "store_sha256": store.fingerprint,
              "store": str(store.root.resolve()), "store_verified": store.verified, "versions": versions()}
    records = journal.read()
    if records and not resume:
        raise JournalError(f"{journal.path} exists: pass --resume to continue that search, "
                           "or choose another --out")
    if records and ({**SETTINGS_ADDED_LATER, **(records[0].get("config") or {})} != header["config"]
                    or records[0].get("store_sha256") != header["store_sha256"]):
        raise JournalError(f"{journal.path} belongs to a search with other settings or data")
    journal.drop_torn_tail()

    space = SearchSpace(cfg.widths, cfg.min_depth, cfg.max_depth)
    cost = _search_cost(space, cfg, run_dir, device, show_progress)
    pop, journal_slots = replay_journal(records, cfg, space, cost)
    entries = [r for r in records if r.get("type") == "candidate"]
    scores = {r["index"]: r["score"] for r in entries if r["status"] == "ok"}
    if entries:
        console.print(f"resuming: {len(pop.trained) + len(pop.failed)} candidate(s) from {journal.path}, "
                      "not retrained")

    view = SearchView(space, cfg.objective, cfg.metric, show_progress and console.is_terminal)
    executor = executor or InProcessExecutor(TrialData.of(store), device, view.progress)
    view.executor = executor.description
    if journal_slots is None:
        journal.append({**header, "slots": executor.slots})
    elif journal_slots != executor.slots:
        journal.append({"type": "slots", "slots": executor.slots})

    def trial(index: int) -> Trial:
        # The original's search budget: a constant rate (the final training's default is cosine).
        tcfg = TrainConfig(arch=str(space.arch(index)), epochs=cfg.epochs, batch_size=cfg.batch_size,
                           lr=cfg.lr, schedule="constant", head=cfg.head, cbam=cfg.cbam, select=cfg.metric,
                           seed=cfg.seed, kernels=cfg.kernels, cuda_graphs=cfg.cuda_graphs,
                           precision=cfg.precision)
        return Trial(index, tcfg, cfg.test_fold)

    busy = 0.0  # seconds the driver spent handing trials over or waiting for them

    def submit(index: int, attempt: int) -> None:
        nonlocal busy
        handed = time.perf_counter()
        running[index] = (executor.submit(trial(index)), attempt)
        busy += time.perf_counter() - handed

    def fill() -> None:
        if cfg.time_budget_s is None or time.perf_counter() - started <= cfg.time_budget_s:
            _fill(pop, executor.slots)
        for index in pop.in_flight:
            if index not in running:
                submit(index, 0)

    running: dict[int, tuple[Future[TrialResult], int]] = {}
    given_up = None
    try:
        with view:
            fill()
            view.update(pop, scores)
            while pop.in_flight:
                index = pop.in_flight[0]
                future, attempt = running.pop(index)
                waited = time.perf_counter()
                error = future.exception()
                busy += time.perf_counter() - waited
                if error is not None and attempt == 0:  # a failed trial is retried once
                    console.print(f"[yellow]candidate {space.arch(index)} failed ({type(error).__name__}: "
                                  f"{error}); retrying[/yellow]")
                    submit(index, 1)
                    continue
                _record(pop, journal, run_dir, store, space, cfg, index, future, scores)
                if not pop.trained and len(pop.failed) >= FAILURES_BEFORE_GIVING_UP:
                    given_up = (f"gave up: the first {len(pop.failed)} candidates all failed, the last "
                                f"with {type(error).__name__}: {error}")
                    break
                fill()
                view.update(pop, scores)
    finally:
        executor.close()
    stop_reason = given_up or pop.stop_reason or (f"time budget of {cfg.time_budget_s:g} s"
                                                  if cfg.time_budget_s is not None else "stopped")
    wall = time.perf_counter() - started
    return _finish(run_dir, space, pop, cfg, journal, stop_reason, busy, wall, store.verified)


def _record(pop: PartialOrderPruning, journal: Journal, run_dir: Path, store: CropStore,
            space: SearchSpace, cfg: SearchConfig, index: int, future: Future[TrialResult],
            scores: dict[int, float]) -> None:
    """Journal a finished trial, tell POP, and checkpoint it if it joined the front."""
    candidate = space.arch(index)
    arch = str(candidate)
    record = {"type": "candidate", "index": int(index), "arch": arch, "seed": cfg.seed,
              "params": candidate.params(cfg.head), "flops": candidate.flops(head=cfg.head),
              "cost": float(pop.cost[index]), "versions": versions()}
    error = future.exception()
    if error is not None:
        journal.append({**record, "status": "failed", "seconds": None,
                        "error": f"{type(error).__name__}: {error}"})
        pop.record_failure(index)
        console.print(f"[red]candidate {arch} failed twice: {type(error).__name__}: {error}[/red]")
        return
    result = future.result()
    score = _score(result.history, cfg.metric, cfg.score_epochs)
    journal.append({**record, "status": "ok", "score": score,
                    "score_rule": f"mean validation {cfg.metric} of the last {cfg.score_epochs} epochs",
                    "best_epoch": result.best_epoch,
                    "val_metrics": result.val_metrics, "seconds": round(result.seconds, 3),
                    "device": result.device, "precision": result.train_config.precision,
                    "channels_last": result.train_config.channels_last})
    pop.record(index, score)
    scores[index] = score
    if index in pop.front:
        model = ConvRes(candidate, cbam=cfg.cbam, head=cfg.head)
        model.load_state_dict(result.state_dict)
        tcfg = result.train_config
        save_checkpoint(_checkpoint_dir(run_dir, arch), model, {
            "crop": tcfg.crop, "normalisation": result.normalisation, "val_metrics": result.val_metrics,
            "train_config": tcfg.to_dict(), "store_sha256": store.fingerprint, "versions": versions(),
            "search_index": int(index)})
    front = ", ".join(f"{space.arch(i)} ({scores[i]:.3f})" for i in pop.front)
    console.print(f"[{len(pop.trained)}] {arch}: val {cfg.metric} {score:.3f}, "
                  f"{cfg.objective} {pop.cost[index]:,.0f}, {result.seconds:.1f} s | pruned "
                  f"{pop.n_pruned:,}, remaining {pop.n_remaining:,} | front: {front}")


def _finish(run_dir: Path, space: SearchSpace, pop: PartialOrderPruning, cfg: SearchConfig,
            journal: Journal, stop_reason: str, busy: float, wall: float,
            store_verified: str) -> SearchResult:
    """pareto.json, pareto.png, and checkpoints of the front only."""
    header, *rest = journal.read()
    records = [r for r in rest if r.get("type") == "candidate"]
    by_index = {r["index"]: r for r in records}
    front = []
    for index in pop.front:
        record = by_index[index]
        checkpoint = _checkpoint_dir(run_dir, record["arch"])
        front.append({"arch": record["arch"], cfg.metric: record["score"], "cost": record["cost"],
                      "params": record["params"], "flops": record["flops"],
                      "checkpoint": str(checkpoint) if checkpoint.is_dir() else None})
    keep = {Path(f["checkpoint"]).name for f in front if f["checkpoint"]}
    for directory in sorted((run_dir / "checkpoints").glob("*")):
        if directory.name not in keep:
            shutil.rmtree(directory)
    overhead = max(0.0, wall - busy) / wall if wall > 0 else 0.0
    result = SearchResult(run_dir, front, stop_reason, len(pop.trained), pop.n_pruned, pop.n_remaining,
                          overhead, records)
    write_json(run_dir / "pareto.json", {
        "front": front, "objective": cfg.objective, "metric": cfg.metric, "stop_reason": stop_reason,
        "trained": result.trained, "pruned": result.pruned, "remaining": result.remaining,
        "space_size": len(space), "held_out_test_fold": cfg.test_fold,
        "store": header["store"], "store_sha256": header["store_sha256"],
        "store_verified": store_verified,
        "search_overhead_fraction_this_run": round(overhead, 4), "config": cfg.to_dict()})
    _plot(run_dir / "pareto.png", records, front, cfg)
    return result


def _plot(path: Path, records: list[dict[str, Any]], front: list[dict[str, Any]], cfg: SearchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["cost"] for r in ok], [r["score"] for r in ok], s=14, c="0.6", label="trained")
    ax.step([f["cost"] for f in front], [f[cfg.metric] for f in front], where="post", c="C3")
    ax.scatter([f["cost"] for f in front], [f[cfg.metric] for f in front], s=30, c="C3",
               label="Pareto front")
    if ok:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no candidate trained successfully", ha="center", transform=ax.transAxes)
    ax.set_xlabel(cfg.objective)
    ax.set_ylabel(f"validation {cfg.metric}")
    ax.set_title(f"POP search: {len(ok)} trained, {len(front)} on the front")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
