"""The inclusion and labelling rule shared by every LIDC-derived source."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from naslung.data.labels import BENIGN, MALIGNANT, RATINGS, LabelRule, rating_columns

ratings = st.lists(st.integers(1, 5), min_size=1, max_size=6)


@pytest.mark.parametrize(("malignancy", "mean", "median"), [
    ([5, 5, 5, 4], MALIGNANT, MALIGNANT),
    ([2, 1, 1, 1], BENIGN, BENIGN),
    ([3, 3, 3], None, None),
    ([2, 4, 3], None, None),        # mean exactly 3
    ([4, 4, 3, 2], MALIGNANT, MALIGNANT),
    ([5, 3, 3, 2], MALIGNANT, None),  # mean 3.25, median 3
    ([3, 3, 3, 2], BENIGN, None),     # mean 2.75, median 3
    ([5, 2, 2], None, BENIGN),        # mean 3, median 2
])
def test_label_by_mean_and_median(malignancy, mean, median):
    assert LabelRule("mean").label(malignancy) == mean
    assert LabelRule("median").label(malignancy) == median


@given(ratings)
def test_mean_rule_is_the_sign_of_the_rating_sum_minus_three_per_reader(malignancy):
    excess = sum(malignancy) - 3 * len(malignancy)
    expected = None if excess == 0 else (MALIGNANT if excess > 0 else BENIGN)
    assert LabelRule("mean").label(malignancy) == expected


@given(ratings)
def test_median_rule_matches_numpy(malignancy):
    median = np.median(malignancy)
    expected = None if median == 3 else (MALIGNANT if median > 3 else BENIGN)
    assert LabelRule("median").label(malignancy) == expected


def test_inclusion_thresholds_are_configurable():
    default = LabelRule()
    assert default.includes(3, 3.0)
    assert not default.includes(2, 30.0)
    assert not default.includes(4, 2.99)
    relaxed = LabelRule(min_readers=1, min_diameter_mm=0.0)
    assert relaxed.includes(1, 0.5)


@pytest.mark.parametrize("kwargs", [{"rule": "mode"}, {"min_readers": 0},
                                    {"min_diameter_mm": -1.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LabelRule(**kwargs)


def test_no_ratings_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        LabelRule().label([])


def test_rating_columns_join_readers_in_order():
    readers = [dict.fromkeys(RATINGS, 1) | {"malignancy": m, "texture": t}
               for m, t in [(5, 5), (5, 4), (4, 5)]]
    columns = rating_columns(readers)
    assert columns["n_readers"] == 3
    assert columns["malignancy"] == "5;5;4"
    assert columns["texture"] == "5;4;5"
    assert columns["subtlety"] == "1;1;1"
    assert columns["malignancy_mean"] == pytest.approx(14 / 3, abs=1e-4)
    assert columns["malignancy_median"] == 5.0
    assert set(RATINGS) <= set(columns)
