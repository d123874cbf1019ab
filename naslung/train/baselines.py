"""Baselines beside every CNN: what simple models on the same crops, folds and labels reach.

A CNN result means little until it is set beside models that see the same thing: a ruler, and
the hand-crafted features a radiomics study would try first. Every baseline here is fitted per
test fold on exactly the nodules the CNN of that fold trained on (`FoldSplit.train`), any
choice it makes (the ridge penalty) is made on the same validation fold, and it is scored on
the same test fold, so CNN and baselines are compared pairwise on the same out-of-fold
predictions (`naslung.train.comparison`).

* ``size-image``: log consensus-mask volume (the size the CNN can see: the fair size baseline);
* ``size-reader``: log reader-measured diameter (the readers' own ruler, which the image
  shows only as far as the consensus outline keeps it);
* ``features``: standardised logistic regression on image features of the centre crop the
  CNN sees and its mask (`image_features`): the radiomics-style baseline;
* ``ratings`` (LIDC-derived stores only): the eight non-malignancy LIDC ratings (readers'
  means) and log diameter. *Optimistic*: the same readers gave the malignancy label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from naslung.data.folds import FoldSplit
from naslung.data.labels import RATINGS
from naslung.data.store import CropStore
from naslung.train.logistic import RIDGE, fit_logistic, predict_logistic
from naslung.train.metrics import binary_metrics

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Penalties tried for the multi-feature baselines; the validation fold's AUC picks one."""
SOLID_HU = -300.0
"""Voxels above this are solid tissue (ground glass lies around -700..-300 HU)."""
CALCIFIED_HU = 200.0
"""Voxels above this are calcified (soft tissue stays below ~100 HU)."""
SHELL_MM = 2
"""Width of the shell around the mask whose HU statistics describe the margin."""
FEATURE_NAMES = ("log_volume", "log_surface", "sphericity", "elongation", "flatness",
                 "hu_mean", "hu_std", "hu_p10", "hu_p50", "hu_p90", "shell_mean", "shell_std",
                 "solid_fraction", "calcified_fraction")
NON_MALIGNANCY_RATINGS = tuple(r for r in RATINGS if r != "malignancy")
BASELINE_NAMES = {
    "size-image": "size-image (log consensus-mask volume)",
    "size-reader": "size-reader (log reader-measured diameter)",
    "features": "features (14 image features, logistic)",
    "ratings": "ratings (8 LIDC ratings + diameter; optimistic)",
}


def surface_area(mask: np.ndarray) -> float:
    """Area (mm², 1 mm voxels) of the marching-cubes surface of a binary mask."""
    from skimage import measure

    if not mask.any():
        return 0.0
    padded = np.pad(mask.astype(np.float32), 1)
    vertices, faces, _, _ = measure.marching_cubes(padded, 0.5)
    return float(measure.mesh_surface_area(vertices, faces))


def principal_axes(mask: np.ndarray) -> np.ndarray:
    """Standard deviations (mm) of the mask's voxel positions along its principal axes,
    largest first."""
    points = np.argwhere(mask).astype(np.float64)
    if len(points) < 2:
        return np.zeros(3)
    eigenvalues = np.linalg.eigvalsh(np.cov(points, rowvar=False))
    return np.sqrt(np.clip(eigenvalues[::-1], 0, None))


