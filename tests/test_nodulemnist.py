"""NoduleMNIST3D npz -> crop store: official split as folds, intensities unchanged, clear errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from naslung.data.nodulemnist import NoduleMNISTError, prepare_nodulemnist3d
from naslung.data.store import CropStore

SPLIT_SIZES = {"train": 12, "val": 4, "test": 6}


def medmnist_arrays(size: int = 28, channel_axis: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays in MedMNIST's layout: images (N, S, S, S[, 1]) uint8, labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        shape = (n, size, size, size) + ((1,) if channel_axis else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    return arrays


def write_npz(path, arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_prepare_keeps_the_official_split_and_values(tmp_path):
    arrays = medmnist_arrays()
    npz = write_npz(tmp_path / "nodulemnist3d.npz", arrays)
    prepare_nodulemnist3d(npz, tmp_path / "store")
    store = CropStore.open(tmp_path / "store")

    assert len(store) == sum(SPLIT_SIZES.values())
    assert store.crops.shape[1:] == (28, 28, 28) and store.crops.dtype == np.int16
    assert not store.masks.any()
    splits = store.column("split")
    for split, fold in {"train": 0, "test": 1, "val": 2}.items():
        picked = splits == split
        assert picked.sum() == SPLIT_SIZES[split]
        assert (store.folds[picked] == fold).all()
        np.testing.assert_array_equal(store.crops[picked], arrays[f"{split}_images"].astype(np.int16))
        np.testing.assert_array_equal(store.labels[picked], arrays[f"{split}_labels"][:, 0])

    row = store.rows[SPLIT_SIZES["train"]]
    assert row["id"] == row["patient"] == "nodulemnist3d-val-0"
    assert row["series_uid"] == "" and row["diameter_mm"] == ""
    manifest = store.manifest
    assert manifest["n_folds"] == 3 and manifest["test_folds"] == [1]
    assert manifest["source"] == "nodulemnist3d" and manifest["crop"] == 28
    assert manifest["intensity_window"] == [0, 255] and manifest["background_value"] == 0
    assert manifest["has_masks"] is False and "not HU" in manifest["units"]
    assert manifest["npz_sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 6, "malignant": 11, "benign": 11}
    assert {"naslung", "numpy"} <= set(manifest["versions"])


def test_prepare_accepts_64_cubes_with_a_channel_axis(tmp_path):
    arrays = medmnist_arrays(size=64, channel_axis=True, seed=1)
    store = prepare_nodulemnist3d(write_npz(tmp_path / "nodulemnist3d_64.npz", arrays), tmp_path / "store")
    assert store.crops.shape == (22, 64, 64, 64) and store.manifest["crop"] == 64
    np.testing.assert_array_equal(store.crops[-6:], arrays["test_images"][..., 0])


def test_missing_and_non_npz_files_are_reported(tmp_path):
    with pytest.raises(NoduleMNISTError, match="no file"):
        prepare_nodulemnist3d(tmp_path / "absent.npz", tmp_path / "store")
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(NoduleMNISTError, match="not an .npz archive"):
        prepare_nodulemnist3d(text, tmp_path / "store")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.pop("val_labels"), "lacks array.*val_labels"),
    (lambda a: a.update(test_images=a["test_images"][:, :, :, :20]), "must be \\(N, S, S, S\\) cubes"),
    (lambda a: a.update(train_images=a["train_images"].astype(np.float32)), "must be uint8"),
    (lambda a: a.update(train_labels=a["train_labels"][:5]), "must be \\(N, 1\\) for 12 images"),
    (lambda a: a.update(val_labels=np.full((4, 1), 2, np.uint8)), "must be 0 \\(benign\\) or 1"),
    (lambda a: a.update(val_labels=np.full((4, 1), 0.5)), "must be integers"),
    (lambda a: a.update(val_images=medmnist_arrays(size=64)["val_images"]), "different crop sizes"),
])
def test_bad_layouts_raise_one_clear_error(tmp_path, change, message):
    arrays = medmnist_arrays()
    change(arrays)
    npz = write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(NoduleMNISTError, match=message) as info:
        prepare_nodulemnist3d(npz, tmp_path / "store")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store").exists()


def test_naslung_trains_on_the_official_split_only(tmp_path, capsys):
    import json

    from naslung.cli import main

    write_npz(tmp_path / "nodulemnist3d.npz", medmnist_arrays())
    assert main(["prepare", "nodulemnist3d", "--npz", str(tmp_path / "nodulemnist3d.npz"),
                 "--data-dir", str(tmp_path / "store")]) == 0
    assert main(["train", "--data-dir", str(tmp_path / "store"), "--arch", "4/4/4", "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert config["crop"] == 28 and config["hu_window"] == [0, 255] and config["background"] == 0
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())["folds"]) == ["1"]
    capsys.readouterr()
    assert main(["train", "--data-dir", str(tmp_path / "store"), "--folds", "0", "--out",
                 str(tmp_path / "other")]) == 2
    assert "official split allows only test fold(s) [1]" in capsys.readouterr().err
