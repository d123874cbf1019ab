"""A whole ConvRes training step on the fused Triton kernels against the reference model.

Loss, every parameter gradient and every BatchNorm running statistic after one training step,
then the eval-mode (BN folded) output, for both CBAM variants, on odd spatial sizes. On the CPU
the kernels run under Triton's interpreter in a child pytest process (see
tests/test_kernels_conv.py for why not in-process); on a GPU the `gpu` test runs a full-size
step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_interpreted

from naslung.kernels.runtime import interpreting
from naslung.models import ConvRes, make_loss
from naslung.models.fused import fuse

pytest.importorskip("triton")

INTERPRETED = interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_fused_convres_in_the_interpreter():
    proc = run_interpreted(__file__)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| over max |expected|, or over ``floor`` where that is smaller (the
    gradient of a conv bias followed by BatchNorm is zero up to rounding)."""
    err = (actual.double() - expected.double()).abs().max()
    return (err / expected.double().abs().max().clamp_min(floor)).item()


def training_step(model: ConvRes, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = make_loss(model.head)(model(x), y)
    loss.backward()
    return loss


def compare_step(arch: str, cbam: str, crop: int, batch: int, device: str, dtype_tol: float) -> None:
    torch.manual_seed(0)
    reference = ConvRes(arch, cbam=cbam).to(device)
    fused_model = fuse(copy.deepcopy(reference))
    reference = reference.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, crop, crop, crop, generator=g).to(device)
    y = (torch.arange(batch) % 2).to(device)

    loss_ref = training_step(reference, x.double(), y)
    loss_fused = training_step(fused_model, x, y)
    assert abs(loss_fused.item() - loss_ref.item()) <= dtype_tol * max(1.0, abs(loss_ref.item()))
    ref_params = dict(reference.named_parameters())
    largest = max(p.grad.abs().max().item() for p in ref_params.values())
    for name, param in fused_model.named_parameters():
        assert param.grad is not None, name
        assert rel_err(param.grad, ref_params[name].grad, 1e-3 * largest) < dtype_tol, name
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in fused_model.named_buffers():
        if buffer.is_floating_point():
            assert rel_err(buffer, ref_buffers[name]) < dtype_tol, name
        else:
            assert torch.equal(buffer, ref_buffers[name]), name

    reference.eval()
    fused_model.eval()
    with torch.no_grad():
        assert rel_err(fused_model(x), reference(x.double())) < dtype_tol


@interpreted
@pytest.mark.parametrize("cbam", ["nas-lung", "woo"])
def test_training_step_matches_the_reference(cbam):
    compare_step("4,8/8/12", cbam, crop=9, batch=2, device="cpu", dtype_tol=1e-3)


@interpreted
def test_batch_of_one_matches_the_reference():
    compare_step("4/4/8", "nas-lung", crop=9, batch=1, device="cpu", dtype_tol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["4,8,16/32,32/64,128", "16,32/64,64/128"])
def test_training_step_matches_the_reference_on_the_gpu(arch, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare_step(arch, "nas-lung", crop=32, batch=8, device="cuda", dtype_tol=2e-3)
