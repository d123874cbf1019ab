"""NoduleMNIST3D (MedMNIST v2) as a crop store, so naslung can train and report on a public
benchmark with published baselines.

MedMNIST's ``nodulemnist3d.npz`` (28^3) and ``nodulemnist3d_64.npz`` (64^3) hold LIDC-IDRI
nodules centre-cropped from scans resampled to 1 mm, labelled 0 benign (malignancy level 1-2)
and 1 malignant (level 4-5), level 3 left out, split 7:1:2 into train/val/test (1,158/165/310
nodules), in arrays ``{train,val,test}_images`` (N, S, S, S) uint8 and ``_labels`` (N, 1).
The images are MedMNIST's 0..255 intensities, not Hounsfield units; they are stored unchanged
(as int16) and the manifest says so, with the window ``[0, 255]`` and background 0 that
training should normalise with instead of HU.

The official split is kept as three folds, train = 0, test = 1, val = 2, with ``test_folds``
[1]: naslung's cross-validation tests fold k and validates on fold k + 1 (mod 3), so testing
fold 1 reproduces MedMNIST's train/val/test exactly, and no other fold may serve as a test.
MedMNIST publishes no patient ids (nor says whether its split keeps a patient's nodules
together), so each crop is its own patient. There are no masks and no diameters.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from naslung import __version__
from naslung.data.store import CropStore, existing_store_at, resolve_store_dir
from naslung.locking import lock_store

SOURCE = "nodulemnist3d"
SPLIT_FOLDS = {"train": 0, "test": 1, "val": 2}
TEST_FOLD = SPLIT_FOLDS["test"]
UNITS = "MedMNIST uint8 intensity, not HU"
INTENSITY_WINDOW = (0, 255)
BACKGROUND_VALUE = 0
CITATION = ("Yang J, Shi R, Wei D, et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D "
            "and 3D biomedical image classification. Scientific Data 10, 41 (2023). "
            "doi:10.1038/s41597-022-01721-8")


class NoduleMNISTError(RuntimeError):
    """A NoduleMNIST3D file that is missing or not in MedMNIST's layout."""


def prepare_nodulemnist3d(npz: Path, out: Path, force: bool = False) -> CropStore:
    """Write the crop store of MedMNIST file ``npz`` to ``out``; a store there made from another
    file is replaced only with ``force``."""
    npz = Path(npz)
    splits = _read(npz)
    out = resolve_store_dir(out)
    identity = {"source": SOURCE, "npz_sha256": _sha256(npz)}
    with lock_store(out):
        existing_store_at(out, identity, force)
        return _write_store(npz, splits, out, identity)


def _write_store(npz: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path,
                 identity: dict[str, str]) -> CropStore:
    """The store of the three splits (folds 0, 1, 2), its table and manifest."""
    size = next(iter(splits.values()))[0].shape[1]
    crops, labels, rows = [], [], []
    for split in ("train", "val", "test"):
        images, split_labels = splits[split]
        crops.append(images)
        labels.append(split_labels)
        rows += [{"id": f"{SOURCE}-{split}-{i}", "patient": f"{SOURCE}-{split}-{i}", "series_uid": "",
                  "fold": SPLIT_FOLDS[split], "label": int(label), "diameter_mm": "", "split": split}
                 for i, label in enumerate(split_labels)]
    all_labels = np.concatenate(labels)
    manifest = {
        **identity,
        "npz": npz.name,
        "n_folds": len(SPLIT_FOLDS),
        "test_folds": [TEST_FOLD],
        "split_folds": SPLIT_FOLDS,
        "crop": size,
        "units": UNITS,
        "intensity_window": list(INTENSITY_WINDOW),
        "background_value": BACKGROUND_VALUE,
        "has_masks": False,
        "counts": {**{split: len(splits[split][1]) for split in ("train", "val", "test")},
                   "malignant": int(all_labels.sum()), "benign": int((all_labels == 0).sum())},
        "citation": CITATION,
        "versions": {"naslung": __version__, "numpy": np.__version__},
    }
    stacked = np.concatenate(crops, dtype=np.int16)
    return CropStore.write(out, stacked, np.zeros(stacked.shape, dtype=bool), rows, manifest)


def _read(npz: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's images (N, S, S, S) uint8 and labels (N,), checked against MedMNIST's layout."""
    if not npz.is_file():
        raise NoduleMNISTError(f"no file {npz} (get nodulemnist3d.npz or nodulemnist3d_64.npz from "
                               f"MedMNIST: `pip install medmnist`, or https://medmnist.com)")
    if not zipfile.is_zipfile(npz):
        raise NoduleMNISTError(f"{npz} is not an .npz archive (expected MedMNIST's nodulemnist3d.npz)")
    try:
        with np.load(npz, allow_pickle=False) as archive:
            missing = [f"{split}_{kind}" for split in ("train", "val", "test")
                       for kind in ("images", "labels") if f"{split}_{kind}" not in archive.files]
            if missing:
                raise NoduleMNISTError(f"{npz} lacks array(s) {', '.join(missing)}; is it NoduleMNIST3D?")
            raw = {split: (archive[f"{split}_images"], archive[f"{split}_labels"])
                   for split in ("train", "val", "test")}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise NoduleMNISTError(f"{npz} is unreadable: {err}") from err
    splits = {split: _check_split(npz, split, images, labels) for split, (images, labels) in raw.items()}
    sizes = {split: images.shape[1] for split, (images, _) in splits.items()}
    if len(set(sizes.values())) != 1:
        raise NoduleMNISTError(f"{npz}: splits have different crop sizes {sizes}")
    return splits


def _check_split(npz: Path, split: str, images: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = f"{npz}: {split}"
    if images.ndim == 5 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 4 or not images.shape[1] == images.shape[2] == images.shape[3] or not images.shape[1]:
        raise NoduleMNISTError(f"{where}_images must be (N, S, S, S) cubes, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise NoduleMNISTError(f"{where}_images must be uint8 (MedMNIST's 0..255), got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise NoduleMNISTError(f"{where}_labels must be (N, 1) for {len(images)} images, "
                               f"got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise NoduleMNISTError(f"{where}_labels must be integers, got {labels.dtype}")
    bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if bad:
        raise NoduleMNISTError(f"{where}_labels must be 0 (benign) or 1 (malignant), found {bad[:5]}")
    return images, labels.astype(np.int64)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
