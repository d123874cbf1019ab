"""CT input that would give a silently wrong answer: series edited with pydicom from the real
LIDC-IDRI-0001 slices (sheared, tilted, coronal, drifting positions), unreadable files, a short
MetaImage data file, and a volume that is not CT at all. Each is one clear line, never a crop
cut in the wrong place or an MR scored as a lung nodule."""

from __future__ import annotations

import copy
import ctypes
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import random_ensemble
from faults import one_error_line, run_naslung

from naslung.data.crop import ObliqueCTError, axis_signs
from naslung.data.ct import CTReadError, find_dicom_series, read_ct

PATIENT = "LIDC-IDRI-0001"
FIRST, COUNT = 60, 12


@pytest.fixture(scope="module")
def all_slices(shared_lidc):
    """LIDC-IDRI-0001's slices in ascending z, as pydicom datasets."""
    files = list((shared_lidc / PATIENT).rglob("*.dcm"))
    return sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def real_slices(all_slices):
    return all_slices[FIRST:FIRST + COUNT]


def write_series(folder, datasets, edit=None):
    """The slices written to ``folder``, each changed by ``edit(ds, k)`` first."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        ds = copy.deepcopy(ds)
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"{k:03d}.dcm")
    return folder


def shifted(dx_per_slice=0.0, dy_per_slice=0.0):
    def edit(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + k * dx_per_slice, y + k * dy_per_slice, z]
    return edit


GANTRY_TILT_DEG = 15.0
SLICE_MM = 2.5


@pytest.mark.parametrize("name, edit", [
    ("sheared in x", shifted(dx_per_slice=0.5)),
    ("gantry tilt", shifted(dy_per_slice=SLICE_MM * math.tan(math.radians(GANTRY_TILT_DEG)))),
])
def test_a_series_whose_slices_drift_sideways_is_refused(tmp_path, real_slices, name, edit):
    folder = write_series(tmp_path / "series", real_slices, edit)
    with pytest.raises(CTReadError, match="drift .* sideways along the stack") as error:
        read_ct(folder)
    assert "an axial series" in str(error.value) and "\n" not in str(error.value)


def test_a_slight_rounding_of_positions_is_accepted(tmp_path, real_slices):
    folder = write_series(tmp_path / "series", real_slices, shifted(dx_per_slice=0.001))
    assert read_ct(folder).hu.shape == (COUNT, 512, 512)


def coronal_orientation(ds, k):
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def test_a_coronal_orientation_over_axial_positions_is_named(tmp_path, real_slices):
    folder = write_series(tmp_path / "series", real_slices, coronal_orientation)
    with pytest.raises(CTReadError) as error:
        read_ct(folder)
    message = str(error.value)
    assert "a coronal series whose slices drift" in message and "duplicate" not in message


def test_a_true_coronal_stack_reads_but_is_not_cropped(tmp_path, real_slices):
    def edit(ds, k):
        coronal_orientation(ds, k)
        ds.ImagePositionPatient = [-166.0, -100.0 + k * SLICE_MM, -50.0]

    volume = read_ct(write_series(tmp_path / "series", real_slices, edit))
    with pytest.raises(ObliqueCTError, match="a coronal scan, not an axial one"):
        axis_signs(volume)


def test_slice_positions_that_wander_from_an_even_grid_are_refused(tmp_path, all_slices):
    # Every gap within 10 % of the median (each alone would be corrected), but the first half
    # long and the second half short: the middle slices lie about a slice off the even grid.
    count = 40
    real_slices = all_slices[FIRST:FIRST + count]
    gaps = [SLICE_MM * (1.05 if k < count // 2 else 0.95) for k in range(count - 1)]
    z0 = float(real_slices[0].ImagePositionPatient[2])

    def edit(ds, k):
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + sum(gaps[:k])]

    with pytest.raises(CTReadError, match="slice positions drift up to .* from an even spacing"):
        read_ct(write_series(tmp_path / "series", real_slices, edit))


def test_predict_refuses_a_sheared_series_with_one_line(tmp_path, real_slices):
    folder = write_series(tmp_path / "series", real_slices, shifted(dx_per_slice=3.0))
    export = random_ensemble(tmp_path / "model", ("4/4/4",))["export"]
    proc = run_naslung("predict", "--model", export, "--ct", folder, "--at", "0,0,0",
                       "--out", tmp_path / "p.json")
    assert proc.returncode == 2 and "sideways" in one_error_line(proc.stderr)
    assert not (tmp_path / "p.json").exists()


# --- files that cannot be read ------------------------------------------------------------------


def test_a_fifo_named_like_a_slice_is_reported_not_waited_on(tmp_path, real_slices):
    folder = write_series(tmp_path / "series", real_slices)
    os.mkfifo(folder / "999.dcm")
    series, problems = find_dicom_series(folder)
    assert len(series) == 1 and len(series[0].files) == COUNT
    assert problems == [f"{folder / '999.dcm'}: not a regular file"]


def without_file_permission_override() -> None:
    """In a child about to exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so that even root's new program obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def test_a_file_that_cannot_be_opened_is_reported_with_its_reason(tmp_path, real_slices):
    """Permission denied is reported, never skipped as 'not DICOM'. Root ignores file modes, so
    the reading runs in a child without that power."""
    folder = write_series(tmp_path / "series", real_slices[:3])
    (folder / "notes.txt").write_text("readers' notes")
    (folder / "notes.txt").chmod(0o000)
    (folder / "001.dcm").chmod(0o000)
    script = ("import sys; from naslung.data.ct import find_dicom_series; "
              "s, p = find_dicom_series(sys.argv[1]); print(len(s[0].files)); print(*p, sep='\\n')")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                          preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    count, *problems = proc.stdout.strip().splitlines()
    assert count == "2"
    assert sorted(problems) == [f"{folder / '001.dcm'}: cannot be read (Permission denied)",
                                f"{folder / 'notes.txt'}: cannot be read (Permission denied)"]


