"""The baselines: image features on shapes of known geometry, fits that see only training folds,
the results table and figures, and `naslung baselines` on a store."""

from __future__ import annotations

import numpy as np
import pytest

from naslung.cli import main
from naslung.data.labels import RATINGS
from naslung.data.store import CropStore
from naslung.train.baselines import (
    FEATURE_NAMES,
    image_features,
    principal_axes,
    run_baselines,
    surface_area,
)
from naslung.train.results import reliability, roc_curve

SIDE = 40


def ellipsoid(a: float, b: float, c: float, side: int = SIDE) -> np.ndarray:
    z, y, x = np.indices((side,) * 3) - (side - 1) / 2
    return (z / a) ** 2 + (y / b) ** 2 + (x / c) ** 2 <= 1


def feature(crop: np.ndarray, mask: np.ndarray, name: str) -> float:
    return float(image_features(crop, mask)[FEATURE_NAMES.index(name)])


def test_a_ball_has_the_volume_surface_and_sphericity_of_a_sphere():
    r = 9.0
    ball = ellipsoid(r, r, r)
    assert ball.sum() == pytest.approx(4 / 3 * np.pi * r**3, rel=0.03)
    # marching cubes follows the voxel staircase: about 10 % more area than the smooth sphere
    assert surface_area(ball) == pytest.approx(1.1 * 4 * np.pi * r**2, rel=0.04)
    sphericity = feature(np.zeros(ball.shape), ball, "sphericity")
    assert 0.88 < sphericity <= 1.0


def test_a_cube_has_six_faces_and_is_less_spherical_than_a_ball():
    cube = np.zeros((SIDE,) * 3, dtype=bool)
    cube[10:26, 10:26, 10:26] = True
    assert surface_area(cube) == pytest.approx(6 * 16**2, rel=0.06)  # marching cubes cuts corners
    assert feature(np.zeros(cube.shape), cube, "sphericity") < 0.95 * feature(
        np.zeros(cube.shape), ellipsoid(8, 8, 8), "sphericity")


def test_principal_axes_give_elongation_and_flatness():
    mask = ellipsoid(15, 8, 4)
    axes = principal_axes(mask)
    assert axes / axes[0] == pytest.approx([1, 8 / 15, 4 / 15], abs=0.03)
    crop = np.zeros(mask.shape)
    assert feature(crop, mask, "elongation") == pytest.approx(8 / 15, abs=0.03)
    assert feature(crop, mask, "flatness") == pytest.approx(4 / 15, abs=0.03)


def test_density_features_read_the_mask_and_its_shell():
    mask = ellipsoid(8, 8, 8)
    crop = np.full(mask.shape, -850.0)
    crop[mask] = 40.0
    crop[ellipsoid(3, 3, 3)] = 600.0  # a calcified centre
    f = dict(zip(FEATURE_NAMES, image_features(crop, mask), strict=True))
    calcified = ellipsoid(3, 3, 3).sum() / mask.sum()
    assert f["calcified_fraction"] == pytest.approx(calcified)
    assert f["solid_fraction"] == 1.0
    assert f["shell_mean"] == -850.0 and f["shell_std"] == 0.0
    assert f["hu_mean"] == pytest.approx(40 + 560 * calcified)
    assert f["hu_p10"] == 40.0 and f["hu_p90"] == 600.0 or calcified < 0.1
    assert f["log_volume"] == pytest.approx(np.log1p(mask.sum()))


def test_an_empty_mask_gives_finite_features():
    assert np.all(np.isfinite(image_features(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), bool))))


