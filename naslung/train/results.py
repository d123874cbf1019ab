"""Results tables and figures for rows of out-of-fold predictions on the same test folds.

A row is a model (a CNN, an ensemble) or a baseline, given as one probability per nodule of
the store (NaN outside the scored folds). Every row is scored per test fold (mean ± std over
folds, as the paper reports) and pooled; the chosen rows are compared with the others by the
paired patient bootstrap of `naslung.train.comparison`. Outputs, written atomically::

    results.md    the metrics table and the paired differences, in Markdown
    results.csv   per row and fold: accuracy, sensitivity, specificity, F1, AUC, n
    roc.png       pooled out-of-fold ROC curves of every row
    reliability.png  calibration: observed malignant fraction per bin of predicted probability
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from naslung.data.store import CropStore
from naslung.fileio import write_atomically, write_text
from naslung.train.comparison import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    THRESHOLD,
    Difference,
    fmt,
    paired_differences,
    patient_bootstrap_weights,
)
from naslung.train.metrics import METRIC_NAMES, binary_metrics, summarise

RELIABILITY_BINS = 10
TABLE_METRICS = ("auc", "accuracy", "sensitivity", "specificity")


@dataclass
class Row:
    """One line of a results table: a name and one probability per store nodule."""

    name: str
    probabilities: np.ndarray


@dataclass
class Comparison:
    """``row`` minus ``reference`` on the pooled predictions."""

    row: str
    reference: str
    accuracy: Difference
    auc: Difference


@dataclass
class Results:
    """Per-fold and summary metrics of every row, and the paired differences asked for."""

    folds: list[int]
    per_fold: dict[str, dict[int, dict]]
    summary: dict[str, dict[str, dict[str, float]]]
    pooled_auc: dict[str, float]
    comparisons: list[Comparison]


def score_rows(store: CropStore, folds: Sequence[int], rows: Sequence[Row],
               pairs: Sequence[tuple[str, str]]) -> Results:
    """Metrics of every row on each test fold in ``folds`` and pooled; differences for each
    (row, reference) name pair in ``pairs``."""
    folds = sorted(folds)
    scored = np.isin(store.folds, folds)
    labels = store.labels[scored]
    by_name = {row.name: row.probabilities[scored] for row in rows}
    for name, probabilities in by_name.items():
        if np.isnan(probabilities).any():
            raise ValueError(f"row {name!r} has no prediction for some nodule of folds {folds}")
    per_fold, summary, pooled = {}, {}, {}
    for row in rows:
        per_fold[row.name] = {f: binary_metrics(store.labels[store.folds == f],
                                                row.probabilities[store.folds == f], THRESHOLD)
                              for f in folds}
        summary[row.name] = summarise(list(per_fold[row.name].values()))
        pooled[row.name] = binary_metrics(labels, by_name[row.name], THRESHOLD)["auc"]
    weights = patient_bootstrap_weights(store.patients[scored], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    comparisons = [Comparison(name, reference, *paired_differences(
        labels, by_name[name], by_name[reference], weights)) for name, reference in pairs]
    return Results(folds, per_fold, summary, pooled, comparisons)


def markdown(results: Results) -> str:
    """The metrics table (mean ± std over test folds, pooled AUC) and the differences table."""
    lines = ["| model | " + " | ".join(TABLE_METRICS) + " | pooled AUC |",
             "|---|" + "---:|" * (len(TABLE_METRICS) + 1)]
    for name, summary in results.summary.items():
        cells = [f"{fmt(summary[m]['mean'])} ± {fmt(summary[m]['std'])}" for m in TABLE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(results.pooled_auc[name])} |")
    if results.comparisons:
        lines += ["", "| row | minus | Δ AUC [95 % CI] | Δ accuracy [95 % CI] |",
                  "|---|---|---:|---:|"]
        lines += [f"| {c.row} | {c.reference} | {c.auc} | {c.accuracy} |" for c in results.comparisons]
    return "\n".join(lines) + "\n"


def per_fold_csv(results: Results) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "fold", *METRIC_NAMES, "n"])
    for name, folds in results.per_fold.items():
        for fold, m in folds.items():
            writer.writerow([name, fold, *(m[k] for k in METRIC_NAMES), m["n"]])
    return out.getvalue()


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, positive = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(scores) - 1]
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def reliability(labels: np.ndarray, probabilities: np.ndarray,
                bins: int = RELIABILITY_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin: mean predicted probability, observed fraction, count."""
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    predicted = np.bincount(index, probabilities, bins)[filled] / counts[filled]
    observed = np.bincount(index, labels.astype(float), bins)[filled] / counts[filled]
    return predicted, observed, counts[filled]


def write_results(out_dir: Path, store: CropStore, results: Results, rows: Sequence[Row],
                  title: str) -> str:
    """``results.md``, ``results.csv``, ``roc.png`` and ``reliability.png`` in ``out_dir``;
    returns the Markdown of ``results.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    text = f"# {title}\n\n" + markdown(results)
    write_text(out_dir / "results.md", text)
    write_text(out_dir / "results.csv", per_fold_csv(results))
    scored = np.isin(store.folds, results.folds)
    labels = store.labels[scored]
    figures = {name: plt.subplots(figsize=(6, 5)) for name in ("roc", "reliability")}
    roc_ax, rel_ax = figures["roc"][1], figures["reliability"][1]
    for k, row in enumerate(rows):
        probabilities = row.probabilities[scored]
        fpr, tpr = roc_curve(labels, probabilities)
        roc_ax.plot(fpr, tpr, c=f"C{k}", label=f"{row.name} (AUC {results.pooled_auc[row.name]:.3f})")
        predicted, observed, _ = reliability(labels, probabilities)
        rel_ax.plot(predicted, observed, "o-", c=f"C{k}", ms=4, label=row.name)
    for ax in (roc_ax, rel_ax):
        ax.plot([0, 1], [0, 1], c="0.7", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=7)
    n = f"{int(scored.sum())} nodules, {len(np.unique(store.patients[scored]))} patients, "
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity",
               title=f"Out-of-fold ROC ({n}{len(results.folds)} test folds)")
    rel_ax.set(xlabel="predicted probability of malignancy",
               ylabel="observed malignant fraction",
               title=f"Reliability ({RELIABILITY_BINS} equal-width bins)")
    for name, (fig, _) in figures.items():
        fig.tight_layout()
        write_atomically(out_dir / f"{name}.png",
                         lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
    return text
