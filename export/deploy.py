"""`naslung-export`: a run directory in, a deployable export directory out.

Export directory layout::

    model.onnx           the ensemble as one ONNX graph, metadata inside (no side files needed)
    model.fp16.onnx      with --trt --precision fp16: the same graph computing in fp16
    model.engine         with --trt: the TensorRT engine, and model.engine.json its sidecar
    export.json          what was exported from where, the parity check and versions

Every file is written atomically; the ONNX file is written (and checked) before TensorRT is
tried, so a machine without TensorRT still gets the ONNX and a one-line reason.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from naslung.export.ensemble import DeployedEnsemble, ExportError, load_ensemble
from naslung.export.metadata import OUTPUT_NAMES
from naslung.export.onnx_export import OPSET, export_onnx
from naslung.export.runners import OnnxRunner, ensemble_outputs
from naslung.export.tensorrt import sidecar_path
from naslung.fileio import check_output_dir, refuse_non_regular, temp_path, write_json
from naslung.locking import lock_run_dir

PARITY_TOLERANCE = 1e-5
"""Largest |ONNX Runtime - PyTorch| accepted on the probabilities (fp32)."""
ONNX_FILE, FP16_ONNX_FILE = "model.onnx", "model.fp16.onnx"
ENGINE_FILE, REPORT_FILE = "model.engine", "export.json"


class TensorRTSkipped(RuntimeError):
    """The ONNX was exported, but the TensorRT engine could not be built here."""


@dataclass
class ExportReport:
    out_dir: Path
    onnx: Path
    members: list[str]
    parity: dict[str, float]
    engine: Path | None = None


def parity_crops(crop: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """Nodule-like HU crops for the export-time parity check: a solid sphere of random size in
    noisy aerated lung, so that every member sees realistic, varied inputs."""
    rng = np.random.default_rng(seed)
    axis = np.arange(crop) - (crop - 1) / 2
    radius2 = sum(np.meshgrid(axis, axis, axis, indexing="ij")[i] ** 2 for i in range(3))
    crops = rng.normal(-850, 60, (count, crop, crop, crop))
    for crop_hu, r in zip(crops, rng.uniform(2, crop / 3, count), strict=True):
        crop_hu[radius2 <= r * r] = rng.normal(30, 40)
    return crops.astype(np.float32)


def parity(ensemble: DeployedEnsemble, runner: OnnxRunner, crops: np.ndarray) -> dict[str, float]:
    """Largest absolute difference per output between ONNX Runtime and the PyTorch reference."""
    reference = ensemble_outputs(ensemble, crops)
    exported = runner.run(crops)
    return {name: float(np.abs(getattr(exported, name).astype(np.float64) - getattr(reference, name)).max())
            for name in OUTPUT_NAMES}


def export_run(run: str | Path, out_dir: str | Path, *, opset: int = OPSET, trt: bool = False,
               precision: str = "fp32", max_batch: int = 64) -> ExportReport:
    """Export the ensemble of ``run`` into ``out_dir``; TensorRT last, and only with ``trt``.

    The ONNX file replaces an earlier export only once ONNX Runtime has matched PyTorch on it;
    the earlier export's engine and fp16 graph, which would no longer match, go with it. Raises
    `TensorRTSkipped` after the ONNX is written when TensorRT is wanted but unavailable.
    """
    out_dir = check_output_dir(out_dir, "--out")
    for name in (ONNX_FILE, FP16_ONNX_FILE, ENGINE_FILE, REPORT_FILE):
        refuse_non_regular(out_dir / name, "--out: ")
    ensemble = load_ensemble(run)
    created = not out_dir.exists()
    with lock_run_dir(out_dir, "export folder"):
        candidate = temp_path(out_dir / ONNX_FILE, "candidate")
        try:
            export_onnx(ensemble, candidate, opset)
            differences = parity(ensemble, OnnxRunner(candidate), parity_crops(ensemble.metadata.crop))
            if differences["probability"] > PARITY_TOLERANCE:
                raise ExportError(f"ONNX Runtime differs from PyTorch by {differences['probability']:.2e} "
                                  f"in probability (> {PARITY_TOLERANCE}); nothing exported")
            for stale in (FP16_ONNX_FILE, ENGINE_FILE, sidecar_path(ENGINE_FILE).name):
                (out_dir / stale).unlink(missing_ok=True)
            onnx_path = candidate.replace(out_dir / ONNX_FILE)
        except BaseException:
            candidate.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        report = ExportReport(out_dir, onnx_path, ensemble.metadata.archs, differences)
        write_json(out_dir / REPORT_FILE, _report_json(report, run, ensemble, opset))
        if trt:
            _build_tensorrt(report, ensemble, precision, max_batch, opset)
            write_json(out_dir / REPORT_FILE, _report_json(report, run, ensemble, opset))
    return report


def _build_tensorrt(report: ExportReport, ensemble: DeployedEnsemble, precision: str, max_batch: int,
                    opset: int) -> None:
    from naslung.export.tensorrt import TensorRTUnavailable, build_engine, tensorrt_available

    missing = tensorrt_available()
    if missing is not None:
        raise TensorRTSkipped(f"{missing}; the ONNX model is in {report.onnx}")
    source = report.onnx
    if precision == "fp16":
        source = export_onnx(ensemble.to_precision("fp16"), report.out_dir / FP16_ONNX_FILE, opset)
    try:
        report.engine = build_engine(source, report.out_dir / ENGINE_FILE, max_batch=max_batch,
                                     precision=precision)
    except TensorRTUnavailable as err:
        raise TensorRTSkipped(f"{err}; the ONNX model is in {report.onnx}") from err


def _report_json(report: ExportReport, run: str | Path, ensemble: DeployedEnsemble, opset: int) -> dict:
    return {"run": str(Path(run).resolve()), "onnx": report.onnx.name, "opset": opset,
            "engine": report.engine.name if report.engine else None,
            "members": [m.__dict__ for m in ensemble.metadata.members],
            "parity_max_abs_difference": report.parity,
            "versions": {**ensemble.metadata.versions, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__}}
