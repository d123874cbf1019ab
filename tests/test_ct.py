"""CT reading: real LIDC-IDRI slices read as SimpleITK reads them, geometry that round-trips,
and every kind of broken input refused with one clear line (or handled with a warning)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from naslung.data.ct import CTReadError, CTVolume, DicomSeries, find_dicom_series, read_ct, read_dicom_series

PATIENT = "LIDC-IDRI-0001"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
FIRST = 60  # the small test series are slices FIRST.. of LIDC-IDRI-0001 (by position)


@pytest.fixture(scope="module")
def series_folder(shared_lidc) -> Path:
    return next((shared_lidc / PATIENT).glob("*/*"))


@pytest.fixture(scope="module")
def sorted_files(series_folder) -> list[Path]:
    """The patient's slice files in ascending z."""
    files = sorted(series_folder.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [files[i] for i in np.argsort(z)]


@pytest.fixture(scope="module")
def volume(series_folder) -> CTVolume:
    series, problems = find_dicom_series(series_folder)
    assert problems == [] and len(series) == 1
    return read_dicom_series(series[0])


@pytest.fixture
def small(tmp_path, sorted_files) -> Path:
    """A folder with 10 consecutive real slices, to break in each test."""
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted_files[FIRST:FIRST + 10]:
        shutil.copy(f, folder / f.name)
        (folder / f.name).chmod(0o644)
    return folder


def slice_files(folder: Path) -> list[Path]:
    """The series' files in ascending z."""
    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])
    return sorted(folder.glob("*.dcm"), key=z)


def edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def refused(call, *words: str) -> str:
    """Assert ``call()`` raises a one-line CTReadError that mentions every word; return the message."""
    with pytest.raises(CTReadError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# --- the real series -------------------------------------------------------------------------


def test_find_dicom_series_lists_each_patient_once(shared_lidc):
    series, problems = find_dicom_series(shared_lidc)
    assert problems == []
    assert [(s.patient_id, len(s.files)) for s in series] == [(PATIENT, 133), ("LIDC-IDRI-0003", 140)]
    assert series[0].series_uid == SERIES_UID
    assert series[0].folder.name == SERIES_UID
    assert all(f.suffix == ".dcm" for s in series for f in s.files)  # the XML readings are skipped


def test_lidc_volume_is_what_the_headers_say(volume, sorted_files):
    assert volume.hu.shape == (133, 512, 512) and volume.hu.dtype == np.int16
    assert volume.spacing == pytest.approx((0.703125, 0.703125, 2.5))
    assert (volume.series_uid, volume.patient_id, volume.modality) == (SERIES_UID, PATIENT, "CT")
    assert volume.warnings == []
    assert volume.hu.min() == -1024  # the -2048 outside-of-field padding is now air
    assert np.mean((volume.hu > -950) & (volume.hu < -700)) > 0.05  # aerated lung
    assert np.mean(volume.hu > 0) > 0.05  # soft tissue and bone
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted_files]
    assert np.all(np.diff(volume.slice_z) > 0)
    np.testing.assert_allclose(volume.slice_z, [float(h.ImagePositionPatient[2]) for h in headers])
    assert volume.origin == pytest.approx([float(v) for v in headers[0].ImagePositionPatient])


def test_read_ct_folder_reads_the_same_volume(shared_lidc, volume):
    again = read_ct(shared_lidc / PATIENT)  # the patient folder: study/series below it
    assert np.array_equal(again.hu, volume.hu)
    assert (again.spacing, again.origin, again.direction) == (volume.spacing, volume.origin, volume.direction)
    assert again.source == shared_lidc / PATIENT


def test_matches_a_bare_simpleitk_series_read(series_folder, volume):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_folder)))
    image = reader.Execute()
    expected = sitk.GetArrayFromImage(image)
    expected[expected <= -1500] = -1024
    assert np.array_equal(volume.hu, expected)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing())
    np.testing.assert_allclose(volume.origin, image.GetOrigin())
    np.testing.assert_allclose(volume.direction, image.GetDirection())


# --- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.mhd", "ct.nii.gz"])
def test_written_and_read_back_unchanged(tmp_path, volume, name):
    part = volume.to_sitk()[100:400, 120:420, 40:100]  # a block keeps .nii.gz writing fast
    sitk.WriteImage(part, str(tmp_path / name))
    back = read_ct(tmp_path / name)
    assert np.array_equal(back.hu, volume.hu[40:100, 120:420, 100:400])
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    corner = volume.index_to_world([40, 120, 100])
    np.testing.assert_allclose(back.index_to_world([0, 0, 0]), corner, atol=1e-4)
    np.testing.assert_allclose(back.slice_z, volume.slice_z[40:100], atol=1e-4)
    assert back.series_uid == ("ct" if name == "ct.mhd" else None)
    assert back.warnings == []


rotations = st.lists(st.floats(-1, 1), min_size=9, max_size=9).filter(lambda v: abs(np.linalg.det(
    np.reshape(v, (3, 3)))) > 0.1).map(lambda v: np.linalg.qr(np.reshape(v, (3, 3)))[0])


