"""What the model looked at, as files a radiologist can open: the crop, the stem CBAM's spatial
attention and the Grad-CAM as NIfTI volumes placed on the original CT, and one PNG of the three
orthogonal slices through the nodule.

The crop's array axes run along world +z, +y, +x at ``spacing_mm``, so each volume is written
with an identity direction, that spacing, and as origin the world (x, y, z) of its voxel
[0, 0, 0]: any viewer that opens the CT places them on it. SimpleITK and matplotlib are
imported where used. SimpleITK does not report a failed write (a full disk leaves an empty or
short file without an error), so every volume is read back and compared before it is kept.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from naslung.fileio import OutputError, temp_path, write_atomically

HU_DISPLAY = (-1000.0, 400.0)
"""Grey window of the slice pictures (lung and soft tissue)."""
FILES = {"ct": "ct.nii.gz", "attention": "attention.nii.gz", "gradcam": "gradcam.nii.gz",
         "slices": "slices.png"}


@dataclass
class Explanation:
    """One nodule's crop and maps, on the crop's grid, and where that grid lies in the world."""

    crop_hu: np.ndarray
    """(crop, crop, crop) int16 HU, what the model was fed."""
    attention: np.ndarray
    """(crop, crop, crop) in [0, 1]."""
    gradcam: np.ndarray
    """(crop, crop, crop), Grad-CAM upsampled to the crop (`upsample`)."""
    origin_mm: np.ndarray
    """World (x, y, z) of voxel [0, 0, 0]."""
    spacing_mm: float
    title: str


def upsample(cam: np.ndarray, side: int) -> np.ndarray:
    """A (c, c, c) Grad-CAM map -> (side, side, side), trilinear, edges held.

    The map comes from three stride-2 convolutions with padding 1, so its cell j is centred on
    crop voxel j * side / c (not on the middle of a side / c block, which would shift the
    overlay by 3.5 voxels along every axis)."""
    cam = np.asarray(cam, dtype=np.float32)
    if side % cam.shape[0]:
        raise ValueError(f"Grad-CAM of shape {cam.shape} does not upsample to {side}^3")
    coordinates = np.indices((side,) * 3, dtype=np.float32) / (side // cam.shape[0])
    return ndimage.map_coordinates(cam, coordinates, order=1, mode="nearest")


def write_explanation(folder: str | os.PathLike, explanation: Explanation) -> dict[str, Path]:
    """The four files of one nodule in ``folder``, each written atomically; their paths by kind."""
    folder = Path(folder)
    paths = {kind: folder / name for kind, name in FILES.items()}
    for kind in ("ct", "attention", "gradcam"):
        array = explanation.crop_hu if kind == "ct" else getattr(explanation, kind).astype(np.float32)
        write_image(paths[kind], array, explanation.origin_mm, explanation.spacing_mm)
    write_slices(paths["slices"], explanation)
    return paths


def write_image(path: Path, array: np.ndarray, origin_mm: np.ndarray, spacing_mm: float) -> Path:
    """A (z, y, x) array as an image along the world axes with this origin and spacing."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(spacing_mm)] * 3)
    image.SetOrigin([float(v) for v in origin_mm])
    image.SetDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])

    def write(tmp: Path) -> None:
        # SimpleITK picks the format and compression by the file name, so it writes under the
        # real name in a private folder, and that file becomes the temporary one.
        work = temp_path(path, "dir")
        try:
            work.mkdir()
            staged = work / path.name
            sitk.WriteImage(image, str(staged), True)
            _check_written(staged, array, path)
            os.replace(staged, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return write_atomically(path, write)


def _check_written(staged: Path, array: np.ndarray, path: Path) -> None:
    """`OutputError` unless ``staged`` reads back (gzip checksum included) as ``array``."""
    import SimpleITK as sitk

    try:
        if staged.name.endswith(".gz"):
            gzip.decompress(staged.read_bytes())
        whole = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(staged))), array, equal_nan=True)
    except (OSError, EOFError, RuntimeError, zlib.error):
        whole = False
    if not whole:
        raise OutputError(f"cannot write {path}: the file did not read back as written (is the "
                          "disk full?)")


def write_slices(path: Path, explanation: Explanation) -> Path:
    """Axial, coronal and sagittal slices through the crop's centre: the CT in grey with the
    attention over it in the first row and the Grad-CAM in the second (radiological view:
    patient's right on the left, anterior and superior at the top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    centre = explanation.crop_hu.shape[0] // 2

    def views(volume: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
        return [("axial", volume[centre], "upper"),           # (y, x): anterior up
                ("coronal", volume[:, centre], "lower"),      # (z, x): superior up
                ("sagittal", volume[:, :, centre], "lower")]  # (z, y): superior up, anterior left

    figure = Figure(figsize=(9.6, 6.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    ct = views(explanation.crop_hu.astype(np.float32))
    # Grad-CAM is scaled to a maximum of 1; the sigmoid attention often spans a narrow band, so
    # its colours span its own range (the colour bar gives the values).
    low, high = float(explanation.attention.min()), float(explanation.attention.max())
    rows = (("attention", explanation.attention, "jet", (low, high if high > low else low + 1e-6)),
            ("Grad-CAM", explanation.gradcam, "inferno", (0.0, 1.0)))
    for row, (name, overlay, cmap, (vmin, vmax)) in enumerate(rows):
        for ax, (view, ct_slice, origin), (_, map_slice, _) in zip(axes[row], ct, views(overlay),
                                                                   strict=True):
            ax.imshow(ct_slice, cmap="gray", vmin=HU_DISPLAY[0], vmax=HU_DISPLAY[1], origin=origin,
                      interpolation="nearest")
            shown = ax.imshow(map_slice, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.35, origin=origin,
                              interpolation="bilinear")
            ax.set_title(f"{view}, {name}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        figure.colorbar(shown, ax=axes[row].tolist(), shrink=0.8, label=name)
    figure.suptitle(explanation.title)

    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
