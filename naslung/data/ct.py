"""Read a chest CT (DICOM series, MetaImage or NIfTI) into Hounsfield units, refusing bad input.

A crop is only as good as the volume it was cut from: a missing slice, a duplicate or two
series mixed in one folder silently shift every nodule coordinate. So every problem found is
either handled and recorded in `CTVolume.warnings` or raised as a one-line `CTReadError`
that names the file and what is wrong.

A volume is only accepted as a regular grid: DICOM slices must lie along their normal (a
tilted-gantry or sheared series, whose positions drift in-plane, is refused) and within half a
slice of evenly spaced positions. NIfTI and MetaImage files carry no modality, so their values
must look like CT in Hounsfield units (air at about -1000 HU) unless the caller vouches for them
(``assume_hu``): an MR or PET volume, or a CT stored without its rescale to HU, is refused.

DICOM is read in two passes: pydicom reads every header (to group, sort and check the slices
before any pixel is touched), then the uncompressed pixel bytes of each slice go straight
into the output volume in sorted order, faster than SimpleITK's series reader. Compressed
slices are decoded by SimpleITK's GDCM, which knows every codec. SimpleITK and pydicom are
imported where used, so this module imports without them.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK

AIR_HU = -1024
PADDING_HU = -1500
"""Values at or below this are outside-of-field padding (-2048, -3024...), never tissue."""
MISSING_GAP = 1.5
"""A gap longer than this many median slice spacings means slices are missing."""
UNEVEN_LIMIT = 0.10
"""Slice gaps up to this fraction off the median are corrected (mean spacing); more is an error."""
UNEVEN_WARN = 0.01
"""Gaps closer than this to the median are rounding in the headers, not worth a warning."""
SAME_POSITION_MM = 0.01
GEOMETRY_TOLERANCE = 1e-4
IN_PLANE_DRIFT = 0.25
"""Slice positions may stray off the stack's normal by this fraction of a pixel (rounding in
the headers); more is a tilted-gantry or sheared series, which no regular grid describes."""
GRID_DRIFT = 0.5
"""A slice may lie this fraction of the mean spacing off the even grid the volume assumes;
further, and crops would be cut half a slice or more from where the nodule is."""
AIR_PERCENTILE = 1.0
AIR_HU_MAX = -700.0
"""In a chest CT in HU the darkest `AIR_PERCENTILE` % of voxels is air or lung (about -1000 to
-800 HU). An MR or PET volume, or CT without its rescale to HU, has nothing that dark."""
MAX_SPACING_MM = 100.0
MAX_COORDINATE_MM = 1e5
"""Voxel sizes and world positions beyond these (100 mm, 100 m) come from damaged headers."""
MAX_VOXELS = 1 << 30
"""More voxels than any CT (1024^3): a header that claims more is damaged."""
_MHD_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                      "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_FLOAT": 4,
                      "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}

_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
_LONG_LENGTH_VRS = (b"OB", b"OW", b"UN")


class CTReadError(RuntimeError):
    """A CT that cannot be used; str(err) is one clear line naming the path and the problem."""


class _Problem(Exception):
    """What is wrong with one file; `_read_slice` adds the path and turns it into a CTReadError."""


@dataclass
class CTVolume:
    """A CT in int16 HU with its world geometry (SimpleITK conventions, DICOM LPS coordinates)."""

    hu: np.ndarray
    """(z, y, x) int16 Hounsfield units; outside-of-field padding set to -1024 (air)."""
    spacing: tuple[float, float, float]
    """(x, y, z) mm, SimpleITK order."""
    origin: tuple[float, float, float]
    """World (x, y, z) mm of voxel (0, 0, 0)."""
    direction: tuple[float, ...]
    """9 values, row-major: column j is the world direction of index axis j (x, y, z)."""
    slice_z: np.ndarray
    """(z,) world z (mm) of each slice, in array order."""
    series_uid: str | None
    patient_id: str | None
    modality: str | None
    source: Path
    warnings: list[str] = field(default_factory=list)
    """Non-fatal problems found and handled."""

    def _index_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing, dtype=float)

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) indices, shape (..., 3) -> world (x, y, z) mm."""
        zyx = _points(zyx, "index_to_world")
        return zyx[..., ::-1] @ self._index_matrix().T + np.asarray(self.origin, dtype=float)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """World (x, y, z) mm, shape (..., 3) -> continuous (z, y, x) indices."""
        xyz = _points(xyz, "world_to_index")
        inverse = np.linalg.inv(self._index_matrix())
        return ((xyz - np.asarray(self.origin, dtype=float)) @ inverse.T)[..., ::-1]

    def to_sitk(self) -> SimpleITK.Image:
        """This volume as an int16 SimpleITK image with the same geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.hu, dtype=np.int16))
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetOrigin([float(v) for v in self.origin])
        image.SetDirection([float(v) for v in self.direction])
        return image


@dataclass
class DicomSeries:
    """The files of one DICOM series, found by `find_dicom_series` (headers only, no pixels)."""

    series_uid: str
    patient_id: str | None
    folder: Path
    files: list[Path]
    headers: list[_Slice] = field(default_factory=list, repr=False, compare=False)
    """The headers `find_dicom_series` parsed, so reading the series does not parse them again."""


def find_dicom_series(root: str | os.PathLike) -> tuple[list[DicomSeries], list[str]]:
    """Every DICOM series under ``root`` (any depth), and one line per broken .dcm file left out.

    Files that are not DICOM (the LIDC XML readings, notes) are skipped silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise CTReadError(f"{root}: no such folder")
    slices, problems = _scan(root)
    series = [DicomSeries(uid, group[0].patient_id, _common_folder(group), [s.path for s in group], group)
              for uid, group in _group_by_series(slices).items()]
    series.sort(key=lambda s: (s.patient_id or "", s.series_uid))
    return series, problems


