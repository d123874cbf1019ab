"""TensorRT engines: what happens without TensorRT (every CI machine), the sidecar checks that
keep an engine to the TensorRT and GPU it was built for, and, on a GPU with TensorRT, engines
built from exported ONNX files compared with ONNX Runtime."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from naslung.data.augment import Normalisation
from naslung.export.ensemble import DeployedEnsemble, DeployedMember
from naslung.export.metadata import OUTPUT_NAMES, MemberInfo, ModelError, ModelMetadata, read_onnx_metadata
from naslung.export.onnx_export import export_onnx
from naslung.export.runners import OnnxRunner
from naslung.export.tensorrt import (
    SIDECAR_FIELDS,
    SIDECAR_FORMAT,
    TensorRTRunner,
    TensorRTUnavailable,
    build_engine,
    check_sidecar,
    read_sidecar,
    sidecar_path,
    tensorrt_available,
)
from naslung.models import ConvRes
from naslung.testing import randomise_batchnorm

NOT_INSTALLED = ("TensorRT is not installed: pip install 'naslung[trt]' on a machine with an NVIDIA GPU "
                 "and driver")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """TensorRT missing, as on CI, even on a machine that has it."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ModuleNotFoundError


def test_reason_here_is_one_line():
    reason = tensorrt_available()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are usable here")
    assert "\n" not in reason and ("TensorRT" in reason or "GPU" in reason)


def test_missing_tensorrt_is_named_with_what_to_install(no_tensorrt):
    assert tensorrt_available() == NOT_INSTALLED


@pytest.mark.parametrize("error", [ImportError, OSError])
def test_bindings_without_libraries_are_reported_not_raised(error, tmp_path, monkeypatch):
    """PyPI's tensorrt-cu13 bindings without NVIDIA's libraries fail inside `import tensorrt`."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        f"raise {error.__name__}('libnvinfer.so.11: cannot open shared object file:\\n"
        "No such file or directory')\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = tensorrt_available()
    assert reason == ("TensorRT is installed but cannot be loaded (libnvinfer.so.11: cannot open shared "
                      "object file: No such file or directory): pip install 'naslung[trt]' on a machine "
                      "with an NVIDIA GPU and driver")


def test_tensorrt_without_a_gpu_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = tensorrt_available()
    assert reason.startswith("no CUDA GPU") and "\n" not in reason


def fake_tensorrt(version: str, tf32_flag: bool = True) -> types.ModuleType:
    """A stand-in for the TensorRT module (which cannot be installed here) with only what the
    version branches read: its version, the network creation flag and the builder flags."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(**({"TF32": "TF32"} if tf32_flag else {}))
    return trt


class RecordingConfig:
    """A builder config that records the flags cleared on it."""

    def __init__(self):
        self.cleared = []

    def clear_flag(self, flag):
        self.cleared.append(flag)


@pytest.mark.parametrize("version, tf32_flag, flags, cleared", [
    ("10.13.0.35", True, 1 << 1, ["TF32"]),   # TensorRT 10: ask for strong typing, clear TF32
    ("11.4.0", True, 0, ["TF32"]),            # TensorRT 11: always strongly typed; TF32 still a flag
    ("11.4.0", False, 0, []),                 # a TensorRT 11 without the TF32 flag: nothing to clear
])
def test_the_version_branches_of_the_engine_builder(monkeypatch, version, tf32_flag, flags, cleared):
    from naslung.export.tensorrt import clear_tf32, network_flags

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, tf32_flag))
    config = RecordingConfig()
    clear_tf32(config)
    assert network_flags() == flags and config.cleared == cleared


def test_build_without_tensorrt_refuses_and_writes_nothing(no_tensorrt, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not looked at")
    engine = tmp_path / "out" / "model.engine"
    with pytest.raises(TensorRTUnavailable) as err:
        build_engine(onnx_path, engine)
    assert str(err.value) == NOT_INSTALLED
    assert not (tmp_path / "out").exists() and sorted(tmp_path.iterdir()) == [onnx_path]


def test_runner_without_tensorrt_refuses_before_reading_the_engine(no_tensorrt, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00garbage, no engine")
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        TensorRTRunner(engine)


# --- the sidecar ------------------------------------------------------------------------------

HERE = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}


def _sidecar(**changes) -> dict:
    sidecar = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.13.0.35",
               "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "precision": "fp32",
               "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": 64},
               "inputs": {"ct_hu": {"shape": [-1, 1, 32, 32, 32], "dtype": "FLOAT"}},
               "outputs": {name: {"shape": [-1], "dtype": "FLOAT"} for name in OUTPUT_NAMES},
               "onnx": "model.onnx", "onnx_sha256": "0" * 64, "engine_sha256": "1" * 64,
               "metadata": {"format": 1}}
    sidecar.update(changes)
    return sidecar


