"""The Triton conv3d and fused conv+BatchNorm+ReLU(+residual) against the PyTorch reference.

Outputs, every gradient and the BatchNorm running statistics are compared with the real
`ConvBNReLU` / `ResidualBlock` / ``F.conv3d`` computed in float64 (the kernels accumulate in
fp32; the interpreter's ``tl.dot`` cannot take fp64 with an fp32 accumulator).

On the CPU the kernels run under Triton's interpreter, in a child pytest process started by
`test_kernels_in_the_interpreter` with TRITON_INTERPRET=1. In-process is not safe: Triton
binds its own ``@triton.jit`` helpers (``tl.zeros``, ``tl.sum``) to the interpreter or to the
compiler when ``triton.language`` is first imported, which in a pytest session is whenever
another test module first imports Triton; and the variable would leak into other modules.
The `gpu` tests run the compiled kernels at full ConvRes shapes on a CUDA GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import run_interpreted

from naslung.kernels.runtime import interpreting
from naslung.models.blocks import ConvBNReLU, ResidualBlock

pytest.importorskip("triton")

INTERPRETED = interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process "
                                 "of test_kernels_in_the_interpreter")
HAS_CUDA = torch.cuda.is_available() and not INTERPRETED

FP32_REL = 1e-4
BF16_REL = 2e-2


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_kernels_in_the_interpreter():
    proc = run_interpreted(__file__)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Helpers


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |actual - expected| over max |expected| (or over max |scale|)."""
    ref = expected if scale is None else scale
    err = (actual.double() - expected.double()).abs().max()
    return (err / ref.double().abs().max().clamp_min(1e-30)).item()


def randomise_bn(block: ConvBNReLU, seed: int) -> ConvBNReLU:
    """Non-trivial BN affine and running statistics, so that folding and updating are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t, lo, hi in ((block.bn.weight, 0.5, 1.5), (block.bn.bias, -0.5, 0.5),
                          (block.bn.running_mean, -0.3, 0.3), (block.bn.running_var, 0.5, 2.0)):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return block


def fused(block: ConvBNReLU, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The block's forward on the Triton kernels (the reference module's own parameters)."""
    from naslung.kernels.batchnorm import conv_bn_relu

    conv, bn = block.conv, block.bn
    return conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        training=bn.training, momentum=bn.momentum, eps=bn.eps, stride=conv.stride[0],
                        padding=conv.padding[0], residual=residual)


def block_errors(ref: ConvBNReLU, ours: ConvBNReLU) -> dict[str, float]:
    """Relative errors of every parameter gradient and running statistic of ``ours``."""
    errs = {"conv.weight.grad": rel_err(ours.conv.weight.grad, ref.conv.weight.grad),
            "bn.weight.grad": rel_err(ours.bn.weight.grad, ref.bn.weight.grad),
            "bn.bias.grad": rel_err(ours.bn.bias.grad, ref.bn.bias.grad),
            "running_mean": rel_err(ours.bn.running_mean, ref.bn.running_mean),
            "running_var": rel_err(ours.bn.running_var, ref.bn.running_var)}
    if ref.conv.bias is not None:
        # In training mode the conv bias gradient is zero up to rounding: scale by the weight's.
        errs["conv.bias.grad"] = rel_err(ours.conv.bias.grad, ref.conv.bias.grad, ref.conv.weight.grad)
    return errs


