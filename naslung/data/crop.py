"""Nodule-centred 1 mm crops: one resampling rule for rendered and real CT alike.

A crop is a ``CROP_SIZE``^3 grid of 1 mm voxels, axes (z, y, x) along the world axes,
centred on the readers' 50 % consensus centroid. Only the grid's own points are interpolated
(trilinear), straight from the scan's voxel array, so cropping never resamples a whole volume.
The consensus mask is the readers' agreement fraction interpolated on the same grid and
thresholded at 50 %, which keeps small nodules' outlines smoother than resampling a binary mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from naslung.data.ct import AIR_HU, CTVolume, orientation_name

CROP_SIZE = 48
CONSENSUS_LEVEL = 0.5


def consensus_centre(fraction: np.ndarray) -> np.ndarray:
    """Centroid (voxel index, fraction's axes) of the voxels at least half the readers marked;
    of the whole fraction when no voxel reaches half (a tiny nodule)."""
    core = fraction >= CONSENSUS_LEVEL
    return np.array(ndimage.center_of_mass(core if core.any() else fraction))


class ObliqueCTError(ValueError):
    """A CT whose index axes do not run along the patient axes, so no crop grid can be cut from
    it by flipping axes alone."""


def centred_grid(centre: np.ndarray, spacing: np.ndarray, axis_signs: np.ndarray | None = None,
                 size: int = CROP_SIZE, step_mm: float = 1.0) -> np.ndarray:
    """Voxel-index coordinates (3, size, size, size) of a grid of ``step_mm`` voxels centred on
    ``centre``.

    ``spacing`` is the array's voxel size in mm per axis; ``axis_signs`` (+1/-1 per axis, from
    the scan's direction) flip an axis that runs against the world axis, so that crop axes
    always point along world +z, +y, +x.
    """
    signs = np.ones(3) if axis_signs is None else np.asarray(axis_signs, dtype=float)
    offsets_mm = (np.arange(size) - (size - 1) / 2) * step_mm
    axes = [c + s * offsets_mm / d for c, d, s in zip(centre, spacing, signs, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def axis_signs(volume: CTVolume) -> np.ndarray:
    """+1/-1 per (z, y, x) index axis of ``volume``: whether it runs along or against its world
    axis. `ObliqueCTError` unless every index axis lies along its own world axis."""
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-3):
        raise ObliqueCTError(f"{volume.source}: {_describe(direction)}; naslung crops axial scans "
                             "whose index axes run along the patient axes (direction cosines "
                             f"{', '.join(f'{v:.3g}' for v in direction.ravel())}): resample it first")
    return np.sign(np.diag(direction))[::-1]


def _describe(direction: np.ndarray) -> str:
    kind = orientation_name(direction[:, 2])
    if kind == "axial":
        return "an axial scan with oblique rows and columns"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} scan, not an axial one"


def volume_grid(volume: CTVolume, centre: np.ndarray, size: int = CROP_SIZE,
                step_mm: float = 1.0) -> np.ndarray:
    """Voxel-index coordinates in ``volume`` (3, size, size, size) of the crop grid around
    ``centre`` (continuous (z, y, x) index): ``step_mm`` voxels along world +z, +y, +x.

    Every crop of a real CT is cut on this grid: the crop store's and `naslung predict`'s."""
    spacing_zyx = np.array(volume.spacing[::-1], dtype=float)
    return centred_grid(centre, spacing_zyx, axis_signs(volume), size, step_mm)


def sample(array: np.ndarray, coordinates: np.ndarray, outside: float,
           dtype: type = np.float32) -> np.ndarray:
    """Trilinear values of ``array`` at ``coordinates``; ``outside`` beyond its edge."""
    return ndimage.map_coordinates(array, coordinates, output=dtype, order=1,
                                   mode="constant", cval=outside)


def consensus_mask(fraction: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """The consensus fraction sampled at ``coordinates`` (its own index space), >= 50 %.

    In float64: readers' fractions sit exactly on 0.5 often, and float32 rounding would move
    voxels across the threshold."""
    padded = np.pad(fraction.astype(np.float64), 1)  # falls off linearly outside the outlines
    return sample(padded, coordinates + 1, 0.0, np.float64) >= CONSENSUS_LEVEL


def hu_crop(hu: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """The CT sampled at ``coordinates`` as int16 HU, air outside the scan."""
    return np.rint(sample(hu, coordinates, AIR_HU)).astype(np.int16)
