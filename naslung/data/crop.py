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

from naslung.data.ct import AIR_HU

CROP_SIZE = 48
CONSENSUS_LEVEL = 0.5


def consensus_centre(fraction: np.ndarray) -> np.ndarray:
    """Centroid (voxel index, fraction's axes) of the voxels at least half the readers marked;
    of the whole fraction when no voxel reaches half (a tiny nodule)."""
    core = fraction >= CONSENSUS_LEVEL
    return np.array(ndimage.center_of_mass(core if core.any() else fraction))


def centred_grid(centre: np.ndarray, spacing: np.ndarray, axis_signs: np.ndarray | None = None,
                 size: int = CROP_SIZE) -> np.ndarray:
    """Voxel-index coordinates (3, size, size, size) of a 1 mm grid centred on ``centre``.

    ``spacing`` is the array's voxel size in mm per axis; ``axis_signs`` (+1/-1 per axis, from
    the scan's direction) flip an axis that runs against the world axis, so that crop axes
    always point along world +z, +y, +x.
    """
    signs = np.ones(3) if axis_signs is None else np.asarray(axis_signs, dtype=float)
    offsets_mm = np.arange(size) - (size - 1) / 2
    axes = [c + s * offsets_mm / d for c, d, s in zip(centre, spacing, signs, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


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
