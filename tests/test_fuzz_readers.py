"""Fuzzing the readers of user files with hypothesis: thousands of mutated DICOM, MetaImage and
NIfTI headers and search journals. Every outcome is either one clear error of the reader's own
kind or a result that agrees with what the file says: never another exception, never a crash,
never a volume placed where its headers do not put it, never a replay that trusts a wrong line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config

from naslung.cli import search_main
from naslung.data.ct import GRID_DRIFT, IN_PLANE_DRIFT, SAME_POSITION_MM, CTReadError, read_ct
from naslung.search.driver import SearchConfig, replay_journal
from naslung.search.journal import Journal, JournalError
from naslung.search.latency import search_cost
from naslung.search.space import SearchSpace

SCALE = float(os.environ.get("NASLUNG_FUZZ_SCALE", "1"))
"""Deeper runs by hand: NASLUNG_FUZZ_SCALE=20 multiplies the examples and draws new ones each run
(the default run is derandomised, so CI sees the same inputs every time)."""
EXAMPLES = {name: int(count * SCALE) for name, count in
            {"dicom": 1500, "metaimage": 600, "nifti": 600, "journal": 800}.items()}
FUZZ = settings(deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class Sample(bytes):
    """A base file's bytes, shown short in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def one_line(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# --- DICOM ---------------------------------------------------------------------------------------

SIDE, SLICES = 64, 6

anything_float = (st.floats(allow_nan=True, allow_infinity=True, width=32)
                  | st.sampled_from([0.0, -1.0, 1.0, 2.5, 0.703125, 1e9, -1e9]))
unit = st.sampled_from([0.0, 1.0, -1.0, 0.5, 0.70710678]) | anything_float
DICOM_VALUES = {
    "ImagePositionPatient": st.lists(anything_float, min_size=0, max_size=4),
    "ImageOrientationPatient": st.lists(unit, min_size=5, max_size=7),
    "PixelSpacing": st.lists(anything_float, min_size=1, max_size=3),
    "RescaleSlope": anything_float,
    "RescaleIntercept": anything_float,
    "Rows": st.integers(0, 70),
    "Columns": st.integers(0, 70),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(0, 3),
    "Modality": st.sampled_from(["CT", "MR", "", "ct", "PT"]),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3", "1.2.3.4"]),
    "PixelPaddingValue": st.integers(-40000, 70000),
}
PIXEL_KEYWORDS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                  "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "PixelPaddingValue", "PixelData",
                  "TransferSyntaxUID"}
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.4.50", "1.2.3"]


@st.composite
def dicom_mutation(draw):
    """(slice index or None for all slices, keyword, new value; None deletes the element)."""
    where = draw(st.none() | st.integers(0, SLICES - 1))
    kind = draw(st.sampled_from([*DICOM_VALUES, "delete", "PixelData", "TransferSyntaxUID"]))
    if kind == "delete":
        return where, draw(st.sampled_from(sorted(DICOM_VALUES))), None
    if kind == "PixelData":
        return where, kind, draw(st.integers(0, SIDE * SIDE * 2 + 10))
    if kind == "TransferSyntaxUID":
        return where, kind, draw(st.sampled_from(TRANSFER_SYNTAXES))
    return where, kind, draw(DICOM_VALUES[kind])


def _ds_text(value: float) -> str:
    return f"{value:.8g}"


def apply(ds, keyword: str, value) -> None:
    if keyword == "PixelData":
        ds.PixelData = ds.PixelData[:value]
    elif keyword == "TransferSyntaxUID":
        ds.file_meta.TransferSyntaxUID = value
    elif value is None:
        if keyword in ds:
            del ds[keyword]
    elif keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        setattr(ds, keyword, [_ds_text(v) for v in value])
    elif keyword in ("RescaleSlope", "RescaleIntercept"):
        setattr(ds, keyword, _ds_text(value))
    else:
        setattr(ds, keyword, value)