def read_dicom_series(series: DicomSeries) -> CTVolume:
    """Read and check one series found by `find_dicom_series` (or listed by hand: then its
    headers are read here)."""
    if not series.files:
        raise CTReadError(f"{series.folder}: series {series.series_uid} lists no files")
    headers = series.headers or [_read_slice(Path(path), required=True) for path in series.files]
    return _assemble(headers, series.folder)


def read_ct(path: str | os.PathLike, assume_hu: bool = False) -> CTVolume:
    """A folder holding exactly one DICOM series, a MetaImage (.mhd + data file) or a NIfTI (.nii, .nii.gz).

    For .mhd the series UID is the file stem, as LUNA16 names its files ``<seriesuid>.mhd``.
    A .mhd or NIfTI must hold values that look like CT in HU unless ``assume_hu``.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_folder(path)
    if not path.exists():
        raise CTReadError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(".mhd"):
        return _read_image_file(path, series_uid=path.stem, assume_hu=assume_hu)
    if name.endswith((".nii", ".nii.gz")):
        return _read_image_file(path, series_uid=None, assume_hu=assume_hu)
    if name.endswith(".dcm"):
        raise CTReadError(f"{path}: one DICOM slice; pass the folder that holds the whole series")
    raise CTReadError(f"{path}: unsupported file type; expected a DICOM folder, .mhd, .nii or .nii.gz")


@dataclass
class _Slice:
    """What one DICOM file's header says, and where its pixel bytes start."""

    path: Path
    series_uid: str
    patient_id: str | None
    modality: str | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    frames: int
    slope: float
    intercept: float
    padding: int | None
    little_endian: bool
    pixel_offset: int | None = None
    """File offset of uncompressed pixel data; None when compressed (GDCM decodes those)."""

    @property
    def nbytes(self) -> int:
        return self.rows * self.columns * self.bits_allocated // 8 * self.samples * self.frames


def _read_dicom_folder(folder: Path) -> CTVolume:
    slices, problems = _scan(folder)
    if problems:
        more = f" (and {len(problems) - 1} more broken file(s))" if len(problems) > 1 else ""
        raise CTReadError(problems[0] + more)
    groups = _group_by_series(slices)
    if not groups:
        raise CTReadError(f"{folder}: no DICOM files found")
    if len(groups) > 1:
        raise CTReadError(f"{folder}: holds {len(groups)} series, expected one: {_describe_series(groups)}; "
                          "read them one by one with find_dicom_series + read_dicom_series")
    return _assemble(next(iter(groups.values())), folder)


def _scan(root: Path) -> tuple[list[_Slice], list[str]]:
    slices, problems = [], []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            try:
                found = _read_slice(Path(folder) / name, required=False)
            except CTReadError as err:
                problems.append(str(err))
                continue
            if found is not None:
                slices.append(found)
    return slices, problems


