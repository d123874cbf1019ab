"""NAS-Lung's final step: cross-validate the best archs of a search's front and ensemble them.

The paper's final model is a majority vote of searched architectures. Here each chosen arch is
cross-validated on every patient-level fold, and the members' out-of-fold test probabilities
are combined per nodule, so members, ensembles and the baselines are scored on the
same test folds and compared pairwise (bootstrap over patients) rather than by their means.

Outputs in ``out_dir``::

    members/<arch>/      one `cross_validate` run directory per member (reused when resumed)
    predictions.csv      id, patient, fold, label and every row's out-of-fold probability
    ensemble.csv         the table below, machine-readable
    ensemble.md          the table in Markdown, with what was trained and how it was scored
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naslung.arch import Arch
from naslung.console import console
from naslung.data.augment import AIR_HU, HU_WINDOW
from naslung.data.store import CropStore
from naslung.fileio import write_text
from naslung.train.baselines import BASELINE_NAMES, run_baselines
from naslung.train.comparison import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    THRESHOLD,
    Difference,
    fmt,
    paired_differences,
    patient_bootstrap_weights,
)
from naslung.train.crossval import RunError, cross_validate, read_predictions
from naslung.train.metrics import METRIC_NAMES, binary_metrics, summarise
from naslung.train.trainer import TrainConfig, prefer_channels_last

SEARCH_SETTINGS = ("lr", "batch_size", "head", "cbam")
"""Training settings a member inherits from the search that found it (its score was earned
with them); ``train_overrides`` still win."""
BASELINE, MEMBER, MEAN, VOTE = "baseline", "member", "mean", "vote"
ROW_NAMES = {MEAN: "mean-probability ensemble",
             VOTE: "majority-vote ensemble"}


class EnsembleError(ValueError):
    """A search run directory or request the ensemble cannot be built from."""


@dataclass
class EnsembleRow:
    """One line of the table: a model's out-of-fold probabilities and how they score."""

    name: str
    kind: str
    params: int
    probabilities: np.ndarray
    """Out-of-fold probability of malignancy, in the store's row order."""
    per_fold: dict[int, dict]
    summary: dict[str, dict[str, float]]
    held_out: dict | None
    """Metrics on the fold the search never saw (None if the search did not record it)."""
    delta_accuracy: Difference | None
    delta_auc: Difference | None


@dataclass
class EnsembleReport:
    """The archs ensembled, the folds scored and the table's rows (baseline first)."""

    out_dir: Path
    archs: list[str]
    folds: list[int]
    held_out_fold: int | None
    rows: list[EnsembleRow]


def read_pareto(search_dir: Path) -> dict[str, Any]:
    """The search's ``pareto.json``, checked to have a non-empty front scored by its metric."""
    path = Path(search_dir) / "pareto.json"
    if not path.is_file():
        raise EnsembleError(f"no pareto.json in {search_dir}: run `naslung search` there first")
    try:
        pareto = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EnsembleError(f"{path} is unreadable ({err})") from err
    front, metric = pareto.get("front"), pareto.get("metric", "accuracy")
    if not front:
        raise EnsembleError(f"{path}: the Pareto front is empty, there is nothing to ensemble")
    for entry in front:
        if not isinstance(entry, dict) or not {"arch", metric, "cost"} <= entry.keys():
            raise EnsembleError(f"{path}: every front entry needs 'arch', '{metric}' and 'cost'")
    return pareto


def choose_archs(pareto: dict[str, Any], top: int) -> list[str]:
    """The ``top`` front archs with the best validation metric, the cheaper first on ties."""
    if top < 1:
        raise EnsembleError(f"--top must be >= 1, got {top}")
    metric = pareto.get("metric", "accuracy")
    ranked = sorted(pareto["front"], key=lambda e: (-float(e[metric]), float(e["cost"])))
    return [str(Arch.parse(e["arch"])) for e in ranked[:top]]