def run_block(n, c_in, c_out, size, ksize, stride, bias, residual, training, dtype, device="cpu", seed=0):
    """(errors of ours in ``dtype``, errors of torch's own module in ``dtype``) against float64."""
    torch.manual_seed(seed)
    ref = randomise_bn(ConvBNReLU(c_in, c_out, ksize, stride, bias), seed).double().to(device).train(training)
    ours = copy.deepcopy(ref).to(dtype=dtype)
    torch_low = copy.deepcopy(ref).to(dtype=dtype)
    x = torch.randn(n, c_in, size, size, size, dtype=torch.float64, device=device)
    out_size = (size + 2 * (ksize // 2) - ksize) // stride + 1
    out_shape = (n, c_out, out_size, out_size, out_size)
    r = torch.randn(out_shape, dtype=torch.float64, device=device) if residual else None
    dy = torch.randn(out_shape, dtype=torch.float64, device=device)

    def step(module, forward, dtype):
        xi = x.detach().to(dtype).requires_grad_()
        ri = r.detach().to(dtype).requires_grad_() if residual else None
        y = forward(module, xi, ri)
        y.backward(dy.to(dtype))
        return y, xi.grad, ri.grad if residual else None

    y_ref, dx_ref, dr_ref = step(ref, lambda m, xi, ri: m(xi) + ri if residual else m(xi), torch.float64)
    results = []
    for module, forward in ((ours, fused), (torch_low, lambda m, xi, ri: m(xi) + ri if residual else m(xi))):
        y, dx, dr = step(module, forward, dtype)
        errs = {"out": rel_err(y, y_ref), "x.grad": rel_err(dx, dx_ref), **block_errors(ref, module)}
        if residual:
            errs["residual.grad"] = rel_err(dr, dr_ref)
        results.append((y, errs))
    (y, ours_errs), (_, torch_errs) = results
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last_3d)
    return ours_errs, torch_errs


# (batch, c_in, c_out, spatial size, kernel size, stride, conv bias, residual): every conv ConvRes
# has (3^3 s1, the stage's 3^3 s2 without bias, the 1^3 s1 shortcut, the 1->4 stem), odd sizes.
BLOCKS = [
    pytest.param(2, 1, 4, 8, 3, 1, True, False, id="stem-1to4-8c-b2"),
    pytest.param(2, 3, 5, 7, 3, 1, True, True, id="k3s1-3to5-7c-b2-residual"),
    pytest.param(1, 5, 5, 9, 3, 2, False, False, id="k3s2-5to5-9c-b1-nobias"),
    pytest.param(2, 3, 5, 5, 1, 1, True, True, id="k1s1-3to5-5c-b2-residual"),
]


# ----------------------------------------------------------------------------------------------
# Under the interpreter


@interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, ksize, stride, bias", [
    (2, 3, 5, 7, 3, 1, True), (1, 5, 3, 9, 3, 2, False), (1, 3, 5, 8, 3, 2, False), (2, 5, 3, 5, 1, 1, True),
])
@pytest.mark.parametrize("dtype, rel", [(torch.float32, FP32_REL), (torch.bfloat16, BF16_REL)],
                         ids=["fp32", "bf16"])
