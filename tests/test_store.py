"""CropStore: round trip, validation with clear errors, and atomic replacement."""

from __future__ import annotations

import numpy as np
import pytest

from naslung.data.store import CropStore, StoreError


def rows(n, folds=None, patients=None):
    return [{"id": f"n{i}", "patient": patients[i] if patients else f"p{i}", "series_uid": "s",
             "fold": folds[i] if folds else i % 3, "label": i % 2, "diameter_mm": 5.0,
             "malignancy": "5;4;4"} for i in range(n)]


def arrays(n):
    return np.arange(n * 8, dtype=np.int16).reshape(n, 2, 2, 2), np.ones((n, 2, 2, 2), bool)


def test_round_trip(tmp_path):
    store = CropStore.write(tmp_path / "s", *arrays(6), rows(6), {"n_folds": 3, "source": "t"})
    again = CropStore.open(tmp_path / "s")
    assert np.array_equal(again.crops, arrays(6)[0]) and again.masks.all()
    assert again.labels.tolist() == [0, 1, 0, 1, 0, 1] and again.folds.tolist() == [0, 1, 2] * 2
    assert again.column("malignancy")[0] == "5;4;4"
    assert again.fingerprint == store.fingerprint and len(again.fingerprint) == 64
    assert again.manifest["count"] == 6 and again.manifest["source"] == "t"


def test_a_failed_write_keeps_the_previous_store(tmp_path):
    CropStore.write(tmp_path / "s", *arrays(4), rows(4), {"n_folds": 3})
    with pytest.raises(StoreError, match="3 table rows for 4 crops"):
        CropStore.write(tmp_path / "s", *arrays(4), rows(3), {"n_folds": 3})
    assert len(CropStore.open(tmp_path / "s")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s"], "no temporary directory is left"


def test_patients_must_not_span_folds(tmp_path):
    with pytest.raises(StoreError, match="patient p0 is in folds 0 and 1"):
        CropStore.write(tmp_path / "s", *arrays(2), rows(2, folds=[0, 1], patients=["p0", "p0"]),
                        {"n_folds": 3})


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "masks.npy").unlink(), "missing masks.npy"),
    (lambda root: (root / "crops.npy").write_bytes(b"junk"), "unreadable"),
    (lambda root: (root / "manifest.json").write_text("{}"), "n_folds"),
    (lambda root: (root / "nodules.csv").write_text(
        (root / "nodules.csv").read_text().replace(",0,5.0", ",x,5.0", 1)), "must be integers"),
])
def test_broken_stores_are_reported_clearly(tmp_path, breakage, message):
    CropStore.write(tmp_path / "s", *arrays(4), rows(4), {"n_folds": 3})
    breakage(tmp_path / "s")
    with pytest.raises(StoreError, match=message):
        CropStore.open(tmp_path / "s")


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no crop store"):
        CropStore.open(tmp_path / "nothing")
