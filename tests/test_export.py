"""naslung-export: the deployed ensemble against the reference, the ONNX graph, its metadata,
ONNX Runtime parity on synthetic, phantom and real LIDC crops, and bad model files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_sphere_store

from naslung.cli import export_main
from naslung.data.augment import Normalisation, centre_crop
from naslung.export.deploy import ONNX_FILE, REPORT_FILE
from naslung.export.ensemble import (
    DeployedEnsemble,
    DeployedMember,
    best_fold_checkpoint,
    grad_cam,
    load_ensemble,
    log_odds_direction,
)
from naslung.export.metadata import (
    FORMAT,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ModelError,
    read_onnx_metadata,
)
from naslung.export.onnx_export import export_onnx
from naslung.export.runners import OnnxRunner, TorchRunner, open_runner
from naslung.models import ConvRes
from naslung.models.fused import FUSED, fuse
from naslung.testing import randomise_batchnorm
from naslung.train.checkpoint import save_checkpoint
from naslung.train.ensemble import majority_vote, run_ensemble
from naslung.train.trainer import predict_proba

FRONT = [{"arch": "4/4/4", "accuracy": 0.7, "cost": 100}, {"arch": "4/8/8", "accuracy": 0.7, "cost": 200}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_sphere_store(tmp_path_factory.mktemp("spheres") / "store", n=32, n_folds=4)


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, store):
    """A real `naslung ensemble` output: two members cross-validated for one epoch."""
    search = tmp_path_factory.mktemp("search")
    (search / "pareto.json").write_text(json.dumps({"front": FRONT, "metric": "accuracy"}))
    out = search / "ensemble"
    run_ensemble(search, store, out, torch.device("cpu"), top=2, epochs=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def exported(ensemble_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert export_main(["--run", str(ensemble_dir.parent), "--out", str(out)]) == 0
    return out


def store_crops(store, crop: int, count: int | None = None) -> np.ndarray:
    volumes = torch.from_numpy(np.array(store.crops[:count]))
    return centre_crop(volumes, crop).float().numpy()


# --- the deployed module against the reference ------------------------------------------------

@pytest.mark.parametrize("head", ["asoftmax", "linear"])
def test_grad_cam_is_autograd_grad_cam_of_the_log_odds(head):
    torch.manual_seed(0)  # a model and input whose map is not all clipped by the ReLU
    model = ConvRes("4,8/8/16", head=head).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    feature_map, _ = model.explained_features(x)
    feature_map = feature_map.detach().requires_grad_(True)
    logits = model.head(model.pool(feature_map).flatten(1))
    (logits[:, 1] - logits[:, 0]).sum().backward()
    weights = feature_map.grad.mean(dim=(2, 3, 4), keepdim=True)
    expected = torch.relu((weights * feature_map).sum(1, keepdim=True))
    actual = grad_cam(feature_map.detach(), log_odds_direction(model.head))
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-7)
    assert actual.max() > 0


def test_member_probability_is_what_evaluation_computed(store):
    torch.manual_seed(1)
    model = randomise_batchnorm(ConvRes("4/8/8"))
    volumes = torch.from_numpy(np.array(store.crops[:6]))
    normalisation = Normalisation.fit(volumes, 32)
    expected = predict_proba(model, volumes, normalisation, 32)
    member = DeployedMember(model, normalisation)
    with torch.no_grad():
        probability, attention, cam = member(centre_crop(volumes, 32).float()[:, None])
    np.testing.assert_allclose(probability.numpy(), expected, rtol=0, atol=1e-6)
    assert attention.shape == (6, 1, 32, 32, 32) and 0 <= attention.min() and attention.max() <= 1
    assert cam.shape == (6, 1, 4, 4, 4) and torch.allclose(cam.amax(dim=(2, 3, 4)), torch.ones(6, 1))


class FixedProbability(torch.nn.Module):
    """A member that answers one probability for every crop, to pin down the vote rule."""

    def __init__(self, probability: float) -> None:
        super().__init__()
        self.probability = probability

    def forward(self, hu):
        n = len(hu)
        return (torch.full((n,), self.probability), torch.zeros(n, 1, 4, 4, 4), torch.zeros(n, 1, 1, 1, 1))


@pytest.mark.parametrize("probabilities, vote", [
    ((0.6, 0.4), 1),  # a tie votes malignant, as the ensemble table counts it
    ((0.4, 0.4, 0.6), 0), ((0.6, 0.6, 0.4), 1), ((0.5,), 1), ((0.49,), 0)])
def test_the_majority_vote_rule(probabilities, vote):
    ensemble = DeployedEnsemble([FixedProbability(p) for p in probabilities], metadata=None)
    mean, members, majority, _, _ = ensemble(torch.zeros(3, 1, 4, 4, 4))
    assert majority.tolist() == [vote] * 3 and majority.dtype == torch.int64
    assert mean.tolist() == pytest.approx([np.mean(probabilities)] * 3)
    assert vote == int(majority_vote(np.array(probabilities)[:, None])[0] >= 0.5)


def test_a_fused_model_is_exported_through_the_reference_modules():
    member = DeployedMember(fuse(ConvRes("4/4/8")), Normalisation(-1000, 400, -600, 300))
    fused_classes = set(FUSED["triton"].values())
    assert not [m for m in member.modules() if type(m) in fused_classes]


def test_the_best_validation_fold_is_deployed(tmp_path):
    model = ConvRes("4/4/4")
    # fold 2's validation fold had one class (AUC NaN): training scored it by accuracy, 0.95
    scores = {0: (0.6, 0.7), 1: (0.9, 0.5), 2: (float("nan"), 0.95), 3: (0.9, 0.8), 4: (0.95, None)}
    for fold, (auc, accuracy) in scores.items():
        save_checkpoint(tmp_path / f"fold{fold}", model, {
            "fold": fold, "crop": 32, "val_metrics": {"auc": auc, "accuracy": accuracy},
            "train_config": {"select": "auc"},
            "normalisation": {"hu_min": -1000, "hu_max": 400, "mean": -600, "std": 300}})
    assert best_fold_checkpoint(tmp_path) == tmp_path / "fold2"
    (tmp_path / "fold2" / "model.json").unlink()
    assert best_fold_checkpoint(tmp_path) == tmp_path / "fold4"
    (tmp_path / "fold4" / "model.json").unlink()
    assert best_fold_checkpoint(tmp_path) == tmp_path / "fold1"  # ties go to the lower fold


# --- the ONNX file ------------------------------------------------------------------------------

def test_the_graph_is_checked_folded_and_batch_dynamic(exported):
    model = onnx.load(str(exported / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value


def test_the_metadata_says_how_to_feed_the_model(exported, ensemble_dir):
    metadata = read_onnx_metadata(exported / ONNX_FILE)
    assert metadata.archs == ["4/4/4", "4/8/8"]
    assert (metadata.crop, metadata.grid, metadata.spacing_mm, metadata.units) == (32, 40, 1.0, "HU")
    assert metadata.label_rule["threshold"] == 0.5 and "half" in metadata.label_rule["vote"]
    assert metadata.label_rule["reference_labels"]["source"] == "synthetic-spheres"
    assert {"naslung", "torch", "numpy", "onnx", "opset"} <= metadata.versions.keys()
    for member in metadata.members:
        member_run = Path(member.source).parent
        assert member_run.parent == ensemble_dir / "members"
        assert Path(member.source) == best_fold_checkpoint(member_run)
        assert set(member.normalisation) == {"hu_min", "hu_max", "mean", "std"}
        assert member.val_metrics is not None
    report = json.loads((exported / REPORT_FILE).read_text())
    assert report["parity_max_abs_difference"]["probability"] <= 1e-5


# --- ONNX Runtime against PyTorch ---------------------------------------------------------------

def assert_same_outputs(actual, expected, probability_atol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.probability, expected.probability, rtol=0, atol=probability_atol)
    np.testing.assert_allclose(actual.member_probabilities, expected.member_probabilities, rtol=0,
                               atol=probability_atol)
    np.testing.assert_array_equal(actual.majority_vote, expected.majority_vote)
    np.testing.assert_allclose(actual.attention, expected.attention, rtol=0, atol=1e-5)
    np.testing.assert_allclose(actual.gradcam, expected.gradcam, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_runtime_matches_pytorch_on_store_crops(exported, ensemble_dir, store, batch):
    crops = store_crops(store, 32, batch)
    onnx_out = OnnxRunner(exported / ONNX_FILE).run(crops)
    torch_out = TorchRunner(ensemble_dir).run(crops)
    assert onnx_out.probability.shape == (batch,) and onnx_out.member_probabilities.shape == (batch, 2)
    assert_same_outputs(onnx_out, torch_out)
    np.testing.assert_allclose(onnx_out.probability, onnx_out.member_probabilities.mean(axis=1), atol=1e-6)


@pytest.fixture(scope="module")
def real_crops(shared_lidc, tmp_path_factory):
    """The four kept nodules of the shared LIDC-IDRI series, cropped as `prepare lidc` does."""
    from naslung.data.lidc import prepare_lidc

    prepared = prepare_lidc(shared_lidc, tmp_path_factory.mktemp("lidc") / "store", workers=1,
                            progress=False)
    return store_crops(prepared.store, 32)


@pytest.fixture(scope="module")
def phantom_crops(tmp_path_factory):
    from naslung.data.phantom import prepare_phantom

    phantom = prepare_phantom(tmp_path_factory.mktemp("phantom") / "store", limit=4, workers=1,
                              n_folds=2, progress=False)
    return store_crops(phantom, 32)


@pytest.mark.parametrize("source", ["real_crops", "phantom_crops"])
def test_onnx_runtime_matches_pytorch_on_lidc_crops(exported, ensemble_dir, source, request):
    crops = request.getfixturevalue(source)
    assert len(crops) >= 2
    assert_same_outputs(OnnxRunner(exported / ONNX_FILE).run(crops), TorchRunner(ensemble_dir).run(crops))


def test_a_trained_and_folded_model_keeps_its_predictions(tmp_path, real_crops):
    """Non-trivial BatchNorm statistics (folded into the convolutions) on real CT."""
    torch.manual_seed(2)
    model = randomise_batchnorm(ConvRes("4,8/8,16/16"), seed=3)
    save_checkpoint(tmp_path / "ckpt", model, {
        "fold": 0, "crop": 32, "val_metrics": {"auc": 0.5}, "train_config": {"select": "auc"},
        "normalisation": {"hu_min": -1000, "hu_max": 400, "mean": -650, "std": 350}})
    ensemble = load_ensemble(tmp_path / "ckpt")
    path = export_onnx(ensemble, tmp_path / ONNX_FILE)
    assert_same_outputs(OnnxRunner(path).run(real_crops), TorchRunner(tmp_path / "ckpt").run(real_crops))


def test_an_fp16_graph_stays_close_to_fp32(exported, ensemble_dir, store, tmp_path):
    ensemble = load_ensemble(ensemble_dir).to_precision("fp16")
    path = export_onnx(ensemble, tmp_path / "model.fp16.onnx")
    assert read_onnx_metadata(path).precision == "fp16"
    crops = store_crops(store, 32, 4)
    half = OnnxRunner(path).run(crops)
    full = OnnxRunner(exported / ONNX_FILE).run(crops)
    np.testing.assert_allclose(half.probability, full.probability, rtol=0, atol=5e-3)


def test_open_runner_picks_by_path(exported, ensemble_dir):
    assert isinstance(open_runner(exported), OnnxRunner)
    assert isinstance(open_runner(exported / ONNX_FILE), OnnxRunner)
    assert isinstance(open_runner(ensemble_dir), TorchRunner)


# --- bad input ---------------------------------------------------------------------------------

def garbage(target):
    target.write_bytes(b"\x08\x07 not a model" * 50)
    return target


def without_metadata(source, target):
    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.save(model, str(target))
    return target


def foreign_model(target, metadata: str | None = None):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    if metadata is not None:
        onnx.helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("make, message", [
    (lambda d, src: garbage(d / "garbage.onnx"), "not an ONNX model"),
    (lambda d, src: without_metadata(src, d / "bare.onnx"), "no naslung metadata"),
    (lambda d, src: foreign_model(d / "foreign.onnx"), "no naslung metadata"),
    (lambda d, src: foreign_model(d / "foreign2.onnx", onnx.load(str(src)).metadata_props[0].value),
     "are not a naslung model's"),
    (lambda d, src: foreign_model(d / "old.onnx", json.dumps({"format": 0})), "metadata format"),
    (lambda d, src: foreign_model(d / "broken.onnx", json.dumps({"format": FORMAT, "members": []})),
     "incomplete or malformed"),
    (lambda d, src: d / "missing.onnx", "no such model file"),
])
def test_bad_model_files_are_refused_in_one_line(exported, tmp_path, make, message):
    path = make(tmp_path, exported / ONNX_FILE)
    with pytest.raises(ModelError, match=message) as info:
        OnnxRunner(path)
    assert "\n" not in str(info.value)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("naslung: error: ") and "\n" not in err
    return err


def test_export_refuses_runs_it_cannot_deploy(tmp_path, capsys):
    assert export_main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in one_line_error(capsys)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "pareto.json").write_text("{}")
    assert export_main(["--run", str(tmp_path / "search")]) == 2
    assert "naslung ensemble" in one_line_error(capsys)
    for opset in ("16", "999"):
        assert export_main(["--run", str(tmp_path / "search"), "--opset", opset]) == 2
        assert f"--opset {opset}: this torch and onnx export opsets 17.." in one_line_error(capsys)


def test_a_broken_checkpoint_leaves_no_export(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", ConvRes("4/4/4"), {
        "fold": 0, "crop": 32, "normalisation": {"hu_min": -1000, "hu_max": 400, "mean": 0, "std": 1}})
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"truncated")
    assert export_main(["--run", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "unusable checkpoint" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_trt_without_tensorrt_still_writes_the_onnx(ensemble_dir, tmp_path, capsys):
    from naslung.export.tensorrt import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT is usable here; tests/test_tensorrt.py covers the engine")
    out = tmp_path / "out"
    assert export_main(["--run", str(ensemble_dir), "--out", str(out), "--trt"]) == 2
    assert "TensorRT" in one_line_error(capsys)
    assert read_onnx_metadata(out / ONNX_FILE).archs == ["4/4/4", "4/8/8"]
    assert not list(out.glob("*.engine*")) and not list(out.glob(".*tmp*"))


def test_an_export_that_fails_its_parity_check_keeps_the_earlier_one(ensemble_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from naslung.export import deploy

    out = tmp_path / "out"
    assert export_main(["--run", str(ensemble_dir), "--out", str(out)]) == 0
    earlier = (out / ONNX_FILE).read_bytes()
    (out / "model.engine").write_bytes(b"an engine of an earlier export")
    monkeypatch.setattr(deploy, "PARITY_TOLERANCE", -1.0)  # every export now fails the check
    assert export_main(["--run", str(ensemble_dir), "--out", str(out)]) == 2
    assert "nothing exported" in one_line_error(capsys)
    assert (out / ONNX_FILE).read_bytes() == earlier and (out / "model.engine").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.engine", ONNX_FILE]
    assert export_main(["--run", str(ensemble_dir), "--out", str(tmp_path / "new")]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert export_main(["--run", str(ensemble_dir), "--out", str(out)]) == 0
    assert not (out / "model.engine").exists()  # it was built from the replaced graph


def test_a_checkpoint_file_exports_beside_its_folder(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", ConvRes("4/4/4"), {
        "fold": 0, "crop": 32, "normalisation": {"hu_min": -1000, "hu_max": 400, "mean": -600, "std": 300}})
    assert export_main(["--run", str(tmp_path / "ckpt" / "model.pt")]) == 0
    assert read_onnx_metadata(tmp_path / "ckpt" / "export" / ONNX_FILE).archs == ["4/4/4"]
    (tmp_path / "file").write_text("")
    assert export_main(["--run", str(tmp_path / "ckpt"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_line_error(capsys)