def test_conv3d_matches_torch(n, c_in, c_out, size, ksize, stride, bias, dtype, rel):
    from naslung.kernels.conv3d import conv3d

    if dtype == torch.bfloat16 and (ksize, size) != (3, 9):
        pytest.skip("one bf16 case keeps the interpreter run short (bf16 is tested more on a GPU)")
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size, size, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(c_out, c_in, ksize, ksize, ksize, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv3d(x, w, b, stride=stride, padding=ksize // 2)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xl, wl = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    bl = b.detach().to(dtype).requires_grad_() if bias else None
    out = conv3d(xl, wl, bl, stride=stride, padding=ksize // 2)
    out.backward(dy.to(dtype))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(out, ref) < rel
    assert rel_err(xl.grad, x.grad) < rel
    assert rel_err(wl.grad, w.grad) < rel
    if bias:
        assert rel_err(bl.grad, b.grad) < rel


@interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, ksize, stride, bias, residual", BLOCKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_matches_the_reference_block_fp32(n, c_in, c_out, size, ksize, stride, bias, residual,
                                                       training):
    if not training and c_in == 1:
        pytest.skip("eval mode folds the same way for every shape; the stem is covered in training")
    errs, _ = run_block(n, c_in, c_out, size, ksize, stride, bias, residual, training, torch.float32)
    assert max(errs.values()) < FP32_REL, errs


@interpreted
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_bf16_is_as_accurate_as_torch_bf16(training):
    """bf16 activations make BN's backward lose digits to cancellation in torch too: ours must
    stay within twice torch's own bf16 error (plus BF16_REL) of the float64 result."""
    ours, torch_bf16 = run_block(2, 3, 5, 7, 3, 1, True, True, training, torch.bfloat16)
    assert ours["out"] < BF16_REL, ours
    bad = {k: (v, torch_bf16[k]) for k, v in ours.items() if v > 2 * torch_bf16[k] + BF16_REL}
    assert not bad, bad


@interpreted
def test_inference_is_one_fused_launch_and_matches():
    """Eval mode under no_grad: BN folded, bias+ReLU+residual in the conv's epilogue."""
    from naslung.kernels import conv3d as conv_module

    torch.manual_seed(1)
    ref = randomise_bn(ConvBNReLU(3, 5, 3), 1).double().eval()
    ours = copy.deepcopy(ref).float()
    x = torch.randn(2, 3, 7, 7, 7, dtype=torch.float64)
    r = torch.randn(2, 5, 7, 7, 7, dtype=torch.float64)
    launches = []
    kernel = conv_module._conv3d_fwd_kernel
    original = kernel.run
    kernel.run = lambda *a, **k: launches.append(k) or original(*a, **k)
    try:
        with torch.no_grad():
            y = fused(ours, x.float(), r.float())
    finally:
        del kernel.run
    assert len(launches) == 1 and launches[0]["RELU"] and launches[0]["HAS_RESIDUAL"]
    assert rel_err(y, ref(x) + r) < FP32_REL


@interpreted
def test_residual_block_training_step_matches_the_reference():
    """ResidualBlock(3, 5) in training, with the sum fused into conv2's normalise pass:
    output, the input's and every parameter's gradient, every running statistic."""
    torch.manual_seed(2)
    ref = ResidualBlock(3, 5).double().train()
    for i, block in enumerate((ref.conv1, ref.conv2, ref.shortcut)):
        randomise_bn(block, i)
    ours = copy.deepcopy(ref).float()
    x = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    y_ref = ref(x)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    xf = x.detach().float().requires_grad_()
    y = fused(ours.conv2, fused(ours.conv1, xf), residual=fused(ours.shortcut, xf))
    y.backward(dy.float())
    assert rel_err(y, y_ref) < FP32_REL
    assert rel_err(xf.grad, x.grad) < FP32_REL
    for name in ("conv1", "conv2", "shortcut"):
        errs = block_errors(getattr(ref, name), getattr(ours, name))
        assert max(errs.values()) < FP32_REL, (name, errs)


# ----------------------------------------------------------------------------------------------
# Host-side checks (no launch, run anywhere)


def test_unsupported_convolutions_are_refused():
    from naslung.kernels.conv3d import conv3d

    x = torch.randn(1, 2, 5, 5, 5)
    with pytest.raises(ValueError, match="size 1 or 3"):
        conv3d(x, torch.randn(3, 2, 5, 5, 5), padding=2)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        conv3d(x, torch.randn(3, 2, 3, 3, 3), stride=3, padding=1)
    with pytest.raises(ValueError, match="channels"):
        conv3d(x, torch.randn(3, 4, 3, 3, 3), padding=1)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        conv3d(x.double(), torch.randn(3, 2, 3, 3, 3, dtype=torch.float64), padding=1)


def test_training_needs_more_than_one_value_per_channel():
    from naslung.kernels.batchnorm import conv_bn_relu

    block = ConvBNReLU(2, 3, 3, stride=2)
    with pytest.raises(ValueError, match="more than one value"):
        fused(block, torch.randn(1, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="running_mean"):
        conv_bn_relu(torch.randn(1, 2, 3, 3, 3), block.conv.weight, None, block.bn.weight, block.bn.bias,
                     None, None, training=False, momentum=0.1, eps=1e-5, stride=1, padding=1)


def test_a_residual_of_another_dtype_is_refused_before_any_launch():
    from naslung.kernels.conv3d import conv3d_relu

    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3)
    with pytest.raises(TypeError, match="residual is torch.float64"):
        conv3d_relu(x, w, None, 1, 1, residual=torch.randn(1, 3, 4, 4, 4, dtype=torch.float64))


@interpreted
def test_wgrad_programs_loop_over_splits_beyond_the_grid(monkeypatch):
    """With the grid's third dimension capped at 1 and at 2, one program takes several splits of
    output positions: the weight and bias gradients stay torch's."""
    from naslung.kernels import conv3d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20, 20)  # 16,000 output positions: 4 splits of the interpreter's 4,096
    w, b = torch.randn(5, 3, 3, 3, 3), torch.randn(5)
    dy = torch.randn(2, 5, 20, 20, 20)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    F.conv3d(xr, wr, br, padding=1).backward(dy.double())
    for cap in (1, 2, 65_535):
        monkeypatch.setattr(conv3d, "MAX_GRID_Z", cap)
        dw, db = conv3d.conv3d_wgrad(x, dy, w.shape, 1, 1, bias=True)
        assert rel_err(dw, wr.grad) < FP32_REL and rel_err(db, br.grad) < FP32_REL, cap


@interpreted
def test_cumulative_running_statistics_match_torch_without_a_host_sync():
    """BatchNorm with momentum=None averages over num_batches_tracked, which the kernel reads on
    the device (a CUDA graph can capture it)."""
    from naslung.models.fused import fuse

    torch.manual_seed(0)
    ref = ConvBNReLU(2, 4, 3)
    ref.bn.momentum = None
    ours = fuse(copy.deepcopy(ref))
    for step in range(3):
        x = torch.randn(2, 2, 6, 6, 6) + step
        ref(x.double().float())
        ours(x)
    assert ours.bn.num_batches_tracked.item() == 3
    assert rel_err(ours.bn.running_mean, ref.bn.running_mean) < FP32_REL
    assert rel_err(ours.bn.running_var, ref.bn.running_var) < FP32_REL


# ----------------------------------------------------------------------------------------------
# On a GPU, compiled, at full ConvRes shapes (batch 8, a 32^3 crop)

GPU_BLOCKS = [
    pytest.param(8, 1, 4, 32, 3, 1, True, False, id="stem1-1to4-32c"),
    pytest.param(8, 4, 4, 32, 3, 1, True, False, id="stem2-4to4-32c"),
    pytest.param(8, 4, 4, 32, 3, 2, False, False, id="down-4-32c"),
    pytest.param(8, 4, 16, 16, 3, 1, True, True, id="k3s1-4to16-16c-residual"),
    pytest.param(8, 4, 16, 16, 1, 1, True, False, id="k1s1-4to16-16c"),
    pytest.param(8, 32, 64, 8, 3, 1, True, True, id="k3s1-32to64-8c-residual"),
    pytest.param(8, 64, 64, 16, 3, 2, False, False, id="down-64-16c"),
    pytest.param(8, 128, 256, 4, 3, 1, True, True, id="k3s1-128to256-4c-residual"),
    pytest.param(8, 256, 512, 4, 1, 1, True, False, id="k1s1-256to512-4c"),
    pytest.param(8, 512, 512, 4, 3, 1, True, True, id="k3s1-512-4c-residual"),
]


@pytest.mark.parametrize("n, c_in, c_out, size, ksize, stride, bias, residual", GPU_BLOCKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_conv_bn_relu_full_shapes(n, c_in, c_out, size, ksize, stride, bias, residual, training, dtype,
                                      monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 (ours follow it)
    ours, torch_low = run_block(n, c_in, c_out, size, ksize, stride, bias, residual, training, dtype, "cuda")
    if dtype == torch.float32:
        assert max(ours.values()) < FP32_REL, ours
    else:
        assert ours["out"] < BF16_REL, ours
        bad = {k: (v, torch_low[k]) for k, v in ours.items() if v > 2 * torch_low[k] + BF16_REL}
        assert not bad, bad


@pytest.mark.parametrize("c_in, c_out, size, ksize, stride", [
    (1, 4, 32, 3, 1), (4, 4, 32, 3, 2), (16, 32, 16, 1, 1), (64, 128, 8, 3, 1), (512, 512, 4, 3, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_conv3d_full_shapes(c_in, c_out, size, ksize, stride, monkeypatch):
    from naslung.kernels.conv3d import conv3d

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    x = torch.randn(8, c_in, size, size, size, dtype=torch.float64, device="cuda", requires_grad=True)
    w = (torch.randn(c_out, c_in, ksize, ksize, ksize, dtype=torch.float64, device="cuda")
         / (c_in * ksize**3) ** 0.5).requires_grad_()
    b = torch.randn(c_out, dtype=torch.float64, device="cuda", requires_grad=True)
    ref = F.conv3d(x, w, b, stride=stride, padding=ksize // 2)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xl, wl, bl = (t.detach().float().requires_grad_() for t in (x, w, b))
    out = conv3d(xl, wl, bl, stride=stride, padding=ksize // 2)
    out.backward(dy.float())
    for got, want in ((out, ref), (xl.grad, x.grad), (wl.grad, w.grad), (bl.grad, b.grad)):
        assert rel_err(got, want) < FP32_REL