def member_config(arch: str, store: CropStore, device: torch.device, epochs: int,
                  search_config: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """A member's training config: the search's settings, the store's intensity window and
    crop (as `naslung train` takes them), the faster memory layout, then ``overrides``."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - (fields - {"arch", "epochs"}))
    if bad:
        raise EnsembleError(f"train_overrides cannot set {', '.join(bad)}")
    manifest = store.manifest
    settings = {
        **{k: search_config[k] for k in SEARCH_SETTINGS if k in search_config},
        "crop": int(manifest.get("crop", TrainConfig.crop)),
        "hu_window": tuple(manifest.get("intensity_window", HU_WINDOW)),
        "background": float(manifest.get("background_value", AIR_HU)),
        "channels_last": prefer_channels_last(Arch.parse(arch), device),
        **overrides,
    }
    return TrainConfig(arch=arch, epochs=epochs, **settings)


def read_member_predictions(run_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities of one member, which must cover every nodule of the store."""
    try:
        probabilities = read_predictions(run_dir, ids)
    except RunError as err:
        raise EnsembleError(str(err)) from err
    missing = int(np.isnan(probabilities).sum())
    if missing:
        raise EnsembleError(f"{run_dir}: {missing} nodule(s) have no out-of-fold prediction")
    return probabilities


def majority_vote(member_probabilities: np.ndarray) -> np.ndarray:
    """Fraction of members (rows) voting malignant per nodule; at the 0.5 threshold a tie
    (half the members, possible with an even count) counts as malignant."""
    return (np.asarray(member_probabilities) >= THRESHOLD).mean(axis=0)


def fmt_difference(d: Difference | None) -> str:
    return "reference" if d is None else str(d)


def format_markdown(report: EnsembleReport, store: CropStore, search_dir: Path, epochs: int) -> str:
    """``ensemble.md``: what was trained and how it was scored, then the table."""
    held = report.held_out_fold
    header = (
        f"# Ensemble of the search in {search_dir}\n\n"
        f"The {len(report.archs)} architecture(s) of the search's Pareto front with the best "
        f"validation score (ties to the cheaper), {', '.join(report.archs)}, were each "
        f"cross-validated for {epochs} epochs on "
        f"all {len(report.folds)} patient-level folds of {store.root} ({len(store)} nodules, "
        f"{len(np.unique(store.patients))} patients): for every test fold, one model trained on the "
        f"other folds with the epoch kept on a validation fold, then the test fold scored once. "
        f"The ensembles combine the members' out-of-fold probabilities per nodule: the mean, and "
        f"the fraction of members voting malignant (a tie counts as malignant). The baselines "
        f"(`naslung baselines`) are logistic regressions fitted on the same training folds, with "
        f"any choice made on the same validation fold. Every row "
        f"calls malignant at probability >= {THRESHOLD}, and no test-fold result chose an "
        f"architecture, an epoch or a threshold. Metrics are mean ± std over the test folds; "
        f"Δ columns are the pooled out-of-fold difference to {BASELINE_NAMES['size-image']} "
        f"(the size the CNN can see) with a 95 % "
        f"interval from {BOOTSTRAP_RESAMPLES:,} resamples of patients (seed {BOOTSTRAP_SEED}). "
        f"The store's files were checked before training ({store.verified}). "
        + (f"The search itself never saw fold {held}; the other folds trained or validated its "
           f"candidates, so the fold-{held} columns are the strictly unbiased ones.\n"
           if held is not None else
           "The search did not record which fold it held out, so selection may have seen every "
           "fold's data as training or validation data.\n"))
    columns = ["model", "params", "accuracy", "sensitivity", "specificity", "F1", "AUC",
               "Δ accuracy [95 % CI]", "Δ AUC [95 % CI]"]
    if held is not None:
        columns += [f"fold {held} accuracy", f"fold {held} AUC"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for row in report.rows:
        cells = [row.name, f"{row.params:,}",
                 *(f"{fmt(row.summary[m]['mean'])} ± {fmt(row.summary[m]['std'])}" for m in METRIC_NAMES),
                 fmt_difference(row.delta_accuracy), fmt_difference(row.delta_auc)]
        if row.held_out is not None:
            cells += [fmt(row.held_out["accuracy"]), fmt(row.held_out["auc"])]
        lines.append("| " + " | ".join(cells) + " |")
    return header + "\n" + "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table_rows(report: EnsembleReport) -> list[dict[str, Any]]:
    """``ensemble.csv``'s rows: one per model, every number unformatted."""
    out = []
    for row in report.rows:
        record: dict[str, Any] = {"model": row.name, "kind": row.kind, "params": row.params}
        for m in METRIC_NAMES:
            record[f"{m}_mean"], record[f"{m}_std"] = row.summary[m]["mean"], row.summary[m]["std"]
        for m in ("accuracy", "auc"):
            d = getattr(row, f"delta_{m}")
            record[f"delta_{m}"], record[f"delta_{m}_low"], record[f"delta_{m}_high"] = (
                (d.estimate, d.low, d.high) if d else ("", "", ""))
        for m in ("accuracy", "auc"):
            record[f"held_out_{m}"] = row.held_out[m] if row.held_out else ""
        out.append(record)
    return out


def run_ensemble(search_dir: Path, store: CropStore, out_dir: Path, device: torch.device, top: int = 3,
                 epochs: int = 20, train_overrides: dict[str, Any] | None = None,
                 show_progress: bool = True) -> EnsembleReport:
    """Cross-validate the ``top`` archs of the search in ``search_dir`` on every fold of
    ``store``, ensemble them, and write the table beside the baselines into ``out_dir``."""
    search_dir, out_dir = Path(search_dir), Path(out_dir)
    pareto = read_pareto(search_dir)
    archs = choose_archs(pareto, top)
    search_config = pareto.get("config") or {}
    configs = [member_config(a, store, device, epochs, search_config, train_overrides or {})
               for a in archs]
    held_out_fold = pareto.get("held_out_test_fold")
    held_out_fold = None if held_out_fold is None else int(held_out_fold)
    folds = sorted(int(f) for f in np.unique(store.folds))
    if held_out_fold is not None and held_out_fold not in folds:
        raise EnsembleError(f"the search held out fold {held_out_fold}, which {store.root} does not "
                            "have: was it searched on another store?")
    ids, patients = store.column("id"), store.patients
    baselines = run_baselines(store, folds, configs[0].crop)  # before training: bad data fails fast

    members = []
    for k, cfg in enumerate(configs, 1):
        run_dir = out_dir / "members" / Arch.parse(cfg.arch).dirname
        if show_progress:
            console.print(f"member {k}/{len(configs)}: {cfg.arch} -> {run_dir}")
        cross_validate(store, cfg, run_dir, device, show_progress=show_progress)
        members.append(read_member_predictions(run_dir, ids))
    member_probs = np.stack(members)
    params = [Arch.parse(cfg.arch).params(cfg.head) for cfg in configs]

    def row(name: str, kind: str, n_params: int, probabilities: np.ndarray) -> EnsembleRow:
        per_fold = {f: binary_metrics(store.labels[store.folds == f], probabilities[store.folds == f],
                                      THRESHOLD) for f in folds}
        return EnsembleRow(name, kind, n_params, probabilities, per_fold,
                           summarise(list(per_fold.values())), per_fold.get(held_out_fold), None, None)

    rows = [*(row(BASELINE_NAMES[b.name], BASELINE, b.n_coefficients, b.probabilities)
              for b in baselines),
            *(row(cfg.arch, MEMBER, p, probs) for cfg, p, probs in zip(configs, params, member_probs,
                                                                         strict=True)),
            row(ROW_NAMES[MEAN], MEAN, sum(params), member_probs.mean(axis=0)),
            row(ROW_NAMES[VOTE], VOTE, sum(params), majority_vote(member_probs))]
    weights = patient_bootstrap_weights(patients, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    reference = rows[0]  # size-image
    for r in rows[1:]:
        r.delta_accuracy, r.delta_auc = paired_differences(store.labels, r.probabilities,
                                                           reference.probabilities, weights)

    report = EnsembleReport(out_dir, archs, folds, held_out_fold, rows)
    write_text(out_dir / "predictions.csv", _csv_text([
        {"id": ids[i], "patient": patients[i], "fold": int(store.folds[i]),
         "label": int(store.labels[i]), **{r.name: float(r.probabilities[i]) for r in rows}}
        for i in range(len(store))]))
    write_text(out_dir / "ensemble.csv", _csv_text(table_rows(report)))
    write_text(out_dir / "ensemble.md", format_markdown(report, store, search_dir, epochs))
    return report