def test_a_short_metaimage_data_file_is_named(tmp_path):
    image = sitk.GetImageFromArray(np.full((8, 16, 16), -900, np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.mhd"))
    raw = tmp_path / "ct.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(CTReadError, match=r"ct\.raw holds 1,000 bytes, but DimSize 16 16 8 of MET_SHORT "
                                          r"needs 4,096: cut short"):
        read_ct(tmp_path / "ct.mhd")


# --- volumes that are not CT ----------------------------------------------------------------------


def brain_mr(shape=(40, 64, 64)) -> np.ndarray:
    """An MR-like volume: a bright ellipsoid of tissue (intensities 300..900) in dark background 0."""
    z, y, x = np.indices(shape)
    inside = ((z - 20) / 18) ** 2 + ((y - 32) / 28) ** 2 + ((x - 32) / 24) ** 2 < 1
    rng = np.random.default_rng(0)
    return np.where(inside, rng.integers(300, 900, shape), rng.integers(0, 20, shape)).astype(np.int16)


@pytest.mark.parametrize("name", ["brain.nii.gz", "brain.mhd"])
def test_an_mr_volume_is_refused_unless_the_user_vouches_for_it(tmp_path, name):
    sitk.WriteImage(sitk.GetImageFromArray(brain_mr()), str(tmp_path / name))
    with pytest.raises(CTReadError, match="does not look like CT in Hounsfield units"):
        read_ct(tmp_path / name)
    assert read_ct(tmp_path / name, assume_hu=True).hu.shape == (40, 64, 64)


def test_predict_refuses_an_mr_volume_and_names_the_way_out(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(brain_mr()), str(tmp_path / "brain.nii.gz"))
    export = random_ensemble(tmp_path / "model", ("4/4/4",))["export"]
    command = ["predict", "--model", export, "--ct", tmp_path / "brain.nii.gz", "--at", "32,32,20", "--voxel",
               "--out", tmp_path / "p.json"]
    proc = run_naslung(*command)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "not look like CT" in line and "--assume-hu" in line
    assert not (tmp_path / "p.json").exists()
    assert run_naslung(*command, "--assume-hu").returncode == 0  # the user's word is taken


def test_ct_without_its_rescale_to_hu_is_refused(tmp_path, real_slices):
    volume = read_ct(write_series(tmp_path / "series", real_slices))
    stored = sitk.GetImageFromArray((volume.hu.astype(np.int32) + 1024).clip(0).astype(np.int16))
    sitk.WriteImage(stored, str(tmp_path / "raw.nii.gz"))
    with pytest.raises(CTReadError, match="without its rescale to HU"):
        read_ct(tmp_path / "raw.nii.gz")


def test_a_luna16_scan_that_is_not_ct_is_skipped_with_its_reason(tmp_path, capsys):
    from naslung.cli import main

    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    (tmp_path / "luna" / "subset0").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(brain_mr()), str(tmp_path / "luna" / "subset0" / f"{uid}.mhd"))
    (tmp_path / "annotations.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},0,0,0,5\n")
    assert main(["prepare", "luna16", "--root", str(tmp_path / "luna"), "--annotations",
                 str(tmp_path / "annotations.csv"), "--data-dir", str(tmp_path / "store"), "--workers", "1",
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("naslung: skipped ") and "does not look like CT" in lines[0]
    assert lines[-1].startswith("naslung: error: no nodule was prepared")
    shutil.rmtree(tmp_path / "luna")
