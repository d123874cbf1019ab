"""A whole ConvRes training step on the fused Triton kernels against the reference model.

Loss, every parameter gradient and every BatchNorm running statistic after one training step,
then the eval-mode (BN folded) output, for both CBAM variants, on odd spatial sizes. On the CPU
the kernels run under Triton's interpreter in a child pytest process (see
tests/test_kernels_conv.py for why not in-process); on a GPU the `gpu` test runs a full-size
step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_interpreted

from naslung.kernels.runtime import interpreting
from naslung.testing import compare_step

pytest.importorskip("triton")

INTERPRETED = interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_fused_convres_in_the_interpreter():
    proc = run_interpreted(__file__)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


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
