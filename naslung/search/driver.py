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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from naslung.arch import Arch
from naslung.console import console
from naslung.data.store import CropStore
from naslung.fileio import write_atomically, write_json
from naslung.search.journal import Journal, JournalError
from naslung.search.pop import PartialOrderPruning
from naslung.search.space import SearchSpace
from naslung.train.checkpoint import save_checkpoint
from naslung.train.trainer import FoldSplit, TrainConfig, prefer_channels_last, train_fold, volumes_on_device
from naslung.versions import versions

OBJECTIVES = ("params", "flops")
METRICS = ("accuracy", "auc")


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
    metric: str = "accuracy"
    patience: int = 30
    max_candidates: int | None = None
    time_budget_s: float | None = None
    seed: int = 0
    test_fold: int = 0
    head: str = "asoftmax"
    cbam: str = "nas-lung"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 candidate, got {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        """The settings that must match on resume (the time budget may change)."""
        settings = asdict(self)
        settings.pop("time_budget_s")
        settings["widths"] = list(self.widths)
        return settings


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


def _score(metrics: dict[str, Any], metric: str) -> float:
    value = metrics.get(metric, math.nan)
    return metrics["accuracy"] if value is None or math.isnan(value) else value


def _replay(pop: PartialOrderPruning, records: list[dict[str, Any]], metric: str) -> None:
    """Put POP back in the state the journal's candidates left it in."""
    for record in records:
        index = pop.next_candidate()
        if index != record["index"]:
            raise JournalError(f"the journal's candidate {record['arch']} is not the one this search "
                               "draws there: it was written by a search with other settings or code")
        if record["status"] == "ok":
            pop.record(index, record["score"])
        else:
            pop.record_failure(index)


def run_search(store: CropStore, cfg: SearchConfig, run_dir: str | Path, device: torch.device,
               resume: bool = False, show_progress: bool = True) -> SearchResult:
    """Search ``cfg``'s space on ``store`` and write the run directory (see the module doc)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    journal = Journal(run_dir / "journal.jsonl")
    header = {"type": "header", "config": cfg.to_dict(), "store_sha256": store.fingerprint,
              "store": str(store.root.resolve()), "versions": versions()}
    records = journal.read()
    if records and not resume:
        raise JournalError(f"{journal.path} exists: pass --resume to continue that search, "
                           "or choose another --out")
    if records and (records[0].get("config") != header["config"]
                    or records[0].get("store_sha256") != header["store_sha256"]):
        raise JournalError(f"{journal.path} belongs to a search with other settings or data")
    journal.drop_torn_tail()
    if not records:
        journal.append(header)
    candidates = [r for r in records if r.get("type") == "candidate"]

    space = SearchSpace(cfg.widths, cfg.min_depth, cfg.max_depth)
    cost = space.params(cfg.head) if cfg.objective == "params" else space.flops(head=cfg.head)
    pop = PartialOrderPruning(space, cost.astype(np.float64), cfg.seed, cfg.patience, cfg.max_candidates)
    _replay(pop, candidates, cfg.metric)
    if candidates:
        console.print(f"resuming: {len(candidates)} candidate(s) from {journal.path}, not retrained")

    split = FoldSplit.of(store.folds, cfg.test_fold, store.n_folds)
    train_seconds = 0.0
    volumes = labels = None
    stop_reason = None
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=True) as progress:
        while True:
            if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                stop_reason = f"time budget of {cfg.time_budget_s:g} s"
                break
            index = pop.next_candidate()
            if index is None:
                break
            candidate = space.arch(index)
            arch = str(candidate)
            tcfg = TrainConfig(arch=arch, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                               head=cfg.head, cbam=cfg.cbam, select=cfg.metric, seed=cfg.seed,
                               channels_last=prefer_channels_last(candidate, device))
            if volumes is None:
                volumes = volumes_on_device(store.crops, tcfg, device)
                labels = torch.from_numpy(store.labels).to(device)
            record = {"type": "candidate", "index": int(index), "arch": arch, "seed": cfg.seed,
                      "params": candidate.params(cfg.head), "flops": candidate.flops(head=cfg.head),
                      "cost": float(cost[index]),
                      "versions": versions()}
            train_started = time.perf_counter()
            result, error = None, None
            for _attempt in range(2):  # a failed trial is retried once
                try:
                    result = train_fold(volumes, labels, split, tcfg, progress, score_test=False)
                    break
                except Exception as err:  # recorded, never fatal to the search
                    error = f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - train_started
            train_seconds += seconds
            record["seconds"] = round(seconds, 3)
            if result is None:
                journal.append({**record, "status": "failed", "error": error})
                pop.record_failure(index)
                console.print(f"[red]candidate {arch} failed twice: {error}[/red]")
                continue
            score = _score(result.val_metrics, cfg.metric)
            journal.append({**record, "status": "ok", "score": score, "best_epoch": result.best_epoch,
                            "val_metrics": result.val_metrics})
            pop.record(index, score)
            if index in pop.front:
                save_checkpoint(_checkpoint_dir(run_dir, arch), result.model, {
                    "crop": tcfg.crop, "normalisation": result.normalisation.to_dict(),
                    "val_metrics": result.val_metrics, "train_config": tcfg.to_dict(),
                    "store_sha256": store.fingerprint, "versions": versions(), "search_index": int(index)})
            front = ", ".join(f"{space.arch(i)} ({_front_score(pop, i):.3f})" for i in pop.front)
            console.print(f"[{len(pop.trained)}] {arch}: val {cfg.metric} {score:.3f}, "
                          f"{cfg.objective} {cost[index]:,.0f} | trained {len(pop.trained)}, "
                          f"pruned {pop.n_pruned:,}, remaining {pop.n_remaining:,} | front: {front}")
    stop_reason = stop_reason or pop.stop_reason or "stopped"
    wall = time.perf_counter() - started
    return _finish(run_dir, space, pop, cfg, journal, stop_reason, train_seconds, wall)


def _front_score(pop: PartialOrderPruning, index: int) -> float:
    return next(e.accuracy for e in pop.trained if e.index == index)


def _finish(run_dir: Path, space: SearchSpace, pop: PartialOrderPruning, cfg: SearchConfig,
            journal: Journal, stop_reason: str, train_seconds: float, wall: float) -> SearchResult:
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
    overhead = max(0.0, wall - train_seconds) / wall if wall > 0 else 0.0
    result = SearchResult(run_dir, front, stop_reason, len(pop.trained), pop.n_pruned, pop.n_remaining,
                          overhead, records)
    write_json(run_dir / "pareto.json", {
        "front": front, "objective": cfg.objective, "metric": cfg.metric, "stop_reason": stop_reason,
        "trained": result.trained, "pruned": result.pruned, "remaining": result.remaining,
        "space_size": len(space), "held_out_test_fold": cfg.test_fold,
        "store": header["store"], "store_sha256": header["store_sha256"],
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
    ax.set_xscale("log")
    ax.set_xlabel(cfg.objective)
    ax.set_ylabel(f"validation {cfg.metric}")
    ax.set_title(f"POP search: {len(ok)} trained, {len(front)} on the front")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
