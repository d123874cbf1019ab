"""Run a deployed model on HU crops: the PyTorch reference, ONNX Runtime, or a TensorRT engine.

Every runner takes float32 HU crops (N, crop, crop, crop), as `naslung predict` cuts them, and
returns the same `Outputs`, so callers never care which one they hold; `open_runner` picks one
by what the model path is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from naslung.export.ensemble import DeployedEnsemble, ExportError, load_ensemble
from naslung.export.metadata import INPUT_NAME, OUTPUT_NAMES, ModelError, ModelMetadata, read_onnx_metadata

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Outputs:
    """A model's outputs for N crops (see `naslung.export.metadata.OUTPUT_NAMES`)."""

    probability: np.ndarray
    """(N,) mean malignancy probability of the members."""
    member_probabilities: np.ndarray
    """(N, K) each member's probability."""
    majority_vote: np.ndarray
    """(N,) 1 where at least half of the members vote malignant."""
    attention: np.ndarray
    """(N, crop, crop, crop) the stem CBAM's spatial attention, members' mean, in [0, 1]."""
    gradcam: np.ndarray
    """(N, c, c, c) Grad-CAM of the log-odds, each member's scaled to max 1, members' mean."""

    @classmethod
    def from_named(cls, arrays: dict[str, np.ndarray]) -> Outputs:
        """From the model's output tensors by name (channel axes of the maps dropped)."""
        missing = [name for name in OUTPUT_NAMES if name not in arrays]
        if missing:
            raise ModelError(f"the model lacks output(s) {', '.join(missing)}")
        out = {name: np.asarray(arrays[name]) for name in OUTPUT_NAMES}
        out["attention"], out["gradcam"] = out["attention"][:, 0], out["gradcam"][:, 0]
        return cls(**out)

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...]) -> Outputs:
        """From a `DeployedEnsemble`'s output tensors (in `OUTPUT_NAMES` order), on any device."""
        return cls.from_named({name: t.cpu().numpy() for name, t in zip(OUTPUT_NAMES, tensors, strict=True)})


def concatenate(parts: list[Outputs]) -> Outputs:
    """The outputs of consecutive batches as those of one."""
    return Outputs(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in OUTPUT_NAMES})


def run_in_batches(runner: TorchRunner | OnnxRunner, crops: np.ndarray) -> Outputs:
    """``runner.run`` on ``crops`` in batches no larger than the runner takes (a TensorRT
    engine's profile ends at its ``max_batch``; the others take any batch)."""
    size = getattr(runner, "max_batch", len(crops)) or 1
    return concatenate([runner.run(crops[start:start + size]) for start in range(0, len(crops), size)])


def model_input(crops: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """(N, crop, crop, crop) float32 HU -> the model input (N, 1, crop, crop, crop)."""
    crops = np.asarray(crops, dtype=np.float32)
    side = metadata.crop
    if crops.ndim != 4 or crops.shape[1:] != (side, side, side) or len(crops) == 0:
        raise ModelError(f"crops of shape {crops.shape} given; the model takes (N, {side}, {side}, {side})")
    return np.ascontiguousarray(crops[:, None])


def ensemble_outputs(ensemble: DeployedEnsemble, crops: np.ndarray,
                     device: str | torch.device = "cpu") -> Outputs:
    """The PyTorch reference's outputs for ``crops`` (N, crop, crop, crop) float32 HU."""
    x = torch.from_numpy(model_input(crops, ensemble.metadata)).to(device)
    with torch.inference_mode():
        return Outputs.from_tensors(ensemble(x))


class TorchRunner:
    """The PyTorch reference: the members' checkpoints themselves, read from a run directory."""

    kind = "pytorch"

    def __init__(self, run: str | Path, device: str | torch.device = "cpu") -> None:
        try:
            self.ensemble: DeployedEnsemble = load_ensemble(run).to(device)
        except ExportError as err:
            raise ModelError(str(err)) from err
        self.metadata = self.ensemble.metadata
        self.device = torch.device(device)
        self.backend = f"torch {torch.__version__} on {self.device}"

    def run(self, crops: np.ndarray) -> Outputs:
        return ensemble_outputs(self.ensemble, crops, self.device)


class OnnxRunner:
    """ONNX Runtime on the exported graph; its metadata is read from the file itself."""

    kind = "onnxruntime"

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        if provider not in PROVIDERS:
            raise ModelError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise ModelError(f"ONNX Runtime here has no {PROVIDERS[provider]} (it has "
                             f"{', '.join(available)}); install onnxruntime-gpu or use the CPU")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3  # errors only: constant-folding notes are not problems
        try:
            providers = list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"]))
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception classes per failure
            raise ModelError(f"{self.path}: ONNX Runtime cannot load it "
                             f"({str(err).splitlines()[0][:200]})") from err
        self.backend = f"onnxruntime {ort.__version__} {self.session.get_providers()[0]}"
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise ModelError(f"{self.path}: inputs {inputs} and outputs {outputs} are not a naslung model's")

    def run(self, crops: np.ndarray) -> Outputs:
        arrays = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: model_input(crops, self.metadata)})
        return Outputs.from_named(dict(zip(OUTPUT_NAMES, arrays, strict=True)))


def open_runner(model: str | Path, provider: str = "cpu") -> TorchRunner | OnnxRunner:
    """A runner for ``model``: an .onnx file (ONNX Runtime with ``provider``), a TensorRT engine
    (.engine/.plan/.trt with its sidecar JSON), or a run/checkpoint directory (PyTorch)."""
    path = Path(model)
    if path.is_dir() and (path / "model.onnx").is_file():  # an export directory
        return OnnxRunner(path / "model.onnx", provider)
    if path.is_dir() or path.suffix == ".pt":
        return TorchRunner(path, "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu")
    if path.suffix in ENGINE_SUFFIXES:
        from naslung.export.tensorrt import TensorRTRunner, TensorRTUnavailable

        try:
            return TensorRTRunner(path)
        except TensorRTUnavailable as err:
            raise ModelError(f"{path}: a TensorRT engine cannot run here: {err}") from err
    if not path.exists():
        raise ModelError(f"{path}: no such model file or directory")
    return OnnxRunner(path, provider)