@pytest.fixture(scope="module")
def base_series(shared_lidc):
    """Six consecutive real LIDC-IDRI-0001 slices cut to their central 64 x 64 pixels."""
    files = list((shared_lidc / "LIDC-IDRI-0001").rglob("*.dcm"))
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    series = []
    for ds in datasets[60:60 + SLICES]:
        ds = copy.deepcopy(ds)
        pixels = ds.pixel_array[224:224 + SIDE, 224:224 + SIDE]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        spacing = [float(v) for v in ds.PixelSpacing]
        corner = (x + 224 * spacing[1], y + 224 * spacing[0], z)
        ds.ImagePositionPatient = [_ds_text(v) for v in corner]
        ds.Rows = ds.Columns = SIDE
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        series.append(ds)
    return series


@pytest.fixture(scope="module")
def base_hu(base_series, tmp_path_factory):
    folder = write_slices(tmp_path_factory.mktemp("base"), base_series, [])
    return read_ct(folder).hu


def write_slices(folder: Path, series, mutations) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, ds in enumerate(series):
        ds = copy.deepcopy(ds)
        for where, keyword, value in mutations:
            if where is None or where == i:
                apply(ds, keyword, value)
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=False)
    return folder


def check_placement(volume, folder: Path) -> None:
    """Each slice file's voxels lie where its own header says: along the normal within the
    tolerance the reader promises, in-plane within its drift tolerance."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    kept = [order[0]] + [j for i, j in zip(order[:-1], order[1:], strict=True)
                         if along[j] - along[i] > SAME_POSITION_MM]
    assert volume.hu.shape[0] == len(kept)
    spacing_z = volume.spacing[2]
    pixel = min(float(v) for v in headers[0].PixelSpacing)
    for k, j in enumerate(kept):
        offset = volume.index_to_world([k, 0, 0]) - positions[j]
        assert abs(offset @ normal) <= GRID_DRIFT * spacing_z + 1e-6
        assert np.linalg.norm(offset - (offset @ normal) * normal) <= 2 * IN_PLANE_DRIFT * pixel + 1e-6


@settings(FUZZ, max_examples=EXAMPLES["dicom"])
@given(mutations=st.lists(dicom_mutation(), min_size=1, max_size=3))
def test_mutated_dicom_headers_are_read_right_or_refused_in_one_line(base_series, base_hu, tmp_path_factory,
                                                                     mutations):
    folder = tmp_path_factory.getbasetemp() / "fuzz-dicom"
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_slices(folder, base_series, mutations)
    except Exception:  # pydicom itself cannot write this value: not an input a user can have
        assume(False)
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    try:
        volume = read_ct(folder)
    except CTReadError as err:
        assert str(folder) in one_line(err)
        event("refused")
        return
    event("read")
    check_placement(volume, folder)
    if not {keyword for _, keyword, _ in mutations} & PIXEL_KEYWORDS:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]
        z = [float(ds.ImagePositionPatient[2]) for ds in headers]
        for k, plane in enumerate(volume.hu):
            assert any(np.array_equal(plane, base_hu[i]) for i in range(SLICES)), f"slice {k} of {z}"


# --- MetaImage -------------------------------------------------------------------------------------

MHD_KEYS = ["ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData",
            "TransformMatrix", "Offset", "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing",
            "DimSize", "ElementType", "ElementDataFile", "HeaderSize", "ElementNumberOfChannels"]
tokens = st.sampled_from(["0", "1", "-1", "3", "8", "16", "2.5", "1e9", "nan", "inf", "True", "False",
                          "LOCAL", "MET_SHORT", "MET_FLOAT", "MET_UCHAR", "MET_DOUBLE", "RAI", "ct.raw",
                          "missing.raw", "", "x", "1 0 0 0 1 0 0 0 1", "0 1 0 1 0 0 0 0 1", "16 16 8",
                          "16 16 8 2"])
mhd_values = st.lists(tokens, min_size=1, max_size=4).map(" ".join)


def ct_like(shape=(8, 16, 16)) -> np.ndarray:
    rng = np.random.default_rng(0)
    volume = rng.normal(-850, 40, shape)
    volume[:, 4:12, 4:12] = 40
    return volume.astype(np.int16)


@pytest.fixture(scope="module")
def base_metaimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mhd")
    sitk.WriteImage(sitk.GetImageFromArray(ct_like()), str(folder / "ct.mhd"))
    return (folder / "ct.mhd").read_text(), Sample((folder / "ct.raw").read_bytes())


@settings(FUZZ, max_examples=EXAMPLES["metaimage"])
@given(edits=st.lists(st.tuples(st.sampled_from(MHD_KEYS), st.none() | mhd_values), min_size=1, max_size=3),
       raw_cut=st.none() | st.integers(0, 16 * 16 * 8 * 2))
def test_mutated_metaimage_headers_are_read_right_or_refused_in_one_line(base_metaimage, tmp_path_factory,
                                                                         edits, raw_cut):
    folder = tmp_path_factory.getbasetemp() / "fuzz-mhd"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    header, raw = base_metaimage
    fields = dict(line.split(" = ", 1) for line in header.strip().splitlines())
    for key, value in edits:
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    (folder / "ct.mhd").write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    (folder / "ct.raw").write_bytes(raw if raw_cut is None else raw[:raw_cut])
    check_image_outcome(folder / "ct.mhd")


def check_image_outcome(path: Path) -> None:
    """One line of the reader's own kind, or a volume with a geometry a crop can be placed by."""
    try:
        volume = read_ct(path)
    except CTReadError as err:
        assert str(path) in one_line(err)
        event("refused")
        return
    event("read")
    assert volume.hu.ndim == 3 and volume.hu.dtype == np.int16 and min(volume.hu.shape) >= 1
    direction = np.reshape(volume.direction, (3, 3))
    assert all(math.isfinite(v) and v > 0 for v in volume.spacing)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-3)
    corner = volume.index_to_world(np.array(volume.hu.shape) - 1.0)
    assert np.allclose(volume.world_to_index(corner), np.array(volume.hu.shape) - 1.0, atol=1e-6)


