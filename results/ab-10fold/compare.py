"""Paired 10-fold comparison of the study's defaults against one alternative each (the
schedule, the HU window): test-fold AUC per fold, pooled AUC and accuracy, and the paired
patient-bootstrap 95 % CI of the differences, over the same nodules.

    python results/ab-10fold/compare.py STORE STUDY_RUN NAME=RUN_DIR[,RUN_DIR...] ... > compare.md

Each alternative may be split over several run directories (different folds), which together
must cover every fold of the study run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from naslung.data.store import CropStore
from naslung.train.comparison import patient_bootstrap_weights, paired_differences, weighted_auc
from naslung.train.crossval import read_predictions


def predictions(store: CropStore, run_dirs: list[Path]) -> np.ndarray:
    merged = np.full(len(store), np.nan)
    for run_dir in run_dirs:
        found = read_predictions(run_dir, store.column("id"))
        merged = np.where(np.isnan(merged), found, merged)
    return merged


def fold_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(weighted_auc(labels, scores, np.ones((1, len(labels))))[0])


def main(store_dir: str, study: str, *alternatives: str) -> None:
    store = CropStore.open(store_dir)
    labels, folds = store.labels, store.folds
    default = predictions(store, [Path(study)])
    weights = patient_bootstrap_weights(store.patients)
    print("| comparison | fold AUCs (default / alternative) | mean fold AUC | pooled AUC | "
          "AUC difference [95 % CI] | accuracy difference [95 % CI] |")
    print("|---|---|---:|---:|---:|---:|")
    for spec in alternatives:
        name, dirs = spec.split("=", 1)
        other = predictions(store, [Path(d) for d in dirs.split(",")])
        if np.isnan(other).any() or np.isnan(default).any():
            raise SystemExit(f"{name}: the runs do not cover every nodule")
        per_fold = [(fold_auc(labels[folds == f], default[folds == f]),
                     fold_auc(labels[folds == f], other[folds == f])) for f in sorted(set(folds))]
        accuracy, auc = paired_differences(labels, other, default, weights)
        pooled = (fold_auc(labels, default), fold_auc(labels, other))
        means = np.mean(per_fold, axis=0)
        print(f"| {name} − default | {', '.join(f'{a:.3f}/{b:.3f}' for a, b in per_fold)} | "
              f"{means[0]:.3f} / {means[1]:.3f} | {pooled[0]:.3f} / {pooled[1]:.3f} | "
              f"{auc.estimate:+.3f} [{auc.low:+.3f}, {auc.high:+.3f}] | "
              f"{accuracy.estimate:+.3f} [{accuracy.low:+.3f}, {accuracy.high:+.3f}] |")


if __name__ == "__main__":
    main(*sys.argv[1:])