def image_features(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`FEATURE_NAMES` of one nodule, in that order, from its HU crop and binary mask (1 mm)."""
    volume = float(mask.sum())
    area = surface_area(mask)
    sphericity = (np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else 0.0
    axes = principal_axes(mask)
    elongation = axes[1] / axes[0] if axes[0] > 0 else 1.0
    flatness = axes[2] / axes[0] if axes[0] > 0 else 1.0
    inside = crop[mask].astype(np.float64) if volume else crop.ravel()[:1].astype(np.float64)
    shell = ndimage.binary_dilation(mask, iterations=SHELL_MM) & ~mask
    around = crop[shell].astype(np.float64) if shell.any() else inside
    p10, p50, p90 = np.percentile(inside, [10, 50, 90])
    return np.array([np.log1p(volume), np.log1p(area), sphericity, elongation, flatness,
                     inside.mean(), inside.std(), p10, p50, p90, around.mean(), around.std(),
                     (inside > SOLID_HU).mean(), (inside > CALCIFIED_HU).mean()])


def centre(array: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size``^3 of a cube (all of it when smaller)."""
    lo = [max(0, (n - size) // 2) for n in array.shape[-3:]]
    return array[..., lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]


def store_features(store: CropStore, crop: int) -> np.ndarray:
    """(N, 14) image features of every nodule's centre ``crop``^3, the region the CNN sees."""
    return np.stack([image_features(centre(np.asarray(c), crop), centre(np.asarray(m), crop))
                     for c, m in zip(store.crops, store.masks, strict=True)])


def rating_means(store: CropStore) -> np.ndarray | None:
    """(N, 8) readers' mean of each non-malignancy rating, or None without rating columns."""
    if not store.rows or not all(r in store.rows[0] for r in NON_MALIGNANCY_RATINGS):
        return None
    try:
        return np.array([[np.mean([float(v) for v in str(row[r]).split(";")])
                          for r in NON_MALIGNANCY_RATINGS] for row in store.rows])
    except ValueError:
        return None


def _diameters(store: CropStore) -> np.ndarray | None:
    if not store.rows or "diameter_mm" not in store.rows[0]:
        return None
    try:
        diameters = store.column("diameter_mm").astype(np.float64)
    except ValueError:
        return None
    return diameters if np.all(np.isfinite(diameters) & (diameters > 0)) else None


def baseline_inputs(store: CropStore, crop: int) -> dict[str, np.ndarray]:
    """Each baseline's input matrix (N, k) for this store; baselines it cannot feed are left
    out (no reader diameter or ratings in a non-LIDC store)."""
    features = store_features(store, crop)
    inputs = {"size-image": features[:, :1], "features": features}
    diameters = _diameters(store)
    if diameters is not None:
        inputs["size-reader"] = np.log(diameters)[:, None]
        ratings = rating_means(store)
        if ratings is not None:
            inputs["ratings"] = np.column_stack([ratings, np.log(diameters)])
    return {name: inputs[name] for name in BASELINE_NAMES if name in inputs}


def _standardised_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> Callable[[np.ndarray], np.ndarray]:
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    coefficients = fit_logistic((x - mean) / std, y, ridge=ridge)
    return lambda rows: predict_logistic(coefficients, (rows - mean) / std)


def fit_and_predict(x: np.ndarray, labels: np.ndarray, split: FoldSplit) -> tuple[np.ndarray, float]:
    """Test-fold probabilities of a logistic regression on ``x`` fitted on ``split.train``
    only, with the ridge penalty that scores best on ``split.val`` (one feature: the fixed
    tiny ridge of `fit_logistic`); also the chosen ridge."""
    train_y = labels[split.train]
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"test fold {split.test_fold}: the training folds hold only "
                         f"{'malignant' if train_y[0] else 'benign'} nodules ({len(train_y)}); a "
                         "baseline needs both classes to learn from")
    best, best_score, chosen = None, -np.inf, RIDGE
    for ridge in RIDGES if x.shape[1] > 1 else (RIDGE,):
        model = _standardised_fit(x[split.train], train_y, ridge)
        metrics = binary_metrics(labels[split.val], model(x[split.val]))
        score = metrics["auc"] if not np.isnan(metrics["auc"]) else metrics["accuracy"]
        if best is None or score > best_score:
            best, best_score, chosen = model, score, ridge
    assert best is not None
    return best(x[split.test]), chosen


@dataclass
class BaselineResult:
    """One baseline's out-of-fold probabilities (NaN outside the scored folds)."""

    name: str
    probabilities: np.ndarray
    ridges: dict[int, float]
    n_coefficients: int


def run_baselines(store: CropStore, folds: list[int], crop: int = 32) -> list[BaselineResult]:
    """Every baseline this store can feed, fitted and scored per test fold in ``folds``."""
    inputs = baseline_inputs(store, crop)
    results = []
    for name, x in inputs.items():
        probabilities = np.full(len(store), np.nan)
        ridges = {}
        for fold in folds:
            split = FoldSplit.of(store.folds, fold, store.n_folds)
            probabilities[split.test], ridges[fold] = fit_and_predict(x, store.labels, split)
        results.append(BaselineResult(name, probabilities, ridges, x.shape[1] + 1))
    return results
