"""`CropStore`: the one on-disk format every data source writes and training reads.

A store is a directory holding

* ``crops.npy``  (N, D, H, W) int16 Hounsfield units, 1 mm isotropic, nodule-centred;
* ``masks.npy``  (N, D, H, W) bool, the readers' 50 % consensus mask on the same grid;
* ``nodules.csv`` one row per crop: at least ``id, patient, series_uid, fold, label,
  diameter_mm``, then whatever the source adds (every reader's ratings, centroids...);
* ``manifest.json`` source, parameters, versions, counts and a SHA-256 of the arrays and table.

Stores are written and checked in a temporary sibling directory and only then renamed into
place, so a reader never sees half a store and a failed build leaves the previous store intact.
Every writer follows one rule first (`existing_store_at`): the target is absent, an empty
folder or a crop store, never anything else, and a store built from other data or parameters is
replaced only when the user says ``--force``.

Opening a store always checks what is cheap: each array file's header and exact size against
the manifest's count and crop shape, and every table row. `CropStore.verify` also recomputes
the manifest's SHA-256 (about a second per 400 MB), which the training commands do on start.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from naslung.fileio import OutputError, fsync_tree, replace_dir, sweep_stale, temp_path

CROPS_FILE = "crops.npy"
MASKS_FILE = "masks.npy"
TABLE_FILE = "nodules.csv"
MANIFEST_FILE = "manifest.json"
REQUIRED_COLUMNS = ("id", "patient", "series_uid", "fold", "label", "diameter_mm")
FORMAT_VERSION = 1
HASH_CHUNK = 64
"""Crops hashed at a time: a multiple of 8, so the packed mask bits of a chunk are whole bytes."""


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
    verified: str = field(init=False, default="sizes and headers")
    """What was checked of the files: "sizes and headers" on open, "sha256" after `verify`."""

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
    def open(cls, root: str | os.PathLike, verify: bool = False) -> CropStore:
        """Open and check the store at ``root`` (and with ``verify`` its SHA-256);
        `StoreError` says what is wrong."""
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"no crop store at {root} (create one with `naslung prepare ...`)")
        missing = [n for n in (CROPS_FILE, MASKS_FILE, TABLE_FILE, MANIFEST_FILE)
                   if not (root / n).is_file()]
        if missing:
            raise StoreError(f"crop store {root} is incomplete: missing {', '.join(missing)}")
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text())
            if not isinstance(manifest, dict):
                raise ValueError("the manifest is not a JSON object")
            crops = _open_array(root / CROPS_FILE, manifest)
            masks = _open_array(root / MASKS_FILE, manifest)
            table = (root / TABLE_FILE).read_text()
            if table and not table.endswith("\n"):
                raise ValueError(f"{TABLE_FILE} ends in the middle of a row (cut short)")
            rows = list(csv.DictReader(io.StringIO(table, newline="")))
        except (OSError, ValueError, EOFError, UnicodeDecodeError, csv.Error) as err:
            raise StoreError(f"crop store {root} is damaged or unreadable: {err}; rebuild it "
                             "(naslung prepare ... --force)") from err
        if "count" in manifest and len(rows) != manifest["count"]:
            raise StoreError(f"crop store {root} is damaged: {TABLE_FILE} has {len(rows)} rows, its "
                             f"manifest says {manifest['count']}")
        store = cls(root, crops, masks, rows, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Recompute the SHA-256 of arrays and table; `StoreError` if it is not the manifest's."""
        expected = self.manifest.get("sha256")
        if not expected:
            raise StoreError(f"crop store {self.root} has no SHA-256 in its manifest to verify "
                             "against; rebuild it or pass --no-verify")
        try:
            table = (self.root / TABLE_FILE).read_bytes()
            found = content_digest(self.crops, self.masks, table)
        except OSError as err:
            raise StoreError(f"crop store {self.root} is unreadable: {err}") from err
        if found != expected:
            raise StoreError(f"crop store {self.root} is damaged: its files do not match the SHA-256 "
                             "in its manifest (changed or cut short since it was written); rebuild it "
                             "(naslung prepare ... --force) or pass --no-verify to use it anyway")
        self.verified = "sha256"

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
        for number, row in enumerate(self.rows, start=2):
            diameter = row.get("diameter_mm") or ""
            try:
                if diameter and not math.isfinite(float(diameter)):
                    raise ValueError(diameter)
            except ValueError as err:
                raise StoreError(f"{where}: {TABLE_FILE} line {number}: diameter_mm {diameter!r} is "
                                 "not a number") from err
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
        # Check the content before anything is written: a store that could not be opened is
        # never put in place.
        cls(root, crops, masks, list(csv.DictReader(io.StringIO(table_text))), manifest)

        manifest = {**manifest, "format_version": FORMAT_VERSION, "count": len(rows),
                    "crop_shape": list(crops.shape[1:]),
                    "sha256": content_digest(crops, masks, table_text.encode())}

        root.parent.mkdir(parents=True, exist_ok=True)
        refuse_foreign(root)
        sweep_stale(root.parent)
        tmp = temp_path(root)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            np.save(tmp / CROPS_FILE, crops)
            np.save(tmp / MASKS_FILE, masks)
            (tmp / TABLE_FILE).write_text(table_text)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            fsync_tree(tmp)
            cls.open(tmp, verify=True)  # the files on disk are the ones meant
            replace_dir(tmp, root)
        except OSError as err:
            raise OutputError(f"cannot write crop store {root}: {err.strerror or err}") from err
        except StoreError as err:
            raise OutputError(f"cannot write crop store {root}: it did not read back whole ({err}); "
                              "is the disk full?") from err
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


