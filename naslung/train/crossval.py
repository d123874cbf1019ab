"""Patient-level k-fold cross-validation: one model per test fold, written to a run directory.

Run directory layout::

    config.json            training config, store path and fingerprint, versions
    fold<k>/model.pt       kept weights (state_dict) of the model tested on fold k
    fold<k>/model.json     arch, normalisation, metrics, epoch kept, versions
    fold<k>/history.csv    per-epoch training loss and validation metrics
    fold<k>/predictions.csv  test-fold id, patient, label, probability
    metrics.json           every fold's test metrics, and mean and std over folds

Each fold is written atomically when it finishes; re-running into the same directory with the
same config and store reuses finished folds, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from naslung.console import console
from naslung.data.folds import FoldSplit
from naslung.data.store import CropStore
from naslung.fileio import write_json, write_text
from naslung.train.checkpoint import META_FILE, save_checkpoint
from naslung.train.metrics import summarise
from naslung.train.trainer import TrainConfig, train_fold, volumes_on_device
from naslung.versions import versions


class RunError(RuntimeError):
    """A run directory that cannot be used for this run."""


@dataclass
class RunSummary:
    """Test metrics of every fold trained in a run, and their mean and std."""

    run_dir: Path
    per_fold: dict[int, dict]
    summary: dict[str, dict[str, float]]


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is unreadable ({err}); delete it or choose another --out") from err


def _same_run(recorded: dict, train: dict, store_sha256: str) -> bool:
    return (recorded.get("train", recorded.get("train_config")) == json.loads(json.dumps(train))
            and recorded.get("store_sha256") == store_sha256)


def _check_run_dir(run_dir: Path, train: dict, store_sha256: str) -> None:
    """Refuse to mix folds of different configs or data in one run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a directory")
    recorded = [run_dir / "config.json", *run_dir.glob(f"fold*/{META_FILE}")]
    for path in recorded:
        if path.is_file() and not _same_run(_read_json(path), train, store_sha256):
            raise RunError(f"{run_dir} holds a run with another config or store ({path}); "
                           "choose another --out or delete it")


def read_predictions(run_dir: Path, ids: np.ndarray) -> np.ndarray:
    """A run's out-of-fold probabilities by store nodule id, from its folds' predictions.csv;
    NaN for nodules of folds it has not tested."""
    index = {nodule_id: i for i, nodule_id in enumerate(ids)}
    probabilities = np.full(len(ids), np.nan)
    for path in sorted(Path(run_dir).glob("fold*/predictions.csv")):
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            for row in rows:
                i = index.get(row["id"])
                if i is None or not math.isnan(probabilities[i]):
                    raise RunError(f"{path}: nodule {row['id']!r} is not in the store or predicted twice")
                probabilities[i] = float(row["probability"])
        except (OSError, KeyError, ValueError) as err:
            raise RunError(f"{path} is unreadable ({err!r})") from err
    return probabilities


def _finished_folds(run_dir: Path) -> dict[int, dict]:
    """Test metrics of every fold that has a complete checkpoint in ``run_dir``."""
    finished = {}
    for meta_file in run_dir.glob(f"fold*/{META_FILE}"):
        meta = _read_json(meta_file)
        finished[int(meta["fold"])] = meta["test_metrics"]
    return finished


def cross_validate(store: CropStore, cfg: TrainConfig, run_dir: str | os.PathLike,
                   device: torch.device, folds: list[int] | None = None,
                   show_progress: bool = True) -> RunSummary:
    """Train and test one model per fold in ``folds`` (default: all), writing ``run_dir``."""
    run_dir = Path(run_dir)
    folds = list(range(store.n_folds)) if folds is None else sorted(set(folds))
    for fold in folds:
        FoldSplit.of(store.folds, fold, store.n_folds)  # validates the fold and its sets
    _check_run_dir(run_dir, cfg.to_dict(), store.fingerprint)
    write_json(run_dir / "config.json", {
        "train": cfg.to_dict(), "store": str(store.root.resolve()),
        "store_sha256": store.fingerprint, "store_verified": store.verified, "device": str(device),
        "versions": versions()})
    finished = _finished_folds(run_dir)

    volumes = volumes_on_device(store.crops, cfg, device)
    labels_np = store.labels
    labels = torch.from_numpy(labels_np).to(device)
    ids, patients = store.column("id"), store.patients
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total} batches"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=True) as progress:
        for fold in folds:
            fold_dir = run_dir / f"fold{fold}"
            if fold in finished:
                progress.console.print(f"fold {fold}: finished earlier, reusing {fold_dir}")
                continue
            split = FoldSplit.of(store.folds, fold, store.n_folds)
            result = train_fold(volumes, labels, split, cfg, progress)
            write_text(fold_dir / "history.csv", _csv_text(result.history))
            write_text(fold_dir / "predictions.csv", _csv_text([
                {"id": ids[i], "patient": patients[i], "label": int(labels_np[i]),
                 "probability": float(p)} for i, p in zip(split.test, result.test_probabilities, strict=True)
            ]))
            save_checkpoint(fold_dir, result.model, {
                "fold": fold, "val_fold": split.val_fold, "best_epoch": result.best_epoch,
                "crop": cfg.crop, "normalisation": result.normalisation.to_dict(),
                "val_metrics": result.val_metrics, "test_metrics": result.test_metrics,
                "train_config": cfg.to_dict(), "store_sha256": store.fingerprint,
                "seconds": result.seconds, "n_train": len(split.train), "versions": versions(),
                "train_format": {"precision": result.train_format.precision,
                                 "channels_last": result.train_format.channels_last},
            })
            finished[fold] = m = result.test_metrics
            progress.console.print(
                f"fold {fold}: acc {m['accuracy']:.3f}  sens {m['sensitivity']:.3f}  "
                f"spec {m['specificity']:.3f}  f1 {m['f1']:.3f}  auc {m['auc']:.3f}  "
                f"(n={m['n']}, epoch {result.best_epoch + 1} kept, {result.seconds:.0f} s, "
                f"{result.train_format.precision}"
                f"{' channels_last_3d' if result.train_format.channels_last else ''})")
    # The summary covers every finished fold of the run, from this call or earlier ones.
    summary = summarise([finished[f] for f in sorted(finished)])
    write_json(run_dir / "metrics.json", {"folds": {str(f): finished[f] for f in sorted(finished)},
                                          "summary": summary})
    return RunSummary(run_dir, dict(sorted(finished.items())), summary)