def _read_slice(path: Path, required: bool) -> _Slice | None:
    """One file's header; None for a file that is not DICOM and does not claim to be (no .dcm)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    claimed = required or path.suffix.lower() == ".dcm"
    try:
        mode = os.stat(path).st_mode
        fp = open(path, "rb") if stat.S_ISREG(mode) else None
    except OSError as err:  # permission denied, a dangling link...: never skipped silently
        raise CTReadError(f"{path}: cannot be read ({err.strerror or _one_line(err)})") from None
    if fp is None:  # a FIFO or device would block or stream forever
        if not claimed:
            return None
        raise CTReadError(f"{path}: not a regular file")
    try:
        with fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise _Problem("empty file (0 bytes)")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
            except InvalidDicomError:
                raise _Problem("not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
            if any(keyword not in ds for keyword in ("SeriesInstanceUID", "Rows", "Columns")):
                raise _Problem("not a DICOM image (no SeriesInstanceUID, Rows or Columns; truncated header?)")
            claimed = True
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            found = _slice_from_header(path, ds, little_endian=syntax != _EXPLICIT_BE)
            if syntax in (_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE):
                found.pixel_offset = _pixel_offset(fp, size, found, implicit_vr=syntax == _IMPLICIT_LE)
            return found
    except Exception as err:  # pydicom and the OS raise many exception types for broken files
        if not claimed:
            return None
        problem = str(err) if isinstance(err, _Problem) else f"unreadable DICOM ({_one_line(err)})"
        raise CTReadError(f"{path}: {problem}") from None


def _slice_from_header(path: Path, ds, little_endian: bool) -> _Slice:
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits_allocated = int(ds.get("BitsAllocated", 16))
    if bits_allocated not in (8, 16, 32):
        raise _Problem(f"BitsAllocated {bits_allocated}; expected 8, 16 or 32")
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        padding = int(padding)
        if signed and padding >= 1 << (bits_allocated - 1):  # stored as US though the pixels are signed
            padding -= 1 << bits_allocated
    found = _Slice(
        path=path, series_uid=str(ds.SeriesInstanceUID), patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality"), position=_floats(ds, "ImagePositionPatient", 3),
        orientation=_floats(ds, "ImageOrientationPatient", 6), pixel_spacing=_floats(ds, "PixelSpacing", 2),
        rows=int(ds.Rows), columns=int(ds.Columns), bits_allocated=bits_allocated,
        bits_stored=int(ds.get("BitsStored", bits_allocated)), signed=signed,
        samples=int(ds.get("SamplesPerPixel", 1)), frames=int(ds.get("NumberOfFrames", 1) or 1),
        slope=float(ds.get("RescaleSlope", 1) or 1), intercept=float(ds.get("RescaleIntercept", 0) or 0),
        padding=padding, little_endian=little_endian)
    if found.rows < 1 or found.columns < 1:
        raise _Problem(f"image size {found.rows}x{found.columns} holds no pixel")
    if not 1 <= found.bits_stored <= found.bits_allocated:
        raise _Problem(f"BitsStored {found.bits_stored} does not fit BitsAllocated {found.bits_allocated}")
    if not (math.isfinite(found.slope) and math.isfinite(found.intercept)):
        raise _Problem(f"RescaleSlope {found.slope} or RescaleIntercept {found.intercept} is not finite")
    return found


def _pixel_offset(fp, size: int, found: _Slice, implicit_vr: bool) -> int:
    """Where the pixel bytes start, once sure they are all in the file (pydicom reads short data silently)."""
    endian = "<" if found.little_endian else ">"
    head = fp.read(8)
    if len(head) < 8 or struct.unpack(endian + "HH", head[:4]) != (0x7FE0, 0x0010):
        raise _Problem("no pixel data (7FE0,0010)")
    if implicit_vr:
        length = struct.unpack(endian + "I", head[4:])[0]
    elif head[4:6] in _LONG_LENGTH_VRS:
        length = struct.unpack(endian + "I", fp.read(4))[0]
    else:
        length = struct.unpack(endian + "H", head[6:])[0]
    offset = fp.tell()
    present = min(length, size - offset)
    if present < found.nbytes:
        raise _Problem(_truncated(present, found))
    return offset


def _truncated(present: int, found: _Slice) -> str:
    return (f"truncated: pixel data holds {present} of the {found.nbytes} bytes that "
            f"{found.rows} rows x {found.columns} columns x {found.bits_allocated} bits need")


def _assemble(slices: list[_Slice], source: Path) -> CTVolume:
    """Check a series' slices, sort them along the slice normal and read them into one volume."""
    _check_series(slices, source)
    first = slices[0]
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise CTReadError(f"{first.path}: ImageOrientationPatient {first.orientation} is not two "
                          "orthogonal unit vectors")
    _check_stacked_along_normal(slices, normal, source)
    along = np.array([s.position for s in slices]) @ normal
    order = np.argsort(along, kind="stable")
    slices, along = [slices[i] for i in order], along[order]
    slices, along, warnings = _drop_duplicates(slices, along)
    if len(slices) < 2:
        raise CTReadError(f"{source}: only one distinct slice position; a CT volume needs at least 2")
    slice_z = np.array([s.position[2] for s in slices])
    warnings += _check_spacing(along, slice_z, source)
    hu, pixel_warnings = _hu_volume(slices)
    z_spacing = float((along[-1] - along[0]) / (len(along) - 1))
    return CTVolume(
        hu=hu, spacing=(first.pixel_spacing[1], first.pixel_spacing[0], z_spacing),
        origin=tuple(float(v) for v in slices[0].position),
        direction=tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()),
        slice_z=slice_z, series_uid=first.series_uid, patient_id=first.patient_id, modality=first.modality,
        source=source, warnings=warnings + pixel_warnings)