def test_sidecar_of_this_machine_is_accepted():
    check_sidecar(_sidecar(), "model.engine", **HERE)


@pytest.mark.parametrize("field, value, names", [
    ("tensorrt_version", "11.4.0.8", ["TensorRT 11.4.0.8", "TensorRT 10.13.0.35"]),
    ("gpu_name", "NVIDIA A100-SXM4-80GB", ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]),
    ("compute_capability", [8, 0], ["(sm_80)", "(sm_90)"]),
])
def test_engine_from_another_tensorrt_or_gpu_is_refused(field, value, names):
    with pytest.raises(ModelError) as err:
        check_sidecar(_sidecar(**{field: value}), "runs/model.engine", **HERE)
    message = str(err.value)
    assert message.startswith("engine runs/model.engine was built with TensorRT ")
    assert "this machine has" in message and message.endswith("rebuild it with `naslung-export --trt`")
    assert all(name in message for name in names) and "\n" not in message


def test_message_says_where_the_engine_was_built_and_what_is_here():
    with pytest.raises(ModelError) as err:
        check_sidecar(_sidecar(tensorrt_version="10.13", gpu_name="NVIDIA H100"), "model.engine",
                      tensorrt_version="11.4", gpu_name="NVIDIA A100", compute_capability=(8, 0))
    assert str(err.value) == ("engine model.engine was built with TensorRT 10.13 for NVIDIA H100 (sm_90); "
                              "this machine has TensorRT 11.4 and NVIDIA A100 (sm_80): rebuild it with "
                              "`naslung-export --trt`")


@pytest.mark.parametrize("field", SIDECAR_FIELDS)
def test_sidecar_lacking_a_field_is_refused(field):
    sidecar = _sidecar()
    del sidecar[field]
    with pytest.raises(ModelError, match=f"sidecar lacks {field}: rebuild it"):
        check_sidecar(sidecar, "model.engine", **HERE)


def test_sidecar_of_unknown_format_is_refused():
    with pytest.raises(ModelError, match="format 2, which this naslung does not know"):
        check_sidecar(_sidecar(format=2), "model.engine", **HERE)


@pytest.mark.parametrize("field, value", [("compute_capability", "9.0"), ("compute_capability", [9]),
                                          ("profile", None), ("profile", {"max_batch": "64"}),
                                          ("metadata", "{}")])
def test_sidecar_with_a_malformed_field_is_refused(field, value):
    with pytest.raises(ModelError, match=f"malformed {field}"):
        check_sidecar(_sidecar(**{field: value}), "model.engine", **HERE)


def test_missing_sidecar_is_refused(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(ModelError, match="sidecar model.engine.json is missing"):
        read_sidecar(engine)


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", "[1, 2]"])
def test_unreadable_sidecar_is_refused(tmp_path, text):
    engine = tmp_path / "model.engine"
    sidecar_path(engine).write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError, match="sidecar is not") as err:
        read_sidecar(engine)
    assert "\n" not in str(err.value)


def test_sidecar_sits_beside_its_engine(tmp_path):
    engine = tmp_path / "model.engine"
    assert sidecar_path(engine) == tmp_path / "model.engine.json"
    sidecar_path(engine).write_text(json.dumps(_sidecar()))
    assert read_sidecar(engine) == json.loads(json.dumps(_sidecar()))


# --- on a GPU with TensorRT -------------------------------------------------------------------

MAX_BATCH = 4
CROP = 32


