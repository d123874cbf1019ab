"""ConvRes on the csrc/ kernels (host build): a whole training step against the float64
reference, the same state_dict, and `naslung train --kernels native` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from naslung.cli import main
from naslung.models import ConvRes
from naslung.models.fused import fuse
from naslung.native.library import library_path
from naslung.testing import compare_step

pytestmark = pytest.mark.skipif(library_path("host") is None, reason="the host kernel library is not built")


@pytest.mark.parametrize("cbam", ["nas-lung", "woo"])
def test_training_step_matches_the_reference(cbam):
    compare_step("4,8/8/12", cbam, crop=9, batch=2, device="cpu", dtype_tol=1e-3, backend="native")


def test_batch_of_one_and_odd_crop_match_the_reference():
    compare_step("4/4/8", "nas-lung", crop=11, batch=1, device="cpu", dtype_tol=1e-3, backend="native")


def test_default_arch_step_matches_the_reference():
    compare_step("4,8,16/32,32/64,128", "nas-lung", crop=16, batch=2, device="cpu", dtype_tol=1e-3,
                 backend="native")


def test_native_modules_keep_the_reference_state_dict():
    reference = ConvRes("4,8/8/12")
    native = fuse(reference, backend="native")
    assert list(native.state_dict()) == list(reference.state_dict())
    ConvRes("4,8/8/12").load_state_dict(native.state_dict())


def test_train_with_native_kernels_end_to_end(sphere_store, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(sphere_store.root), "--arch", "4/4/8", "--epochs", "1",
                 "--folds", "0", "--kernels", "native", "--device", "cpu", "--precision", "fp32",
                 "--no-progress", "--no-verify", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["kernels"] == "native"
    assert (out / "fold0" / "predictions.csv").is_file()


def test_cuda_kernels_on_the_cpu_are_refused_with_one_line(sphere_store, tmp_path, capsys):
    code = main(["train", "--data-dir", str(sphere_store.root), "--kernels", "cuda", "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--kernels cuda runs on a CUDA GPU" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_on_the_cuda_build_matches_the_reference():
    compare_step("4,8,16/32,32/64,128", "nas-lung", crop=32, batch=8, device="cuda", dtype_tol=2e-3,
                 backend="native")
