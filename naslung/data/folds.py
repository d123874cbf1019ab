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
from dataclasses import dataclass

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


def one_fold_per_patient(patients: Sequence[str] | np.ndarray,
                         folds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Given folds (e.g. LUNA16's subsets, which split series, not patients), moved so that each
    patient's samples share one: the fold holding most of them, ties to the lowest. A patient
    with two series in two subsets (LIDC-IDRI-0332 in LUNA16) would otherwise sit on both
    sides of a split."""
    patients, folds = np.asarray(patients), np.asarray(folds, dtype=np.int64)
    out = folds.copy()
    for patient in np.unique(patients):
        mine = patients == patient
        values, counts = np.unique(folds[mine], return_counts=True)
        out[mine] = values[np.argmax(counts)]  # np.unique sorts, argmax takes the first maximum
    return out


@dataclass
class FoldSplit:
    """Indices of one split: test = fold k, validation = fold k+1 (mod n), train = the rest.

    A store with only two folds (too few patients for three) has no separate validation fold:
    the epoch is then picked on the training crops, ``val_fold`` is -1, and the test fold is
    still never looked at before the final score.
    """

    test_fold: int
    val_fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, folds: np.ndarray, test_fold: int, n_folds: int) -> FoldSplit:
        if n_folds < 2:
            raise ValueError(f"cross-validation needs >= 2 folds, the store has {n_folds}")
        if not 0 <= test_fold < n_folds:
            raise ValueError(f"fold {test_fold} is out of range 0..{n_folds - 1}")
        val_fold = (test_fold + 1) % n_folds if n_folds > 2 else -1
        test = np.flatnonzero(folds == test_fold)
        train = np.flatnonzero((folds != test_fold) & (folds != val_fold))
        val = np.flatnonzero(folds == val_fold) if val_fold >= 0 else train
        for name, part in (("test", test), ("validation", val), ("training", train)):
            if len(part) == 0:
                raise ValueError(f"test fold {test_fold}: the {name} set is empty")
        return cls(test_fold, val_fold, train, val, test)
