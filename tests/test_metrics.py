"""Classification metrics against hand counts."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from naslung.train.metrics import binary_metrics, roc_auc, summarise


def test_confusion_and_rates():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.3, 0.4, 0.5])
    m = binary_metrics(labels, probs)
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == 6 / 8
    assert m["sensitivity"] == 3 / 4 and m["specificity"] == 3 / 4
    assert m["f1"] == 6 / 8


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30))
def test_auc_equals_pairwise_count(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)
    pos, neg = scores[labels], scores[~labels]
    auc = roc_auc(labels, scores)
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(auc)
        return
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    assert math.isclose(auc, wins / (len(pos) * len(neg)))


def test_summary_mean_std_skips_nan():
    folds = [{"accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0, "f1": 0.5, "auc": math.nan},
             {"accuracy": 0.7, "sensitivity": 1.0, "specificity": 0.5, "f1": 0.6, "auc": 0.8},
             {"accuracy": 0.9, "sensitivity": 1.0, "specificity": 1.0, "f1": 0.7, "auc": 0.9}]
    s = summarise(folds)
    assert math.isclose(s["accuracy"]["mean"], 0.7)
    assert math.isclose(s["accuracy"]["std"], 0.2)
    assert math.isclose(s["auc"]["mean"], 0.85)
