"""Patient-level stratified k-fold assignment.

Nodules of one patient share anatomy, scanner and readers, so they must never sit on both
sides of a train/test split; within that constraint each fold should hold the classes in the
same proportions. `assign_folds` does what scikit-learn's ``StratifiedGroupKFold(shuffle=True)``
does, greedily and in NumPy: patients are shuffled (the seed), then visited from the most
class-skewed to the least, and each goes to the fold whose addition keeps the per-class
spread of fold shares smallest, ties going to the fold with fewest nodules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TIE = 1e-9  # evaluations closer than this count as equal


def assign_folds(patients: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray,
                 n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..n_folds-1) for every sample; a patient's samples share one fold."""
    patients = np.asarray(patients)
    labels = np.asarray(labels)
    if patients.shape != labels.shape or patients.ndim != 1:
        raise ValueError(f"patients {patients.shape} and labels {labels.shape} must be "
                         "1-D and of equal length")
    groups, group_of = np.unique(patients, return_inverse=True)
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if n_folds > len(groups):
        raise ValueError(f"cannot split {len(groups)} patient(s) into {n_folds} folds; "
                         "use fewer folds or more data")
    _, class_of = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(groups), class_of.max() + 1))
    np.add.at(counts, (group_of, class_of), 1)
    class_totals = counts.sum(axis=0)

    order = np.random.default_rng(seed).permutation(len(groups))
    order = order[np.argsort(-counts[order].std(axis=1), kind="stable")]
    per_fold = np.zeros((n_folds, counts.shape[1]))
    fold_of_group = np.empty(len(groups), dtype=np.int64)
    candidates = np.arange(n_folds)
    for g in order:
        trial = np.broadcast_to(per_fold, (n_folds, *per_fold.shape)).copy()
        trial[candidates, candidates] += counts[g]  # trial[i]: group g put in fold i
        spread = (trial / class_totals).std(axis=1).mean(axis=1)
        near_best = np.flatnonzero(spread <= spread.min() + _TIE)
        best = near_best[np.argmin(per_fold[near_best].sum(axis=1))]
        per_fold[best] += counts[g]
        fold_of_group[g] = best
    return fold_of_group[group_of]
