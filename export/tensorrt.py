"""TensorRT engines of a deployed ensemble: build one from its ONNX file, run it.

An engine is compiled for one TensorRT version and one GPU model and fails obscurely (or
runs slowly) anywhere else, so every engine has a sidecar, ``<engine>.json``, that records
both, the ONNX it was built from and that ONNX's naslung metadata: a runner needs no other
file, and refuses an engine built elsewhere with one line that says to rebuild it.

TensorRT is imported only inside functions, so this module imports on machines without
TensorRT or without a GPU; `tensorrt_available` says why it cannot be used there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naslung.export.metadata import INPUT_NAME, OUTPUT_NAMES, ModelError, ModelMetadata, read_onnx_metadata
from naslung.export.runners import Outputs, model_input
from naslung.fileio import write_bytes, write_json

SIDECAR_FORMAT = 1
SIDECAR_FIELDS = ("format", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profile",
                  "inputs", "outputs", "onnx_sha256", "engine_sha256", "metadata")
_FIELD_TYPES = {"tensorrt_version": str, "gpu_name": str, "compute_capability": list, "precision": str,
                "profile": dict, "inputs": dict, "outputs": dict, "onnx_sha256": str, "engine_sha256": str,
                "metadata": dict}
PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = "pip install 'naslung[trt]' on a machine with an NVIDIA GPU and driver"
REBUILD_HINT = "rebuild it with `naslung-export --trt`"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; str(err) is the one line that says which."""


def _require_tensorrt() -> None:
    """`TensorRTUnavailable` unless tensorrt imports and a GPU is visible. PyPI's bindings
    without NVIDIA's libraries import partway and fail on a missing libnvinfer, as ImportError
    or OSError. (Callers then ``import tensorrt as trt`` themselves, which lets mypy check every
    TensorRT name they use against the type stubs.)"""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "tensorrt":
            raise TensorRTUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from err
        reason = " ".join(str(err).split())
        raise TensorRTUnavailable(f"TensorRT is installed but cannot be loaded ({reason}): "
                                  f"{INSTALL_HINT}") from err
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): "
                                  "TensorRT builds and runs engines only on an NVIDIA GPU")


def tensorrt_available() -> str | None:
    """None when engines can be built and run here, else one line saying what is missing."""
    try:
        _require_tensorrt()
    except TensorRTUnavailable as err:
        return str(err)
    return None


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sm(compute_capability: Sequence[int]) -> str:
    major, minor = compute_capability
    return f"sm_{major}{minor}"


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, max_batch: int = 64, opt_batch: int = 1,
                 precision: str = "fp32", timing_cache: Path | None = None, workspace_gib: float = 2) -> Path:
    """Build a TensorRT engine for batches of 1..``max_batch`` crops (tuned for ``opt_batch``).

    The network is strongly typed (TensorRT 11 knows no other kind), so the precision is the
    ONNX file's own: an fp16 engine is built from the fp16 export, and ``precision`` must say
    what the file computes in. TF32 is switched off so an fp32 engine matches fp32 ONNX Runtime.
    The engine is written first and its sidecar last, each atomically, so a sidecar means a
    complete engine. Tactic timings are kept in ``timing_cache`` (default
    ``<engine>.timing.cache``) to make rebuilds on the same GPU and TensorRT quick.
    """
    _require_tensorrt()
    import tensorrt as trt
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"the batch sizes must satisfy 1 <= opt_batch ({opt_batch}) <= max_batch "
                         f"({max_batch})")
    metadata = read_onnx_metadata(onnx_path)
    if metadata.precision != precision:
        raise ModelError(f"{onnx_path} computes in {metadata.precision}, not {precision}: "
                         f"build the {precision} engine from the {precision} ONNX export")
    onnx_bytes = onnx_path.read_bytes()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(parser.get_error(i).desc().split()) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME] or {t.name for t in outputs} != set(OUTPUT_NAMES):
        raise ModelError(f"{onnx_path}: its inputs {[t.name for t in inputs]} and outputs "
                         f"{[t.name for t in outputs]} are not a naslung ensemble's; re-export it")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    clear_tf32(config)
    profile = builder.create_optimization_profile()
    crop_shape = (1, metadata.crop, metadata.crop, metadata.crop)
    profile.set_shape(INPUT_NAME, (1, *crop_shape), (opt_batch, *crop_shape), (max_batch, *crop_shape))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache or engine_path.with_name(engine_path.name + ".timing.cache"))
    _attach_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine from it (its messages above "
                         "say why)")
    engine_bytes = bytes(memoryview(serialized))
    # an interrupted rebuild must not leave the old sidecar vouching for a new engine
    sidecar_path(engine_path).unlink(missing_ok=True)
    write_bytes(engine_path, engine_bytes)
    write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    device = torch.cuda.current_device()
    write_json(sidecar_path(engine_path), {
        "format": SIDECAR_FORMAT,
        "tensorrt_version": trt.__version__,
        "gpu_name": torch.cuda.get_device_name(device),
        "compute_capability": list(torch.cuda.get_device_capability(device)),
        "precision": precision,
        "profile": {"min_batch": 1, "opt_batch": opt_batch, "max_batch": max_batch},
        "inputs": {t.name: {"shape": list(t.shape), "dtype": t.dtype.name} for t in inputs},
        "outputs": {t.name: {"shape": list(t.shape), "dtype": t.dtype.name} for t in outputs},
        "onnx": onnx_path.name,
        "onnx_sha256": _sha256(onnx_bytes),
        "engine_sha256": _sha256(engine_bytes),
        "metadata": json.loads(metadata.to_json()),
    })
    return engine_path