# --- NIfTI ------------------------------------------------------------------------------------------

NIFTI_FIELDS = {  # offset and struct format of the NIfTI-1 header fields a damaged file may have wrong
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "intent_code": (68, "<h"), "datatype": (70, "<h"),
    "bitpix": (72, "<h"), "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "xyzt_units": (123, "<B"), "qform_code": (252, "<h"), "sform_code": (254, "<h"),
    "quatern": (256, "<6f"), "srow": (280, "<12f"), "magic": (344, "<4s"),
}
small_int = st.integers(-3, 40) | st.sampled_from([0, 1, 2, 3, 4, 16, 32767, -32768])
nifti_float = (st.floats(allow_nan=True, allow_infinity=True, width=32)
               | st.sampled_from([0.0, 1.0, -1.0, 352.0, 2.5, 1e30]))


@st.composite
def nifti_edit(draw):
    field = draw(st.sampled_from(sorted(NIFTI_FIELDS)))
    offset, fmt = NIFTI_FIELDS[field]
    count = struct.calcsize(fmt) // struct.calcsize("<" + fmt[-1])
    if fmt.endswith("s"):
        values = (draw(st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"abcd"])),)
    elif fmt.endswith("f"):
        values = tuple(draw(nifti_float) for _ in range(count))
    elif fmt.endswith("B"):
        values = (draw(st.integers(0, 255)),)
    elif fmt == "<i":
        values = (draw(st.sampled_from([348, 540, 0, -1, 1 << 30])),)
    else:
        values = tuple(draw(small_int) for _ in range(count))
    return offset, struct.pack(fmt, *values)


@pytest.fixture(scope="module")
def base_nifti(tmp_path_factory):
    path = tmp_path_factory.mktemp("nii") / "ct.nii"
    sitk.WriteImage(sitk.GetImageFromArray(ct_like()), str(path))
    return Sample(path.read_bytes())


