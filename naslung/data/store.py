"""`CropStore`: the one on-disk format every data source writes and training reads.

A store is a directory holding

* ``crops.npy``  (N, D, H, W) int16 Hounsfield units, 1 mm isotropic, nodule-centred;
* ``masks.npy``  (N, D, H, W) bool, the readers' 50 % consensus mask on the same grid;
* ``nodules.csv`` one row per crop: at least ``id, patient, series_uid, fold, label,
  diameter_mm``, then whatever the source adds (every reader's ratings, centroids...);
* ``manifest.json`` source, parameters, versions, counts and a SHA-256 of the arrays and table.

Stores are written and checked in a temporary sibling directory and only then renamed into
place, so a reader never sees half a store and a failed build leaves the previous store intact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CROPS_FILE = "crops.npy"
MASKS_FILE = "masks.npy"
TABLE_FILE = "nodules.csv"
MANIFEST_FILE = "manifest.json"
REQUIRED_COLUMNS = ("id", "patient", "series_uid", "fold", "label", "diameter_mm")
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A crop store that is missing, incomplete or inconsistent."""


@dataclass
class CropStore:
    """A crop store opened from disk; arrays are memory-mapped, the table is in memory."""

    root: Path
    crops: np.ndarray
    masks: np.ndarray
    rows: list[dict[str, str]]
    manifest: dict[str, Any]
    labels: np.ndarray = field(init=False)
    """0 = benign, 1 = malignant, shape (N,)."""
    folds: np.ndarray = field(init=False)
    """Cross-validation fold of each crop, shape (N,)."""
    n_folds: int = field(init=False)

    def __post_init__(self) -> None:
        where = f"crop store {self.root}"
        if self.rows:
            absent = [c for c in REQUIRED_COLUMNS if c not in self.rows[0]]
            if absent:
                raise StoreError(f"{where}: table lacks column(s) {', '.join(absent)}")
        try:
            self.labels = np.array([int(row["label"]) for row in self.rows], dtype=np.int64)
            self.folds = np.array([int(row["fold"]) for row in self.rows], dtype=np.int64)
            self.n_folds = int(self.manifest["n_folds"])
        except (KeyError, ValueError, TypeError) as err:
            raise StoreError(f"{where}: labels, folds and the manifest's n_folds must be "
                             f"integers ({err!r})") from err
        self._validate()

    @classmethod
    def open(cls, root: str | os.PathLike) -> CropStore:
        """Open and validate the store at ``root``; `StoreError` says what is wrong."""
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"no crop store at {root} (create one with `naslung prepare ...`)")
        missing = [n for n in (CROPS_FILE, MASKS_FILE, TABLE_FILE, MANIFEST_FILE)
                   if not (root / n).is_file()]
        if missing:
            raise StoreError(f"crop store {root} is incomplete: missing {', '.join(missing)}")
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text())
            crops = np.load(root / CROPS_FILE, mmap_mode="r")
            masks = np.load(root / MASKS_FILE, mmap_mode="r")
            with open(root / TABLE_FILE, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, ValueError) as err:
            raise StoreError(f"crop store {root} is unreadable: {err}") from err
        return cls(root, crops, masks, rows, manifest)

    def _validate(self) -> None:
        where = f"crop store {self.root}"
        if self.crops.ndim != 4 or self.crops.dtype != np.int16:
            raise StoreError(f"{where}: crops must be (N, D, H, W) int16, got "
                             f"{self.crops.shape} {self.crops.dtype}")
        if self.masks.shape != self.crops.shape:
            raise StoreError(f"{where}: masks {self.masks.shape} != crops {self.crops.shape}")
        if len(self.rows) != len(self.crops):
            raise StoreError(f"{where}: {len(self.rows)} table rows for {len(self.crops)} crops")
        if not set(np.unique(self.labels)) <= {0, 1}:
            raise StoreError(f"{where}: labels must be 0 (benign) or 1 (malignant)")
        if len(self) and not (0 <= self.folds.min() and self.folds.max() < self.n_folds):
            raise StoreError(f"{where}: folds must lie in 0..{self.n_folds - 1}")
        fold_of: dict[str, int] = {}
        for row, fold in zip(self.rows, self.folds, strict=True):
            if fold_of.setdefault(row["patient"], fold) != fold:
                raise StoreError(f"{where}: patient {row['patient']} is in folds "
                                 f"{fold_of[row['patient']]} and {fold}; folds must be patient-level")

    @classmethod
    def write(cls, root: str | os.PathLike, crops: np.ndarray, masks: np.ndarray,
              rows: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> CropStore:
        """Write a store atomically (replacing any store at ``root``) and open it."""
        root = Path(root)
        crops = np.ascontiguousarray(crops, dtype=np.int16)
        masks = np.ascontiguousarray(masks, dtype=bool)
        if "n_folds" not in manifest:
            raise StoreError("the manifest must say how many folds the store has ('n_folds')")
        columns = list(REQUIRED_COLUMNS) + [c for c in (rows[0] if rows else {})
                                            if c not in REQUIRED_COLUMNS]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        table_text = table.getvalue()

        digest = hashlib.sha256()
        for part in (crops, np.packbits(masks), table_text.encode()):
            digest.update(part)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "count": len(rows),
                    "crop_shape": list(crops.shape[1:]), "sha256": digest.hexdigest()}

        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            np.save(tmp / CROPS_FILE, crops)
            np.save(tmp / MASKS_FILE, masks)
            (tmp / TABLE_FILE).write_text(table_text)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for name in (CROPS_FILE, MASKS_FILE, TABLE_FILE, MANIFEST_FILE):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            cls.open(tmp)  # check the new store before it replaces anything
            replace_dir(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(root)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        """One table column as an array of strings."""
        if self.rows and name not in self.rows[0]:
            raise StoreError(f"crop store {self.root} has no column {name!r}")
        return np.array([row[name] for row in self.rows], dtype=object)

    @property
    def patients(self) -> np.ndarray:
        return self.column("patient")

    @property
    def fingerprint(self) -> str:
        """The manifest's SHA-256: identifies the exact data a model was trained on."""
        return str(self.manifest.get("sha256", ""))


def replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing what is there; ``target`` is missing
    only between two renames, and the old directory is deleted afterwards."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