def orientation_name(normal: np.ndarray) -> str:
    """axial, coronal or sagittal: the patient axis a slice normal runs along; else oblique."""
    normal = np.abs(np.asarray(normal, dtype=float))
    axis = int(np.argmax(normal))
    if abs(normal[axis] - 1) > 1e-3:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _check_stacked_along_normal(slices: list[_Slice], normal: np.ndarray, source: Path) -> None:
    """Refuse a series whose slice positions do not follow its slice normal (a tilted gantry, a
    sheared or edited series): read as a regular volume, its crops would land far away."""
    positions = np.array([s.position for s in slices])
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    limit = IN_PLANE_DRIFT * min(slices[0].pixel_spacing)
    if in_plane.max() > limit:
        worst = slices[int(in_plane.argmax())]
        kind = orientation_name(normal)
        raise CTReadError(f"{source}: {'an' if kind[0] in 'aeio' else 'a'} {kind} series whose slices drift "
                          f"{in_plane.max():.2f} mm sideways along the stack ({worst.path.name} against "
                          f"{slices[0].path.name}): ImagePositionPatient does not follow the slice normal "
                          "(gantry tilt or a sheared series), so no regular volume describes it; "
                          "resample it to a regular grid first")


def _check_series(slices: list[_Slice], source: Path) -> None:
    groups = _group_by_series(slices)
    if len(groups) > 1:
        raise CTReadError(f"{source}: mixed series: {_describe_series(groups)}")
    first = slices[0]
    modalities = sorted({s.modality or "missing" for s in slices})
    if modalities != ["CT"]:
        raise CTReadError(f"{source}: series {first.series_uid} has modality {'/'.join(modalities)}, not CT")
    if len(slices) < 2:
        raise CTReadError(f"{source}: single-slice series {first.series_uid}; a CT volume needs 2 or more")
    for s in slices:
        absent = [name for name, value in (("ImagePositionPatient", s.position),
                                           ("ImageOrientationPatient", s.orientation),
                                           ("PixelSpacing", s.pixel_spacing)) if value is None]
        if absent:
            raise CTReadError(f"{s.path}: lacks {', '.join(absent)}, so the slice cannot be placed")
        if not 0 < min(s.pixel_spacing) <= max(s.pixel_spacing) <= MAX_SPACING_MM:
            raise CTReadError(f"{s.path}: PixelSpacing {s.pixel_spacing} is not in "
                              f"(0, {MAX_SPACING_MM:g}] mm")
        if max(abs(v) for v in s.position) > MAX_COORDINATE_MM:
            raise CTReadError(f"{s.path}: ImagePositionPatient {s.position} lies beyond "
                              f"{MAX_COORDINATE_MM:g} mm")
        if s.samples != 1 or s.frames != 1 or s.bits_allocated not in (8, 16, 32):
            raise CTReadError(f"{s.path}: unsupported pixel layout ({s.samples} samples, {s.frames} frames, "
                              f"{s.bits_allocated} bits); expected single-frame greyscale 8/16/32-bit")
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise CTReadError(f"{s.path}: inconsistent image size {s.rows}x{s.columns}, but "
                              f"{first.rows}x{first.columns} in {first.path.name}")
        for name, value, expected in (("ImageOrientationPatient", s.orientation, first.orientation),
                                      ("PixelSpacing", s.pixel_spacing, first.pixel_spacing)):
            if not np.allclose(value, expected, rtol=0, atol=GEOMETRY_TOLERANCE):
                raise CTReadError(f"{s.path}: inconsistent {name} {value}, but {expected} in "
                                  f"{first.path.name}")


