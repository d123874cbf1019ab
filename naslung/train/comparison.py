"""Paired comparison of models scored on the same nodules: bootstrap over patients.

Two rows of a results table (a CNN and a baseline) predict the same out-of-fold nodules, so
their difference is estimated on the pooled predictions and its uncertainty by resampling
patients with replacement (nodules of one patient stay together, as the folds keep them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.5
"""Every row calls a nodule malignant at probability >= 0.5: no threshold is tuned, so no test
fold can leak into one."""
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Difference:
    """A row's metric minus another's on the pooled predictions, with a 95 % interval."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{fmt(self.estimate, True)} [{fmt(self.low, True)}, {fmt(self.high, True)}]"


def fmt(value: float, signed: bool = False) -> str:
    """A metric for a table: three decimals, a dash for NaN."""
    return "—" if math.isnan(value) else f"{value:+.3f}" if signed else f"{value:.3f}"


def patient_bootstrap_weights(patients: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, N) counts of how often each nodule's patient was drawn: patients resampled
    with replacement, so nodules of one patient stay together as the folds keep them."""
    unique, codes = np.unique(patients, return_inverse=True)
    n_patients = len(unique)
    draws = np.random.default_rng(seed).integers(0, n_patients, (resamples, n_patients))
    flat = (draws + n_patients * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * n_patients).reshape(resamples, n_patients)
    return counts[:, codes].astype(np.float64)


def weighted_accuracy(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Accuracy at the 0.5 threshold under each row of nodule weights."""
    correct = (probabilities >= THRESHOLD) == labels.astype(bool)
    return (weights * correct).sum(axis=1) / weights.sum(axis=1)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count half) under each row of nodule weights; NaN where a class is absent."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, positive = scores[order], labels[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def paired_differences(labels: np.ndarray, probabilities: np.ndarray, reference: np.ndarray,
                       weights: np.ndarray) -> tuple[Difference, Difference]:
    """Accuracy and AUC of ``probabilities`` minus those of ``reference``, each with the 2.5 and
    97.5 percentiles of the difference over the bootstrap resamples in ``weights``."""
    ones = np.ones((1, len(labels)))
    differences = []
    for score in (weighted_accuracy, weighted_auc):
        estimate = float(score(labels, probabilities, ones)[0] - score(labels, reference, ones)[0])
        resampled = score(labels, probabilities, weights) - score(labels, reference, weights)
        low, high = np.nanpercentile(resampled, [2.5, 97.5])
        differences.append(Difference(estimate, float(low), float(high)))
    return differences[0], differences[1]