def write_store(root, n: int = 80, n_folds: int = 4, with_ratings: bool = True,
                flip_test_labels_of: int | None = None) -> CropStore:
    """Spheres whose size and density say the label imperfectly; two nodules per patient."""
    rng = np.random.default_rng(3)
    labels = np.arange(n) % 2
    radii = np.where(labels == 1, rng.uniform(4, 9, n), rng.uniform(2.5, 6.5, n))
    grid = np.sqrt(((np.indices((SIDE,) * 3) - SIDE / 2 + 0.5) ** 2).sum(0))
    masks = grid[None] < radii[:, None, None, None]
    crops = rng.normal(-830, 30, (n, SIDE, SIDE, SIDE))
    density = np.where(labels == 1, 40.0, -300.0) + rng.normal(0, 150, n)
    crops[masks] = np.repeat(density, masks.reshape(n, -1).sum(1))
    folds = (np.arange(n) // 2) % n_folds
    if flip_test_labels_of is not None:
        labels = np.where(folds == flip_test_labels_of, 1 - labels, labels)
    rows = []
    for i in range(n):
        row = {"id": f"n{i}", "patient": f"p{i // 2}", "series_uid": f"s{i // 2}", "fold": int(folds[i]),
               "label": int(labels[i]), "diameter_mm": round(2 * radii[i], 3)}
        if with_ratings:
            row.update({r: ";".join(str(int(v)) for v in rng.integers(1, 6, 4)) for r in RATINGS})
        rows.append(row)
    return CropStore.write(root, crops.astype(np.int16), masks, rows,
                           {"source": "synthetic", "n_folds": n_folds})


def test_every_baseline_is_fitted_on_the_training_folds_only(tmp_path):
    """Labels planted in a test fold (all flipped) change no prediction on that fold: neither
    the fit (training folds) nor the ridge choice (validation fold) has seen them."""
    plain = {b.name: b for b in run_baselines(write_store(tmp_path / "a"), [0, 1, 2, 3], 32)}
    planted = {b.name: b for b in run_baselines(write_store(tmp_path / "b", flip_test_labels_of=2),
                                                [2], 32)}
    assert set(plain) == {"size-image", "size-reader", "features", "ratings"}
    fold2 = write_store(tmp_path / "c").folds == 2
    for name, result in planted.items():
        np.testing.assert_allclose(result.probabilities[fold2], plain[name].probabilities[fold2])
        assert np.isnan(result.probabilities[~fold2]).all()  # only the asked fold is scored
    # ... while flipping the labels of a training fold does change them
    moved = {b.name: b for b in run_baselines(write_store(tmp_path / "d", flip_test_labels_of=0), [2], 32)}
    assert not np.allclose(moved["size-image"].probabilities[fold2], plain["size-image"].probabilities[fold2])


def test_size_and_density_make_informative_baselines(tmp_path):
    store = write_store(tmp_path / "s")
    from naslung.train.metrics import roc_auc

    auc = {b.name: roc_auc(store.labels, b.probabilities) for b in run_baselines(store, [0, 1, 2, 3], 32)}
    assert 0.6 < auc["size-image"] < 1.0 and 0.6 < auc["size-reader"] < 1.0
    assert auc["features"] > auc["size-image"]  # density adds what size does not say
    assert auc["ratings"] > 0.6  # noise ratings beside the diameter that carries the label


def test_a_store_without_reader_columns_gets_the_image_baselines_only(tmp_path):
    store = write_store(tmp_path / "s", with_ratings=False)
    assert [b.name for b in run_baselines(store, [1], 32)] == ["size-image", "size-reader", "features"]


def test_roc_curve_and_reliability_bins():
    labels = np.array([0, 0, 1, 1])
    fpr, tpr = roc_curve(labels, np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    predicted, observed, counts = reliability(labels, np.array([0.05, 0.15, 0.95, 1.0]))
    assert predicted == pytest.approx([0.05, 0.15, 0.975]) and observed.tolist() == [0, 0, 1]
    assert counts.tolist() == [1, 1, 2]


def test_baselines_command_writes_its_table_and_figures(tmp_path, capsys):
    store = write_store(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["baselines", "--data-dir", str(store.root), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "size-image" in printed and "optimistic" in printed
    table = (out / "results.md").read_text()
    assert "| features (14 image features, logistic) | size-image" in table
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.csv", "roc.png", "reliability.png"}
    bad_fold = ["baselines", "--data-dir", str(store.root), "--folds", "9", "--out", str(tmp_path / "x")]
    assert main(bad_fold) == 2