@settings(FUZZ, max_examples=EXAMPLES["nifti"])
@given(edits=st.lists(nifti_edit(), min_size=1, max_size=3), cut=st.none() | st.integers(0, 4500))
def test_mutated_nifti_headers_are_read_right_or_refused_in_one_line(base_nifti, tmp_path_factory, edits,
                                                                    cut):
    data = bytearray(base_nifti)
    for offset, packed in edits:
        data[offset:offset + len(packed)] = packed
    path = tmp_path_factory.getbasetemp() / "fuzz.nii"
    path.write_bytes(bytes(data if cut is None else data[:cut]))
    check_image_outcome(path)


# --- search journals -------------------------------------------------------------------------------

JOURNAL_SEARCH = ["--widths", "4,8", "--min-depth", "3", "--max-depth", "4", "--epochs", "1",
                  "--max-candidates", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def journal_lines(sphere_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("journal") / "run"
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), *JOURNAL_SEARCH]) == 0
    lines = (run / "journal.jsonl").read_text().splitlines()
    config = SearchConfig(**{**json.loads(lines[0])["config"], "widths": (4, 8)})
    space = SearchSpace(config.widths, config.min_depth, config.max_depth)
    return lines, config, space, search_cost(space, config.objective, head=config.head)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | anything_float
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)


@st.composite
def journal_edit(draw, n_lines: int):
    line = draw(st.integers(0, n_lines - 1))
    kind = draw(st.sampled_from(["set", "delete key", "delete line", "duplicate", "swap", "cut", "insert"]))
    if kind == "set":
        key = draw(st.sampled_from(["type", "index", "arch", "status", "score", "params", "flops", "cost",
                                    "seed", "config", "slots", "error"]))
        return kind, line, (key, draw(json_values | st.sampled_from(["4/4/4", "4/8/8", "ok", "failed"])))
    if kind == "delete key":
        return kind, line, draw(st.sampled_from(["type", "index", "arch", "status", "score", "config"]))
    if kind in ("swap", "cut"):
        return kind, line, draw(st.integers(0, max(n_lines - 1, 200)))
    if kind == "insert":
        return kind, line, draw(json_values)
    return kind, line, None


def apply_journal_edit(lines: list[str], edit) -> list[str]:
    kind, number, detail = edit
    lines = list(lines)
    number = min(number, len(lines) - 1)
    if kind in ("set", "delete key"):
        try:
            record = json.loads(lines[number])
        except ValueError:  # an earlier edit cut this line
            return lines
        if not isinstance(record, dict):
            return lines
        if kind == "set":
            record[detail[0]] = detail[1]
        else:
            record.pop(detail, None)
        lines[number] = json.dumps(record)
    elif kind == "delete line":
        del lines[number]
    elif kind == "duplicate":
        lines.insert(number, lines[number])
    elif kind == "swap":
        other = detail % len(lines)
        lines[number], lines[other] = lines[other], lines[number]
    elif kind == "cut":
        lines[number] = lines[number][:detail % (len(lines[number]) + 1)]
    else:
        lines.insert(number, json.dumps(detail))
    return lines or [""]


@settings(FUZZ, max_examples=EXAMPLES["journal"])
@given(data=st.data())
def test_mutated_journals_replay_only_what_checks_out(journal_lines, tmp_path_factory, data):
    lines, config, space, cost = journal_lines
    edits = data.draw(st.lists(journal_edit(len(lines)), min_size=1, max_size=3))
    for edit in edits:
        lines = apply_journal_edit(lines, edit)
    path = tmp_path_factory.getbasetemp() / "fuzz-journal.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        records = Journal(path).read()
        pop, _ = replay_journal(records, config, space, cost)
    except JournalError as err:
        one_line(err)
        event("refused")
        return
    event("replayed")
    for record in records:
        if record["type"] == "candidate":
            arch = space.arch(record["index"])
            assert record["arch"] == str(arch) and record["params"] == arch.params(config.head)
            assert record["flops"] == arch.flops(head=config.head)
    replayed = {e.index for e in pop.trained} | set(pop.failed)
    assert replayed == {r["index"] for r in records if r["type"] == "candidate"}