@settings(max_examples=30, deadline=None)
@given(rotation=rotations, spacing=st.tuples(*[st.floats(0.3, 5)] * 3),
       origin=st.tuples(*[st.floats(-400, 400)] * 3), points=st.lists(
           st.tuples(*[st.floats(-50, 600)] * 3), min_size=1, max_size=5))
def test_index_world_mapping_honours_direction(rotation, spacing, origin, points):
    ct = CTVolume(hu=np.zeros((4, 5, 6), np.int16), spacing=spacing, origin=origin,
                  direction=tuple(rotation.ravel()), slice_z=np.zeros(4), series_uid=None, patient_id=None,
                  modality=None, source=Path("synthetic"))
    image = ct.to_sitk()
    zyx = np.array(points)
    world = ct.index_to_world(zyx)
    expected = [image.TransformContinuousIndexToPhysicalPoint(p[::-1].tolist()) for p in zyx]
    np.testing.assert_allclose(world, expected, atol=1e-6)
    np.testing.assert_allclose(ct.world_to_index(world), zyx, atol=1e-6)
    assert ct.index_to_world(zyx.reshape(1, -1, 3)).shape == (1, len(points), 3)


def test_mapping_refuses_points_without_three_coordinates(volume):
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        volume.index_to_world([1.0, 2.0])


# --- the small series, intact and handled ----------------------------------------------------


def test_small_series_is_part_of_the_whole(small, volume):
    part = read_ct(small)
    assert np.array_equal(part.hu, volume.hu[FIRST:FIRST + 10])
    np.testing.assert_allclose(part.slice_z, volume.slice_z[FIRST:FIRST + 10])
    assert part.spacing == volume.spacing and part.warnings == []


def test_xml_and_other_files_beside_the_slices_are_ignored(small, series_folder):
    shutil.copy(next(series_folder.glob("*.xml")), small / "069.xml")
    (small / "broken.xml").write_text("<LidcReadMessage><unclosed")
    (small / "notes").mkdir()
    (small / "notes" / "README.txt").write_text("not an image")
    assert len(read_ct(small).hu) == 10
    series, problems = find_dicom_series(small)
    assert problems == [] and len(series[0].files) == 10


def test_identical_duplicate_slice_is_dropped_with_a_warning(small):
    original = slice_files(small)[4]
    shutil.copy(original, small / "copy.dcm")
    ct = read_ct(small)
    assert len(ct.hu) == 10
    assert len(ct.warnings) == 1 and "duplicate slice" in ct.warnings[0] and original.name in ct.warnings[0]


def test_slightly_uneven_spacing_is_corrected_with_a_warning(small, volume):
    moved = slice_files(small)[4]
    position = [float(v) for v in pydicom.dcmread(moved).ImagePositionPatient]
    edit(moved, ImagePositionPatient=[*position[:2], position[2] + 0.1])  # 4 % of 2.5 mm
    ct = read_ct(small)
    assert len(ct.warnings) == 1 and "uneven slice spacing" in ct.warnings[0]
    assert ct.spacing[2] == pytest.approx(2.5)  # the mean, first to last
    assert ct.slice_z[4] == pytest.approx(volume.slice_z[FIRST + 4] + 0.1)


def test_implicit_vr_slices_are_read(small, volume):
    for path in slice_files(small)[::2]:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True)
    assert np.array_equal(read_ct(small).hu, volume.hu[FIRST:FIRST + 10])


def test_compressed_slices_are_decoded(small, volume):
    for path in slice_files(small)[3:6]:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert np.array_equal(read_ct(small).hu, volume.hu[FIRST:FIRST + 10])


def test_rescale_slope_other_than_one(small, volume):
    for path in slice_files(small):
        edit(path, RescaleSlope=2, RescaleIntercept=-2048)
    expected = (volume.hu[FIRST:FIRST + 10].astype(np.int32) + 1024) * 2 - 2048
    expected[expected <= -1500] = -1024
    assert np.array_equal(read_ct(small).hu, expected)


def test_bits_above_bits_stored_are_masked(small, volume):
    """12-bit unsigned pixels with junk (overlay) bits above bit 11, as some scanners write them."""
    for path in slice_files(small):
        ds = pydicom.dcmread(path)
        raw = np.clip(ds.pixel_array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16) | 0xF000
        ds.PixelData, ds.PixelRepresentation, ds.BitsStored, ds.HighBit = raw.tobytes(), 0, 12, 11
        ds.RescaleIntercept = -2048
        ds.save_as(path)
    expected = np.clip(volume.hu[FIRST:FIRST + 10].astype(np.int32) + 2048, 0, 4095) - 2048
    expected[expected <= -1500] = -1024
    assert np.array_equal(read_ct(small).hu, expected)


def test_pixel_padding_value_inside_the_tissue_range_becomes_air(small, volume):
    part = volume.hu[FIRST:FIRST + 10]
    assert np.any(part == -1000)
    for path in slice_files(small):
        edit(path, PixelPaddingValue=24)  # raw 24 = -1000 HU after the -1024 intercept
    assert np.array_equal(read_ct(small).hu, np.where(part == -1000, -1024, part))