def content_digest(crops: np.ndarray, masks: np.ndarray, table: bytes) -> str:
    """SHA-256 of the crops' bytes, the masks packed to bits, and the table's bytes, read in
    chunks so that a memory-mapped store is hashed without loading it whole."""
    digest = hashlib.sha256()
    for start in range(0, len(crops), HASH_CHUNK):
        digest.update(np.ascontiguousarray(crops[start:start + HASH_CHUNK]))
    for start in range(0, len(masks), HASH_CHUNK):
        digest.update(np.packbits(np.asarray(masks[start:start + HASH_CHUNK])))
    digest.update(table)
    return digest.hexdigest()


def _open_array(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Memory-map a .npy after checking its header and its exact size against the manifest."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            expected = f.tell() + math.prod(shape) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
        if size != expected:
            raise ValueError(f"it holds {size} bytes, its header says {expected}")
        if "count" in manifest and "crop_shape" in manifest and \
                list(shape) != [manifest["count"], *manifest["crop_shape"]]:
            raise ValueError(f"its shape is {shape}, the manifest says "
                             f"{[manifest['count'], *manifest['crop_shape']]}")
        return np.load(path, mmap_mode="r")
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path.name}: {err}") from err


def _is_store_manifest(root: Path) -> bool:
    try:
        return "format_version" in json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def refuse_foreign(root: Path) -> None:
    """`StoreError` unless ``root`` is absent, an empty folder or a crop store: naslung never
    replaces a file or a folder of other things."""
    if not os.path.lexists(root):
        return
    if not root.is_dir():
        raise StoreError(f"{root} is a file, not a crop store; naslung will not replace it: "
                         "choose another --data-dir")
    if any(root.iterdir()) and not _is_store_manifest(root):
        raise StoreError(f"{root} is a folder of other files, not a crop store; naslung will not "
                         "replace it: choose another --data-dir (an absent or empty folder)")


def resolve_store_dir(data_dir: str | os.PathLike) -> Path:
    """The store folder ``data_dir`` names; a symbolic link to a folder stands for that folder
    (the store is replaced there, the link is kept)."""
    root = Path(data_dir).expanduser()
    if root.is_symlink():
        if not root.is_dir():
            raise StoreError(f"{root} is a symbolic link that leads to no folder; choose another "
                             "--data-dir")
        return root.resolve()
    return root


def existing_store_at(root: Path, wanted: dict[str, Any], force: bool) -> CropStore | None:
    """The rule every store writer follows before any work.

    ``root`` must be absent, an empty folder or a crop store (else `StoreError`). Returns the
    store there when its manifest has every key and value of ``wanted`` (same source and
    parameters), None when ``root`` may be written. A store built otherwise, or a damaged one,
    is replaced only with ``force``.
    """
    refuse_foreign(root)
    if not os.path.lexists(root) or not any(root.iterdir()):
        return None
    hint = "pass --force to replace it, or choose another --data-dir"
    try:
        store = CropStore.open(root)
    except StoreError as err:
        if force:
            return None
        raise StoreError(f"{err}; {hint}") from err
    changed = _differences(store.manifest, json.loads(json.dumps(wanted)))
    if not changed:
        return store
    if force:
        return None
    raise StoreError(f"{root} holds a store built from other data or parameters: {'; '.join(changed)}; "
                     f"{hint}")



def _differences(found: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``wanted``'s values that ``found`` does not have, nested dicts compared key by key."""
    changed = []
    for key, value in wanted.items():
        have = found.get(key) if isinstance(found, dict) else None
        if isinstance(value, dict) and isinstance(have, dict):
            changed += _differences(have, value, f"{prefix}{key}.")
        elif have != value:
            changed.append(f"{prefix}{key} {have!r} (store) vs {value!r} (asked)")
    return changed