def _drop_duplicates(slices: list[_Slice], along: np.ndarray) -> tuple[list[_Slice], np.ndarray, list[str]]:
    """Drop exact copies of a slice; two different images at one position cannot be resolved."""
    keep, warnings = [0], []
    for i in range(1, len(slices)):
        kept = slices[keep[-1]]
        if along[i] - along[keep[-1]] > SAME_POSITION_MM:
            keep.append(i)
            continue
        if not np.array_equal(_hu_volume([kept])[0], _hu_volume([slices[i]])[0]):
            raise CTReadError(f"{slices[i].path}: duplicate slice position z={slices[i].position[2]:.3f} mm "
                              f"with different pixel data from {kept.path.name}")
        warnings.append(f"duplicate slice {slices[i].path.name} (a copy of {kept.path.name} at "
                        f"z={kept.position[2]:.3f} mm) dropped")
    return [slices[i] for i in keep], along[keep], warnings


def _check_spacing(along: np.ndarray, slice_z: np.ndarray, source: Path) -> list[str]:
    gaps = np.diff(along)
    median = float(np.median(gaps))
    missing = np.flatnonzero(gaps > MISSING_GAP * median)
    if missing.size:
        where = ", ".join(f"z={slice_z[i]:.2f} and {slice_z[i + 1]:.2f} mm" for i in missing[:3])
        more = f" and {missing.size - 3} more" if missing.size > 3 else ""
        raise CTReadError(f"{source}: missing slices: gap(s) over {MISSING_GAP}x the median spacing "
                          f"{median:.3g} mm between {where}{more}")
    mean = (along[-1] - along[0]) / (len(along) - 1)
    off_grid = np.abs(along - (along[0] + mean * np.arange(len(along))))
    if off_grid.max() > GRID_DRIFT * mean:
        worst = int(off_grid.argmax())
        raise CTReadError(f"{source}: slice positions drift up to {off_grid.max():.2f} mm (at "
                          f"z={slice_z[worst]:.2f} mm) from an even spacing of {mean:.4g} mm; more than "
                          f"{GRID_DRIFT:g} of a slice cannot be corrected")
    worst = int(np.argmax(np.abs(gaps - median)))
    deviation = abs(gaps[worst] - median) / median
    spread = (f"slice gaps {gaps.min():.3g}-{gaps.max():.3g} mm, up to {deviation:.1%} off the median "
              f"{median:.3g} mm (z={slice_z[worst]:.2f} to {slice_z[worst + 1]:.2f} mm)")
    if deviation > UNEVEN_LIMIT:
        raise CTReadError(f"{source}: uneven slice spacing: {spread} (more than {UNEVEN_LIMIT:.0%} cannot be "
                          "corrected)")
    if deviation > UNEVEN_WARN:
        return [f"uneven slice spacing: {spread}; z spacing set to the mean {mean:.4g} mm, true slice "
                "positions in slice_z"]
    return []


def _hu_volume(slices: list[_Slice]) -> tuple[np.ndarray, list[str]]:
    """(z, y, x) int16 HU of sorted slices, each read straight into its plane; padding -> air."""
    hu = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.int16)
    scratch = bytearray(max(s.nbytes for s in slices))
    clipped = 0
    for s, out in zip(slices, hu, strict=True):
        if s.pixel_offset is None:
            clipped += _plane_to_hu(_gdcm_pixels(s), 1.0, 0.0, out)
        else:
            clipped += _plane_to_hu(_native_pixels(s, scratch), s.slope, s.intercept, out)
        if s.padding is not None and s.padding * s.slope + s.intercept > PADDING_HU:
            np.putmask(out, out == round(s.padding * s.slope + s.intercept), AIR_HU)
    return hu, _clipping_warnings(clipped)


