"""Binary classification metrics as the paper reports them, plus ROC-AUC and the confusion matrix."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "f1", "auc")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); NaN if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray,
                   threshold: float = 0.5) -> dict[str, object]:
    """accuracy, sensitivity, specificity, F1, AUC and the confusion matrix [[TN, FP], [FN, TP]]."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(probabilities) >= threshold
    tp = int((predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return {
        "accuracy": _ratio(tp + tn, len(labels)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(labels, probabilities),
        "confusion": [[tn, fp], [fn, tp]],
        "n": len(labels),
    }


def summarise(per_fold: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over folds of each metric (NaN folds left out)."""
    summary = {}
    for name in METRIC_NAMES:
        values = np.array([fold[name] for fold in per_fold], dtype=np.float64)
        values = values[~np.isnan(values)]
        summary[name] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        }
    return summary
