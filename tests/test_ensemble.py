"""Logistic regression, the bootstrap, and the ensemble of a search's front on a tiny store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from naslung.arch import Arch
from naslung.data.store import CropStore
from naslung.train.comparison import patient_bootstrap_weights, weighted_accuracy, weighted_auc
from naslung.train.ensemble import (
    BASELINE,
    MEAN,
    MEMBER,
    VOTE,
    EnsembleError,
    choose_archs,
    majority_vote,
    read_member_predictions,
    run_ensemble,
)
from naslung.train.logistic import fit_logistic, predict_logistic
from naslung.train.metrics import roc_auc

FRONT = [{"arch": "4/4/4", "accuracy": 0.7, "cost": 100, "params": 1, "flops": 1},
         {"arch": "4/4/8", "accuracy": 0.7, "cost": 200, "params": 2, "flops": 2},
         {"arch": "8/8/8", "accuracy": 0.6, "cost": 300, "params": 3, "flops": 3}]


def write_size_store(root, n: int = 40, side: int = 40, n_folds: int = 4) -> CropStore:
    """Bright spheres whose radius grows with the label but overlaps between classes, two
    nodules per patient, ``diameter_mm`` the sphere's diameter: size predicts, imperfectly."""
    rng = np.random.default_rng(1)
    labels = np.arange(n) % 2
    radii = np.where(labels == 1, rng.uniform(3.5, 7.0, n), rng.uniform(2.0, 5.0, n))
    grid = np.sqrt(((np.indices((side,) * 3) - side / 2 + 0.5) ** 2).sum(0))
    crops = rng.normal(-820, 40, (n, side, side, side))
    masks = grid[None] < radii[:, None, None, None]
    crops[masks] = 30
    rows = [{"id": f"n{i}", "patient": f"p{i // 2}", "series_uid": f"s{i // 2}",
             "fold": (i // 2) % n_folds, "label": int(labels[i]), "diameter_mm": round(2 * radii[i], 3)}
            for i in range(n)]
    return CropStore.write(root, crops.astype(np.int16), masks, rows,
                           {"source": "synthetic-sizes", "n_folds": n_folds})


def write_pareto(search_dir, front=FRONT, **extra) -> None:
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / "pareto.json").write_text(json.dumps({"front": front, "metric": "accuracy", **extra}))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CropStore:
    return write_size_store(tmp_path_factory.mktemp("sizes") / "store")


@pytest.fixture(scope="module")
def one_thread():
    """Models this small train no faster on two threads, and far slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, store, one_thread):
    search_dir = tmp_path_factory.mktemp("search")
    write_pareto(search_dir, held_out_test_fold=0, config={"lr": 1e-3, "batch_size": 8})
    out = tmp_path_factory.mktemp("ensemble")
    report = run_ensemble(search_dir, store, out, torch.device("cpu"), top=2, epochs=1,
                          show_progress=False)
    return search_dir, out, report


# --- logistic regression ---------------------------------------------------------------

def test_logistic_matches_the_closed_form_of_a_binary_feature():
    # With one binary feature the MLE reproduces each group's rate: logit(0.3), logit(0.7).
    x = np.r_[np.zeros(10), np.ones(10)]
    y = np.r_[[1] * 3 + [0] * 7, [1] * 7 + [0] * 3]
    intercept, slope = fit_logistic(x, y)
    assert intercept == pytest.approx(np.log(3 / 7), abs=1e-5)
    assert slope == pytest.approx(np.log(7 / 3) - np.log(3 / 7), abs=1e-5)
    assert predict_logistic(np.array([intercept, slope]), np.array([0.0, 1.0])) == pytest.approx([0.3, 0.7])


def test_logistic_stays_finite_on_separable_data():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    p = predict_logistic(fit_logistic(x, np.array([0, 0, 1, 1])), x)
    assert np.all(np.isfinite(p)) and p[1] < 0.01 and p[2] > 0.99


def test_logistic_refuses_a_single_class():
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(np.arange(4.0), np.zeros(4))


# --- bootstrap over patients -----------------------------------------------------------------

def test_weighted_scores_with_unit_weights_are_the_plain_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50), 1)  # many ties
    ones = np.ones((1, 50))
    assert weighted_auc(labels, scores, ones)[0] == pytest.approx(roc_auc(labels, scores))
    assert weighted_accuracy(labels, scores, ones)[0] == pytest.approx(np.mean((scores >= 0.5) == labels))
    # Weight 2 on a nodule is the nodule listed twice.
    twice = np.r_[np.arange(50), 0]
    weights = np.bincount(twice, minlength=50)[None].astype(float)
    assert weighted_auc(labels, scores, weights)[0] == pytest.approx(roc_auc(labels[twice], scores[twice]))


def test_bootstrap_resamples_whole_patients_and_is_seeded():
    patients = np.array(["a", "a", "b", "c", "c", "c"])
    weights = patient_bootstrap_weights(patients, 100, seed=3)
    assert weights.shape == (100, 6)
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 3] == weights[:, 5])
    per_patient = weights[:, [0, 2, 3]]
    assert np.all(per_patient.sum(axis=1) == 3)  # three patients drawn per resample
    np.testing.assert_array_equal(weights, patient_bootstrap_weights(patients, 100, seed=3))


# --- choosing the archs and clear errors -----------------------------------------------------

def test_choose_archs_takes_the_best_and_the_cheaper_on_ties():
    pareto = {"front": FRONT, "metric": "accuracy"}
    assert choose_archs(pareto, 2) == ["4/4/4", "4/4/8"]
    assert choose_archs(pareto, 10) == ["4/4/4", "4/4/8", "8/8/8"]


def test_majority_vote_counts_a_tie_as_malignant():
    votes = majority_vote(np.array([[0.9, 0.2, 0.5], [0.1, 0.3, 0.49]]))
    np.testing.assert_allclose(votes, [0.5, 0.0, 0.5])


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda d: None, {}, "no pareto.json"),
    (lambda d: write_pareto(d, front=[]), {}, "front is empty"),
    (lambda d: write_pareto(d), {"top": 0}, "--top must be >= 1"),
    (lambda d: write_pareto(d), {"train_overrides": {"arch": "4/4/4"}}, "cannot set arch"),
    (lambda d: (d / "pareto.json").write_text("{"), {}, "unreadable"),
    (lambda d: write_pareto(d, held_out_test_fold=7), {}, "held out fold 7"),
])
def test_clear_errors(tmp_path, store, setup, kwargs, message):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    setup(search_dir)
    with pytest.raises(EnsembleError, match=message):
        run_ensemble(search_dir, store, tmp_path / "out", torch.device("cpu"), epochs=1,
                     show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists()  # nothing trained before the request was checked


# --- the ensemble run ------------------------------------------------------------------------

def test_table_rows_baseline_first(ensemble):
    _, out, report = ensemble
    assert report.archs == ["4/4/4", "4/4/8"]
    # a store without ratings: size-image, size-reader and features
    assert [r.kind for r in report.rows] == [BASELINE] * 3 + [MEMBER, MEMBER, MEAN, VOTE]
    assert [r.name for r in report.rows][3:5] == ["4/4/4", "4/4/8"]
    assert [r.params for r in report.rows[:3]] == [2, 2, 15]
    assert report.rows[5].params == report.rows[6].params == report.rows[3].params + report.rows[4].params
    assert report.folds == [0, 1, 2, 3] and report.held_out_fold == 0
    for row in report.rows:
        assert sorted(row.per_fold) == [0, 1, 2, 3]
        assert row.held_out == row.per_fold[0]
    with open(out / "ensemble.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["kind"] for t in table] == [BASELINE] * 3 + [MEMBER, MEMBER, MEAN, VOTE]
    assert {"accuracy_mean", "sensitivity_std", "f1_mean", "auc_std", "params", "delta_auc_low",
            "delta_accuracy_high", "held_out_accuracy"} <= table[0].keys()
    markdown = (out / "ensemble.md").read_text()
    assert "never saw fold 0" in markdown and "tie counts as malignant" in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_lines[1].startswith("| size-image") and "reference" in table_lines[1]
    assert len(table_lines) == 1 + 7 and all("±" in line for line in table_lines[1:])


def test_ensembles_combine_the_members_predictions(ensemble, store):
    _, out, report = ensemble
    ids = store.column("id")
    members = np.stack([read_member_predictions(out / "members" / Arch.parse(a).dirname, ids)
                        for a in report.archs])
    by_kind = {r.kind: r for r in report.rows}
    np.testing.assert_allclose(by_kind[MEAN].probabilities, members.mean(axis=0))
    np.testing.assert_allclose(by_kind[VOTE].probabilities, (members >= 0.5).mean(axis=0))
    np.testing.assert_allclose(report.rows[3].probabilities, members[0])
    with open(out / "predictions.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [w["id"] for w in written] == list(ids)
    np.testing.assert_allclose([float(w[by_kind[MEAN].name]) for w in written], members.mean(axis=0))


def test_differences_hold_their_estimate_and_repeat_on_resume(ensemble, store):
    search_dir, out, report = ensemble
    model = out / "members" / "4_4_4" / "fold0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    again = run_ensemble(search_dir, store, out, torch.device("cpu"), top=2, epochs=1, show_progress=False)
    assert model.stat().st_mtime_ns == stamp  # finished folds are reused, not retrained
    for row, repeat in zip(report.rows[1:], again.rows[1:], strict=True):
        for d in (row.delta_accuracy, row.delta_auc):
            assert d.low <= d.estimate <= d.high
        assert (row.delta_accuracy, row.delta_auc) == (repeat.delta_accuracy, repeat.delta_auc)
    assert report.rows[0].delta_accuracy is None
