"""Patient-level stratified fold assignment."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from naslung.data.folds import assign_folds, one_fold_per_patient


@st.composite
def cohorts(draw):
    """Patients (some with several nodules), binary or 3-class labels, and a fold count."""
    n_folds = draw(st.integers(2, 8))
    n_patients = draw(st.integers(n_folds, 40))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n_patients, max_size=n_patients))
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], sizes)
    n_classes = draw(st.integers(2, 3))
    labels = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=len(patients),
                                    max_size=len(patients))))
    return patients, labels, n_folds, draw(st.integers(0, 2**32 - 1))


def class_spread(folds, labels, n_folds):
    """For each class, the most minus the fewest samples of it in one fold."""
    return {c: np.ptp(np.bincount(folds[labels == c], minlength=n_folds))
            for c in np.unique(labels)}


@given(cohorts())
def test_patients_never_straddle_folds_and_every_fold_is_used(cohort):
    patients, labels, n_folds, seed = cohort
    folds = assign_folds(patients, labels, n_folds, seed)
    assert folds.shape == patients.shape
    assert set(folds) == set(range(n_folds))
    for patient in np.unique(patients):
        assert len(set(folds[patients == patient])) == 1


@given(cohorts())
def test_classes_are_spread_evenly(cohort):
    patients, labels, n_folds, seed = cohort
    folds = assign_folds(patients, labels, n_folds, seed)
    largest_patient = np.unique(patients, return_counts=True)[1].max()
    for spread in class_spread(folds, labels, n_folds).values():
        assert spread <= 2 * largest_patient


@given(st.lists(st.integers(0, 1), min_size=2, max_size=200), st.integers(2, 10),
       st.integers(0, 1000))
def test_one_nodule_per_patient_balances_each_class_to_within_one(labels, n_folds, seed):
    n_folds = min(n_folds, len(labels))
    labels = np.array(labels)
    folds = assign_folds(np.arange(len(labels)).astype(str), labels, n_folds, seed)
    assert all(spread <= 1 for spread in class_spread(folds, labels, n_folds).values())


@given(cohorts())
def test_same_seed_same_folds(cohort):
    patients, labels, n_folds, seed = cohort
    np.testing.assert_array_equal(assign_folds(patients, labels, n_folds, seed),
                                  assign_folds(patients, labels, n_folds, seed))


def test_seed_changes_the_assignment():
    patients = np.arange(100).astype(str)
    labels = np.arange(100) % 2
    assert not np.array_equal(assign_folds(patients, labels, 5, 0),
                              assign_folds(patients, labels, 5, 1))


@pytest.mark.parametrize(("n_folds", "match"), [(1, "at least 2 folds"),
                                                (4, "3 patient")])
def test_impossible_fold_counts_are_refused(n_folds, match):
    with pytest.raises(ValueError, match=match):
        assign_folds(["a", "a", "b", "c"], [0, 1, 0, 1], n_folds, 0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        assign_folds(["a", "b"], [0], 2, 0)


def test_a_patient_with_series_in_two_luna16_subsets_lands_in_one_fold():
    # LIDC-IDRI-0332 has two series in LUNA16; subsets split series, not patients.
    patients = ["LIDC-IDRI-0332", "LIDC-IDRI-0332", "LIDC-IDRI-0332", "LIDC-IDRI-0001", "LIDC-IDRI-0003"]
    subsets = [7, 2, 7, 2, 5]
    assert one_fold_per_patient(patients, subsets).tolist() == [7, 7, 7, 2, 5]
    assert one_fold_per_patient(patients[:2], subsets[:2]).tolist() == [2, 2]  # a tie: the lower


def test_luna16_store_keeps_a_two_series_patient_in_one_fold(tmp_path):
    from naslung.data.lidc import NoduleCrops, ScanRun, write_store

    def part(patient, series, subset):
        return NoduleCrops(rows=[{"id": f"{patient}-{series}-n1", "patient": patient, "label": 1,
                                  "fold": subset}], crops=[np.zeros((4, 4, 4), np.int16)],
                           masks=[np.zeros((4, 4, 4), bool)])

    parts = [part("LIDC-IDRI-0332", "s1", 3), part("LIDC-IDRI-0332", "s2", 8),
             part("LIDC-IDRI-0001", "s1", 8)]
    store = write_store(tmp_path / "store", ScanRun(parts=parts, failed=[], warnings={}, reused=0),
                        {}, 0, 10, {"source": "luna16"}, folds_given=True)
    folds = dict(zip(store.column("id"), store.folds, strict=True))
    assert folds["LIDC-IDRI-0332-s1-n1"] == folds["LIDC-IDRI-0332-s2-n1"] == 3
    assert folds["LIDC-IDRI-0001-s1-n1"] == 8