def _native_pixels(s: _Slice, scratch: bytearray) -> np.ndarray:
    """Uncompressed pixels of one slice, read into ``scratch`` (reused, so no allocation per slice)."""
    try:
        with open(s.path, "rb") as fp:
            fp.seek(s.pixel_offset)
            present = fp.readinto(scratch)
    except OSError as err:
        raise CTReadError(f"{s.path}: unreadable ({_one_line(err)})") from None
    if present < s.nbytes:
        raise CTReadError(f"{s.path}: {_truncated(present, s)}")
    dtype = np.dtype(f"{'<' if s.little_endian else '>'}{'i' if s.signed else 'u'}{s.bits_allocated // 8}")
    raw = np.frombuffer(scratch, dtype, count=s.rows * s.columns).reshape(s.rows, s.columns)
    if s.bits_stored < s.bits_allocated:  # bits above BitsStored may hold anything (overlays)
        shift = s.bits_allocated - s.bits_stored
        raw = (raw << shift) >> shift if s.signed else raw & ((1 << s.bits_stored) - 1)
    return raw


def _gdcm_pixels(s: _Slice) -> np.ndarray:
    """Compressed slice decoded and rescaled to HU by SimpleITK's GDCM."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(s.path))
    except RuntimeError as err:
        raise CTReadError(f"{s.path}: cannot decode pixel data ({_sitk_message(err)})") from None
    return sitk.GetArrayFromImage(image).reshape(s.rows, s.columns)


def _plane_to_hu(plane: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> int:
    """Rescale one plane into ``out`` (int16 HU), padding -> air; returns how many values were clipped.

    Integer data with slope 1 (nearly every CT) is shifted straight into ``out``, no float copy.
    """
    if plane.dtype.kind in "iu" and slope == 1 and float(intercept).is_integer():
        low, high = int(plane.min()) + int(intercept), int(plane.max()) + int(intercept)
        if -32768 <= low and high <= 32767:
            np.add(plane, np.int32(intercept), out=out, casting="unsafe")
            np.putmask(out, out <= PADDING_HU, AIR_HU)
            return 0
    scaled = np.rint(plane.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    clipped = int(np.count_nonzero((scaled < -32768) | (scaled > 32767)))
    not_a_number = ~np.isfinite(scaled)
    if not_a_number.any():  # NaN marks outside-of-field in some resampled volumes
        scaled[not_a_number] = AIR_HU
        clipped += int(np.count_nonzero(not_a_number))
    np.clip(scaled, -32768, 32767, out=out, casting="unsafe")
    np.putmask(out, out <= PADDING_HU, AIR_HU)
    return clipped


def _clipping_warnings(clipped: int) -> list[str]:
    return [f"{clipped} voxel(s) outside the int16 range clipped to -32768..32767 (or, not a number, "
            "set to air)"] if clipped else []


def _read_image_file(path: Path, series_uid: str | None, assume_hu: bool) -> CTVolume:
    import SimpleITK as sitk

    if path.name.lower().endswith(".mhd"):
        _check_metaimage_header(path)
    _check_image_header(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CTReadError(f"{path}: not a readable image ({_sitk_message(err)})") from None
    _check_image_geometry(path, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    values = sitk.GetArrayViewFromImage(image)
    hu = np.empty(values.shape, dtype=np.int16)
    clipped = sum(_plane_to_hu(plane, 1.0, 0.0, out) for plane, out in zip(values, hu, strict=True))
    if not assume_hu:
        _check_looks_like_hu(path, hu)
    volume = CTVolume(hu=hu, spacing=image.GetSpacing(), origin=image.GetOrigin(),
                      direction=image.GetDirection(), slice_z=np.empty(0), series_uid=series_uid,
                      patient_id=None, modality=None, source=path, warnings=_clipping_warnings(clipped))
    indices = np.zeros((len(hu), 3))
    indices[:, 0] = np.arange(len(hu))
    volume.slice_z = volume.index_to_world(indices)[:, 2]
    return volume


def _check_image_header(path: Path) -> None:
    """Refuse, from the header alone, an image that is not one 3-D greyscale volume, or whose
    header claims more voxels than a CT has or than its file holds (so that no garbage header
    makes the reader allocate gigabytes)."""
    import SimpleITK as sitk

    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_geometry_fields(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CTReadError(f"{path}: not a readable image ({_sitk_message(err)})") from None
    dimension, components, size = reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize()
    if dimension != 3 or components != 1:
        raise CTReadError(f"{path}: {dimension}-D image with {components} component(s) per voxel; "
                          "expected a 3-D greyscale CT")
    voxels = math.prod(size)
    if voxels > MAX_VOXELS or min(size) < 1:
        raise CTReadError(f"{path}: its header gives {' x '.join(map(str, size))} voxels, not a CT volume "
                          f"(at most {MAX_VOXELS:,} voxels)")
    needed = voxels * sitk.Image([1, 1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
    stored = _stored_bytes(path)
    if stored is not None and needed < 1 << 32 and stored < needed:
        raise CTReadError(f"{path}: holds {stored:,} bytes of image data, but its header's "
                          f"{' x '.join(map(str, size))} voxels need {needed:,}: cut short")


_NIFTI_LAYOUTS = {
    # sizeof_hdr: (dim, pixdim, scl_slope/scl_inter, qform/sform codes, quatern+qoffset, srow),
    # each as (offset, struct format); NIfTI-1 in 4-byte, NIfTI-2 in 8-byte numbers.
    348: ((40, "8h"), (76, "8f"), (112, "2f"), (252, "2h"), (256, "6f"), (280, "12f")),
    540: ((16, "8q"), (104, "8d"), (176, "2d"), (344, "2i"), (352, "6d"), (400, "12d")),
}


def _check_nifti_geometry_fields(path: Path) -> None:
    """Refuse a NIfTI header whose dimensions or geometry are not finite, sane numbers before
    SimpleITK reads it: its NIfTI reader loops forever on some (an infinite sform, seen here)."""
    import gzip

    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError) as err:
        raise CTReadError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from None
    for endian in "<>":
        if len(header) >= 4 and (size := struct.unpack(endian + "i", header[:4])[0]) in _NIFTI_LAYOUTS:
            break
    else:
        raise CTReadError(f"{path}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    if len(header) < size:
        raise CTReadError(f"{path}: its NIfTI header is cut short")
    dim, pixdim, scaling, codes, quatern, srow = (
        struct.unpack_from(endian + fmt, header, offset) for offset, fmt in _NIFTI_LAYOUTS[size])
    if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 1:
        raise CTReadError(f"{path}: NIfTI dimensions {dim[:dim[0] + 1] if 0 <= dim[0] <= 7 else dim} "
                          "are not an image")
    numbers = [*pixdim[1:4], *scaling]
    numbers += [*quatern] if codes[0] > 0 else []
    numbers += [*srow] if codes[1] > 0 else []
    if not all(math.isfinite(v) for v in numbers):
        raise CTReadError(f"{path}: its NIfTI header holds values that are not finite in the voxel "
                          "size, scaling or orientation (pixdim, scl_*, quatern/qoffset, srow)")


def _stored_bytes(path: Path) -> int | None:
    """Bytes of (uncompressed) image data a NIfTI file can hold, header included; None for
    other formats. A .nii.gz states its uncompressed size (modulo 4 GiB) in its last 4 bytes."""
    name = path.name.lower()
    if name.endswith(".nii"):
        return path.stat().st_size
    if name.endswith(".nii.gz"):
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < 18:  # shorter than an empty gzip stream
                return 0
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    return None


def _check_image_geometry(path: Path, spacing: tuple[float, ...], origin: tuple[float, ...],
                          direction: tuple[float, ...]) -> None:
    """Refuse a geometry no crop can be placed by: values not finite, spacing or origin beyond
    what a scanner writes, direction cosines not orthonormal."""
    values = np.array([*spacing, *origin, *direction], dtype=float)
    matrix = np.reshape(direction, (3, 3))
    if (not np.isfinite(values).all() or not 0 < min(spacing) <= max(spacing) <= MAX_SPACING_MM
            or max(abs(v) for v in origin) > MAX_COORDINATE_MM):
        raise CTReadError(f"{path}: unusable geometry (spacing {spacing}, origin {origin}): voxel sizes "
                          f"must lie in (0, {MAX_SPACING_MM:g}] mm and the origin within "
                          f"{MAX_COORDINATE_MM:g} mm")
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-3):
        raise CTReadError(f"{path}: direction cosines {direction} are not orthonormal")


def _check_looks_like_hu(path: Path, hu: np.ndarray) -> None:
    """Refuse values that are not CT in HU: no air where a chest CT always has some."""
    darkest = float(np.percentile(hu[::2, ::4, ::4], AIR_PERCENTILE))
    if darkest > AIR_HU_MAX:
        raise CTReadError(f"{path}: does not look like CT in Hounsfield units: its darkest "
                          f"{AIR_PERCENTILE:g} % of voxels is at {darkest:.0f} or above, where a chest CT "
                          "has air and lung at about -1000 to -800 HU (an MR or PET image, or CT "
                          "without its rescale to HU?); pass --assume-hu if it is CT in HU")


_MHD_NUMBERS = {  # MetaImage keys (and their synonyms) that must hold this many finite numbers
    ("DimSize",): 3, ("ElementSpacing", "ElementSize"): 3, ("Offset", "Position", "Origin"): 3,
    ("TransformMatrix", "Rotation", "Orientation"): 9, ("CenterOfRotation",): 3,
}


def _check_metaimage_header(path: Path) -> None:
    """Check a MetaImage header before SimpleITK reads it: it crashes the process on some
    (``NDims = -1``), and it blames the .mhd itself when its data file is missing or short. Only
    3-D greyscale images with sane numbers pass; the data file is named when it is wrong."""
    try:
        header = path.read_text(errors="replace")
    except OSError as err:
        raise CTReadError(f"{path}: unreadable ({_one_line(err)})") from None
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*(.*?)\s*$", header, re.MULTILINE))
    name = fields.get("ElementDataFile")
    if not name:
        raise CTReadError(f"{path}: not a MetaImage header (no ElementDataFile line)")
    separate = name != "LOCAL" and " " not in name and name.upper() != "LIST"
    if separate and not (path.parent / name).is_file():
        raise CTReadError(f"{path}: its data file {name} is missing (expected next to it)")
    if fields.get("NDims") != "3" or fields.get("ElementNumberOfChannels", "1") != "1":
        raise CTReadError(f"{path}: NDims {fields.get('NDims')!r} with ElementNumberOfChannels "
                          f"{fields.get('ElementNumberOfChannels', '1')!r}; expected a 3-D greyscale CT")
    if fields.get("ElementType") not in _MHD_ELEMENT_BYTES:
        raise CTReadError(f"{path}: unknown ElementType {fields.get('ElementType')!r}")
    for keys, count in _MHD_NUMBERS.items():
        for key in keys:
            if key in fields and not _finite_numbers(fields[key], count):
                raise CTReadError(f"{path}: {key} {fields[key]!r} is not {count} finite numbers")
    if "DimSize" not in fields or min(float(v) for v in fields["DimSize"].split()) < 1:
        raise CTReadError(f"{path}: DimSize {fields.get('DimSize')!r} is not three sizes of at least 1")
    for key in ("HeaderSize", "CompressedDataSize"):
        if key in fields and not re.fullmatch(r"-?\d+", fields[key]):
            raise CTReadError(f"{path}: {key} {fields[key]!r} is not a whole number")
    if not separate:
        return
    needed = _mhd_data_bytes(fields)
    size = (path.parent / name).stat().st_size
    if needed is not None and size < needed:
        raise CTReadError(f"{path}: its data file {name} holds {size:,} bytes, but DimSize "
                          f"{fields['DimSize']} of {fields['ElementType']} needs {needed:,}: cut short")


def _finite_numbers(text: str, count: int) -> bool:
    try:
        numbers = [float(v) for v in text.split()]
    except ValueError:
        return False
    return len(numbers) == count and all(math.isfinite(v) for v in numbers)


def _mhd_data_bytes(fields: dict[str, str]) -> int | None:
    """Bytes an uncompressed MetaImage data file needs (header bytes included); None when the
    header does not say plainly (compressed data, HeaderSize -1)."""
    if fields.get("CompressedData", "False").lower() == "true":
        return None
    header_size = int(fields.get("HeaderSize", "0"))
    if header_size < 0:
        return None
    dims = [int(float(v)) for v in fields["DimSize"].split()]
    return header_size + math.prod(dims) * _MHD_ELEMENT_BYTES[fields["ElementType"]]


def _group_by_series(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def _describe_series(groups: dict[str, list[_Slice]]) -> str:
    return ", ".join(f"{uid} ({len(group)} files, patient {group[0].patient_id})"
                     for uid, group in sorted(groups.items()))


def _common_folder(slices: list[_Slice]) -> Path:
    return Path(os.path.commonpath([s.path.parent for s in slices]))


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    numbers = tuple(float(v) for v in ([value] if isinstance(value, int | float | str) else value))
    if len(numbers) != count:
        raise _Problem(f"{keyword} has {len(numbers)} values, expected {count}")
    if not all(math.isfinite(v) for v in numbers):
        raise _Problem(f"{keyword} {numbers} is not finite")
    return numbers


def _points(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.ndim == 0 or points.shape[-1] != 3:
        raise ValueError(f"{name} needs points of shape (..., 3), got {points.shape}")
    return points


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _sitk_message(err: RuntimeError) -> str:
    """The reason in a SimpleITK/ITK exception, without C++ source locations and object addresses."""
    text = str(err)
    for marker in ("sitk::ERROR:", "ITK ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return _one_line(re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):", "", text))