def major_version() -> int:
    import tensorrt as trt

    return int(trt.__version__.split(".")[0])


def network_flags() -> int:
    """TensorRT 10 builds a weakly typed network unless asked for a strongly typed one; from 11
    on every network is strongly typed and there is nothing to ask for."""
    import tensorrt as trt

    if major_version() >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def clear_tf32(config: Any) -> None:
    """TF32 off, so that an fp32 engine computes as fp32 ONNX Runtime does. TensorRT 11 dropped
    the FP16, INT8 and BF16 builder flags; where it has no TF32 flag either, there is none to clear."""
    import tensorrt as trt

    if major_version() >= 11 and not hasattr(trt.BuilderFlag, "TF32"):
        return
    config.clear_flag(trt.BuilderFlag.TF32)


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Start from the cache at ``path`` when TensorRT accepts it, else from an empty one: a
    cache from another GPU or TensorRT version would only cost build time, never correctness."""
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def read_sidecar(engine_path: str | Path) -> dict:
    """The sidecar JSON of ``engine_path``; a missing or unreadable one is a `ModelError`."""
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"{engine_path}: its sidecar {path.name} is missing (the engine is incomplete "
                         f"or was not built by naslung): {REBUILD_HINT}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ModelError(f"{path}: the engine's sidecar is not JSON ({' '.join(str(err).split())}): "
                         f"{REBUILD_HINT}") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the engine's sidecar is not a JSON object: {REBUILD_HINT}")
    return data


def check_sidecar(sidecar: dict, engine_path: str | Path, *, tensorrt_version: str, gpu_name: str,
                  compute_capability: tuple[int, int]) -> None:
    """Refuse, with one line, an engine built by another TensorRT or for another GPU model or
    compute capability, or whose sidecar is of an unknown format or lacks what a runner needs."""
    if sidecar.get("format", SIDECAR_FORMAT) != SIDECAR_FORMAT:
        raise ModelError(f"engine {engine_path}: its sidecar has format {sidecar['format']!r}, which this "
                         f"naslung does not know (it reads format {SIDECAR_FORMAT}): {REBUILD_HINT}")
    missing = [name for name in SIDECAR_FIELDS if name not in sidecar]
    if missing:
        raise ModelError(f"engine {engine_path}: its sidecar lacks {', '.join(missing)}: {REBUILD_HINT}")
    malformed = [name for name, kind in _FIELD_TYPES.items() if not isinstance(sidecar[name], kind)]
    capability = sidecar["compute_capability"]
    if "compute_capability" not in malformed and not (
            len(capability) == 2 and all(isinstance(v, int) for v in capability)):
        malformed.append("compute_capability")
    if "profile" not in malformed and not isinstance(sidecar["profile"].get("max_batch"), int):
        malformed.append("profile")
    if malformed:
        raise ModelError(f"engine {engine_path}: its sidecar has a malformed {', '.join(malformed)}: "
                         f"{REBUILD_HINT}")
    built = (sidecar["tensorrt_version"], sidecar["gpu_name"], tuple(capability))
    here = (tensorrt_version, gpu_name, tuple(compute_capability))
    if built != here:
        raise ModelError(f"engine {engine_path} was built with TensorRT {built[0]} for {built[1]} "
                         f"({_sm(built[2])}); this machine has TensorRT {here[0]} and {here[1]} "
                         f"({_sm(here[2])}): {REBUILD_HINT}")


class TensorRTRunner:
    """Runs an engine built by `build_engine` on one GPU, with torch CUDA tensors as buffers."""

    kind = "tensorrt"

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        _require_tensorrt()
        import tensorrt as trt
        self.engine_path = Path(engine_path)
        self.device = torch.device("cuda", device)
        self.backend = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)}"
        sidecar = read_sidecar(self.engine_path)
        check_sidecar(sidecar, self.engine_path, tensorrt_version=trt.__version__,
                      gpu_name=torch.cuda.get_device_name(self.device),
                      compute_capability=torch.cuda.get_device_capability(self.device))
        self.metadata: ModelMetadata = ModelMetadata.from_json(json.dumps(sidecar["metadata"]),
                                                               self.engine_path)
        self.max_batch = int(sidecar["profile"]["max_batch"])
        try:
            engine_bytes = self.engine_path.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"{self.engine_path}: no such engine file (only its sidecar): "
                             f"{REBUILD_HINT}") from None
        if _sha256(engine_bytes) != sidecar["engine_sha256"]:
            raise ModelError(f"engine {self.engine_path} is not the one its sidecar describes (sha256 "
                             f"differs): {REBUILD_HINT}")

        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                  trt.DataType.BOOL: torch.bool}
        with torch.cuda.device(self.device):
            # TensorRT objects need their logger and runtime alive for as long as the engine
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self._engine is None:
                raise ModelError(f"engine {self.engine_path}: TensorRT cannot deserialize it (corrupt, or "
                                 f"not a TensorRT engine): {REBUILD_HINT}")
            self._context = self._engine.create_execution_context()
            # its own stream: on the default one TensorRT warns and synchronises more
            self._stream = torch.cuda.Stream(self.device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or set(names) - set(inputs) != set(OUTPUT_NAMES):
            raise ModelError(f"engine {self.engine_path}: its tensors {names} are not a naslung ensemble's: "
                             f"{REBUILD_HINT}")
        self._output_dtypes = {n: dtypes[self._engine.get_tensor_dtype(n)] for n in OUTPUT_NAMES}

    def run(self, crops: np.ndarray) -> Outputs:
        """Outputs for float32 HU crops (N, crop, crop, crop), 1 <= N <= the engine's max batch."""
        batch = model_input(crops, self.metadata)
        if len(batch) > self.max_batch:
            raise ModelError(f"engine {self.engine_path} takes at most {self.max_batch} crops at a time (its "
                             f"optimisation profile), not {len(batch)}: pass fewer or rebuild it with a "
                             f"larger --max-batch")
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            ct_hu = torch.from_numpy(batch).to(self.device)
            if not self._context.set_input_shape(INPUT_NAME, tuple(ct_hu.shape)):
                raise ModelError(f"engine {self.engine_path} refuses input shape {tuple(ct_hu.shape)}")
            self._context.set_tensor_address(INPUT_NAME, ct_hu.data_ptr())
            outputs = {}
            for name, dtype in self._output_dtypes.items():
                shape = tuple(self._context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT failed to run engine {self.engine_path} (its messages above "
                                   "say why)")
            arrays = {name: tensor.cpu().numpy() for name, tensor in outputs.items()}  # waits for the run
        return Outputs.from_named(arrays)
