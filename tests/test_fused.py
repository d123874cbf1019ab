"""The fused ConvRes: same state_dict as the reference, conversion, and kernel selection."""

from __future__ import annotations

import pytest
import torch

from naslung.cli import main
from naslung.models import ConvRes
from naslung.models.fused import (
    FusedConvBNReLU,
    FusedResidualBlock,
    FusedResidualCBAM,
    FusedWooCBAM,
    fuse,
    resolve_kernels,
)


@pytest.mark.parametrize("cbam, fused_cbam", [("nas-lung", FusedResidualCBAM), ("woo", FusedWooCBAM)])
def test_fuse_swaps_every_block_and_keeps_the_state_dict(cbam, fused_cbam):
    reference = ConvRes("4,8/8/16", cbam=cbam)
    fused = fuse(reference)
    kinds = {type(m) for m in fused.modules()}
    assert {FusedConvBNReLU, FusedResidualBlock, fused_cbam} <= kinds
    assert not any(type(m).__name__ in ("ConvBNReLU", "ResidualBlock") for m in fused.modules())
    assert type(reference.stem[0]).__name__ == "ConvBNReLU", "the reference is left alone"
    ref_state, fused_state = reference.state_dict(), fused.state_dict()
    assert list(ref_state) == list(fused_state)
    assert all(torch.equal(ref_state[k], fused_state[k]) for k in ref_state)


def test_checkpoints_load_both_ways():
    reference, other = ConvRes("4/8/8"), ConvRes("4/8/8")
    fused = fuse(other)
    fused.load_state_dict(reference.state_dict())
    back = ConvRes("4/8/8")
    back.load_state_dict(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 back.state_dict().values(), strict=True))


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_kernels("auto", torch.device("cuda")) == "triton"
    assert resolve_kernels("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_kernels("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown kernels"):
        resolve_kernels("cudnn", torch.device("cpu"))


def test_triton_kernels_on_the_cpu_is_a_usage_error(sphere_store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["train", "--data-dir", str(sphere_store.root), "--device", "cpu", "--kernels", "triton",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "search"])
def test_cuda_graphs_on_the_cpu_is_a_usage_error(sphere_store, tmp_path, capsys, command):
    code = main([command, "--data-dir", str(sphere_store.root), "--device", "cpu", "--cuda-graphs",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