# --- broken input, refused -------------------------------------------------------------------


def test_truncated_file_is_refused_and_reported(small):
    broken = slice_files(small)[5]
    broken.write_bytes(broken.read_bytes()[:100_000])
    refused(lambda: read_ct(small), broken.name, "truncated")
    series, problems = find_dicom_series(small)
    assert len(series[0].files) == 9 and broken not in series[0].files
    assert len(problems) == 1 and broken.name in problems[0] and "truncated" in problems[0]
    refused(lambda: read_dicom_series(DicomSeries(SERIES_UID, PATIENT, small, slice_files(small))),
            broken.name, "truncated")


def test_zero_byte_file_is_refused_and_reported(small):
    (small / "000999.dcm").touch()
    (small / "empty.txt").touch()  # not claiming to be DICOM: ignored
    refused(lambda: read_ct(small), "000999.dcm", "empty file")
    series, problems = find_dicom_series(small)
    assert len(series[0].files) == 10 and len(problems) == 1 and "000999.dcm" in problems[0]


def test_dcm_file_that_is_not_dicom_is_reported(small):
    (small / "junk.dcm").write_text("hello")
    series, problems = find_dicom_series(small)
    assert len(series[0].files) == 10 and len(problems) == 1 and "not a DICOM file" in problems[0]


def test_missing_slice_is_refused_naming_the_gap(small, volume):
    slice_files(small)[4].unlink()
    message = refused(lambda: read_ct(small), "missing slices")
    assert f"{volume.slice_z[FIRST + 3]:.2f}" in message and f"{volume.slice_z[FIRST + 5]:.2f}" in message


def test_very_uneven_spacing_is_refused(small):
    moved = slice_files(small)[4]
    position = [float(v) for v in pydicom.dcmread(moved).ImagePositionPatient]
    edit(moved, ImagePositionPatient=[*position[:2], position[2] + 0.6])  # 24 % of 2.5 mm
    refused(lambda: read_ct(small), "uneven slice spacing", "cannot be corrected")


def test_different_slices_at_one_position_are_refused(small):
    original = slice_files(small)[4]
    ds = pydicom.dcmread(original)
    ds.PixelData = (ds.pixel_array + 10).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(small / "other.dcm")
    refused(lambda: read_ct(small), "duplicate slice position", "different pixel data")


def test_non_ct_series_is_refused(small):
    for path in slice_files(small):
        edit(path, Modality="MR")
    refused(lambda: read_ct(small), "modality MR", "not CT")


def test_two_series_in_one_folder_are_refused(small):
    for path in slice_files(small)[:3]:
        edit(path, SeriesInstanceUID="1.2.3.4")
    refused(lambda: read_ct(small), "2 series", "1.2.3.4", SERIES_UID)
    series, problems = find_dicom_series(small)
    assert [len(s.files) for s in sorted(series, key=lambda s: s.series_uid)] == [3, 7] and problems == []
    everything = DicomSeries(SERIES_UID, PATIENT, small, sorted(small.glob("*.dcm")))
    refused(lambda: read_dicom_series(everything), "mixed series", "1.2.3.4")


def test_single_slice_is_refused(small):
    for path in slice_files(small)[1:]:
        path.unlink()
    refused(lambda: read_ct(small), "single-slice series")


def test_inconsistent_image_size_is_refused(small):
    path = slice_files(small)[3]
    ds = pydicom.dcmread(path)
    ds.PixelData, ds.Rows, ds.Columns = ds.pixel_array[::2, ::2].tobytes(), 256, 256
    ds.save_as(path)
    refused(lambda: read_ct(small), path.name, "inconsistent image size 256x256")


@pytest.mark.parametrize("name, content, words", [
    ("nowhere", None, ("nowhere", "no such file or folder")),
    ("note.txt", b"x", ("note.txt", "unsupported file type")),
    ("a.dcm", b"x", ("a.dcm", "one DICOM slice")),
    ("b.mhd", b"NDims = 3\nElementDataFile = b.raw\n", ("b.raw", "missing")),
    ("c.nii.gz", b"not gzip", ("c.nii.gz",)),
])
def test_unusable_paths_are_refused(tmp_path, name, content, words):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    refused(lambda: read_ct(tmp_path / name), *words)


def test_empty_folder_is_refused(tmp_path):
    refused(lambda: read_ct(tmp_path), str(tmp_path), "no DICOM files found")


def test_folder_with_only_xml_is_refused(tmp_path, series_folder):
    shutil.copy(next(series_folder.glob("*.xml")), tmp_path / "069.xml")
    refused(lambda: read_ct(tmp_path), "no DICOM files found")
    assert find_dicom_series(tmp_path) == ([], [])


def test_find_refuses_a_missing_folder(tmp_path):
    refused(lambda: find_dicom_series(tmp_path / "nowhere"), "no such folder")