def _ensemble() -> DeployedEnsemble:
    """Two small ConvRes members, random weights, BatchNorm away from its initial identity, so
    that probabilities, attention and Grad-CAM all vary."""
    torch.manual_seed(0)
    normalisation = Normalisation(-1200.0, 600.0, -700.0, 350.0)
    members, infos = [], []
    for arch in ("4/8/16", "4,8/8/16"):
        model = randomise_batchnorm(ConvRes(arch))
        members.append(DeployedMember(model, normalisation))
        infos.append(MemberInfo(arch=arch, cbam=model.cbam_variant, head=model.head_kind,
                                normalisation=normalisation.to_dict(), source="test"))
    metadata = ModelMetadata(crop=CROP, grid=CROP, spacing_mm=1.0, outside_hu=-1000.0, units="HU",
                             members=infos, label_rule={"threshold": 0.5})
    return DeployedEnsemble(members, metadata).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The fp32 and fp16 ONNX files of one ensemble and their engines (batch 1..MAX_BATCH)."""
    reason = tensorrt_available()  # also None only with a CUDA GPU
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("trt")
    ensemble = _ensemble()
    onnx32 = export_onnx(ensemble, out / "model.onnx")
    onnx16 = export_onnx(copy.deepcopy(ensemble).to_precision("fp16"), out / "model.fp16.onnx")
    engine32 = build_engine(onnx32, out / "model.engine", max_batch=MAX_BATCH, opt_batch=2)
    engine16 = build_engine(onnx16, out / "model.fp16.engine", max_batch=MAX_BATCH, opt_batch=2,
                            precision="fp16")
    return {"onnx32": onnx32, "onnx16": onnx16, "engine32": engine32, "engine16": engine16}


def _crops(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1100, 400, (batch, CROP, CROP, CROP)).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("precision, atol, map_atol", [("fp32", 1e-4, 1e-3), ("fp16", 2e-2, 5e-2)])
def test_engine_matches_onnx_runtime(exported, batch, precision, atol, map_atol):
    """Both engines against ONNX Runtime on the fp32 graph (the reference an fp16 engine must stay
    close to)."""
    crops = _crops(batch, seed=batch)
    runner = TensorRTRunner(exported["engine32" if precision == "fp32" else "engine16"])
    got, want = runner.run(crops), OnnxRunner(exported["onnx32"]).run(crops)
    assert runner.metadata == read_onnx_metadata(exported["onnx32" if precision == "fp32" else "onnx16"])
    np.testing.assert_allclose(got.probability, want.probability, rtol=0, atol=atol)
    np.testing.assert_allclose(got.member_probabilities, want.member_probabilities, rtol=0, atol=atol)
    np.testing.assert_allclose(got.attention, want.attention, rtol=0, atol=map_atol)
    np.testing.assert_allclose(got.gradcam, want.gradcam, rtol=0, atol=map_atol)
    decided = (np.abs(want.member_probabilities - 0.5) > atol).all(axis=1)
    np.testing.assert_array_equal(got.majority_vote[decided], want.majority_vote[decided])
    assert got.majority_vote.dtype == np.int64 and got.probability.dtype == np.float32


@pytest.mark.gpu
def test_sidecar_records_the_build(exported):
    engine, onnx_path = exported["engine16"], exported["onnx16"]
    sidecar = read_sidecar(engine)
    assert sidecar["precision"] == "fp16"
    assert sidecar["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": MAX_BATCH}
    assert sidecar["compute_capability"] == list(torch.cuda.get_device_capability())
    assert sidecar["gpu_name"] == torch.cuda.get_device_name()
    assert sidecar["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert sidecar["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert list(sidecar["inputs"]) == ["ct_hu"] and set(sidecar["outputs"]) == set(OUTPUT_NAMES)
    assert ModelMetadata.from_json(json.dumps(sidecar["metadata"]), engine) == read_onnx_metadata(onnx_path)
    assert engine.with_name(engine.name + ".timing.cache").stat().st_size > 0


@pytest.mark.gpu
def test_runner_refuses_a_batch_beyond_the_profile(exported):
    runner = TensorRTRunner(exported["engine32"])
    with pytest.raises(ModelError, match=f"at most {MAX_BATCH} crops at a time"):
        runner.run(_crops(MAX_BATCH + 1))


@pytest.mark.gpu
def test_build_refuses_a_precision_the_onnx_does_not_compute_in(exported, tmp_path):
    with pytest.raises(ModelError, match="computes in fp32, not fp16"):
        build_engine(exported["onnx32"], tmp_path / "model.engine", precision="fp16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_runner_refuses_an_engine_built_for_another_gpu(exported, tmp_path):
    engine = shutil.copy(exported["engine32"], tmp_path / "model.engine")
    sidecar = {**read_sidecar(exported["engine32"]), "gpu_name": "Some Other GPU",
               "compute_capability": [7, 5]}
    sidecar_path(engine).write_text(json.dumps(sidecar))
    with pytest.raises(ModelError, match="for Some Other GPU \\(sm_75\\); this machine has"):
        TensorRTRunner(engine)


@pytest.mark.gpu
@pytest.mark.parametrize("honest_sidecar", [False, True])
def test_runner_refuses_a_corrupt_engine(exported, tmp_path, honest_sidecar):
    """A changed engine under the old sidecar is caught by its hash; garbage with a matching
    sidecar by TensorRT itself: one line either way, no crash."""
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64 + b"not a TensorRT plan")
    sidecar = read_sidecar(exported["engine32"])
    if honest_sidecar:
        sidecar["engine_sha256"] = hashlib.sha256(engine.read_bytes()).hexdigest()
    sidecar_path(engine).write_text(json.dumps(sidecar))
    expected = "cannot deserialize it" if honest_sidecar else "not the one its sidecar describes"
    with pytest.raises(ModelError, match=expected):
        TensorRTRunner(engine)
