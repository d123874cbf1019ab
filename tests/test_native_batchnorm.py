"""csrc/batchnorm.cu (host build) against torch's BatchNorm3d + ReLU (+ residual) in float64:
outputs, gradients of x, weight, bias and the residual, running statistics, train and eval."""

from __future__ import annotations

import pytest
import torch

from naslung.native.library import library_path

pytestmark = pytest.mark.skipif(library_path("host") is None, reason="the host kernel library is not built")

SHAPES = [(1, 4, 1, 1, 1), (1, 4, 2, 3, 5), (2, 8, 4, 4, 4), (3, 16, 5, 3, 7), (2, 32, 3, 3, 3),
          (1, 64, 2, 2, 2), (2, 128, 2, 1, 3), (1, 3, 6, 6, 6), (4, 1, 3, 3, 3), (1, 512, 1, 2, 1)]
"""Batch 1, 1^3 maps, odd sizes, every ConvRes width and odd ones."""


def run(x: torch.Tensor, residual: torch.Tensor | None, bn: torch.nn.BatchNorm3d, grad: torch.Tensor,
        native: bool) -> dict[str, torch.Tensor]:
    from naslung.native.batchnorm import batchnorm_relu

    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    if native:
        y = batchnorm_relu(x, bn, residual)
    else:
        y = torch.relu(bn(x)) + (0 if residual is None else residual)
    y.backward(grad)
    out = {"y": y, "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
           "running_mean": bn.running_mean, "running_var": bn.running_var}
    if residual is not None:
        out["dresidual"] = residual.grad
    return {k: v.detach().double() for k, v in out.items()}


def pair(channels: int, momentum: float | None, training: bool, seed: int):
    """A float64 reference BatchNorm3d and an fp32 copy, with non-trivial parameters and stats."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.nn.BatchNorm3d(channels, momentum=momentum).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=generator)
        reference.bias.uniform_(-0.5, 0.5, generator=generator)
        reference.running_mean.uniform_(-1, 1, generator=generator)
        reference.running_var.uniform_(0.5, 2, generator=generator)
    native = torch.nn.BatchNorm3d(channels, momentum=momentum)
    native.load_state_dict(reference.state_dict())
    return reference.train(training), native.train(training)


def assert_close(native: dict, reference: dict, rtol: float, atol: float) -> None:
    assert native.keys() == reference.keys()
    for key in reference:
        scale = reference[key].abs().max().item() + 1e-12
        torch.testing.assert_close(native[key], reference[key], rtol=rtol, atol=atol * scale, msg=key)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_fp32_matches_float64_reference(shape, training, with_residual):
    generator = torch.Generator().manual_seed(sum(shape))
    # fp32-representable inputs: the comparison measures the kernels, not the input's rounding
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).double()
    residual = torch.randn(shape, generator=generator).double() if with_residual else None
    grad = torch.randn(shape, generator=generator).double()
    reference_bn, native_bn = pair(shape[1], 0.1, training, seed=shape[1])
    if training and shape[0] * shape[2] * shape[3] * shape[4] == 1:
        pytest.skip("torch refuses training BatchNorm on one value per channel")
    reference = run(x, residual, reference_bn, grad, native=False)
    native = run(x.float(), None if residual is None else residual.float(), native_bn, grad.float(),
                 native=True)
    assert_close(native, reference, rtol=1e-4, atol=1e-5)


def test_cumulative_average_without_momentum_and_batch_counter():
    """momentum=None: running stats are the average over batches, as torch computes them."""
    reference_bn, native_bn = pair(8, None, True, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 8, 3, 4, 5, generator=generator).double()
        grad = torch.randn_like(x)
        reference = run(x, None, reference_bn, grad, native=False)
        native = run(x.float(), None, native_bn, grad.float(), native=True)
        reference_bn.zero_grad()
        native_bn.zero_grad()
        assert_close(native, reference, rtol=1e-4, atol=1e-5)
    assert int(native_bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 3


def test_large_offset_keeps_the_variance():
    """Welford partials: a mean 10^4 standard deviations from zero does not cancel the variance
    away in fp32 (sums of squares would), so the output and the running variance hold."""
    x = (torch.randn(2, 4, 8, 8, 8) * 0.1 + 1000.0).double()
    reference_bn, native_bn = pair(4, 0.1, True, seed=1)
    grad = torch.randn_like(x)
    native = run(x.float(), None, native_bn, grad.float(), native=True)
    reference = run(x, None, reference_bn, grad, native=False)
    for key in ("y", "running_mean", "running_var"):
        torch.testing.assert_close(native[key], reference[key], rtol=1e-2, atol=1e-2, msg=key)


@pytest.mark.parametrize("shape", [(2, 8, 4, 4, 4), (1, 32, 3, 5, 2)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_storage_matches_loosely(shape):
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).bfloat16().double()
    residual = torch.randn(shape, generator=generator, dtype=torch.float64).bfloat16().double()
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).bfloat16().double()
    reference_bn, native_bn = pair(shape[1], 0.1, True, seed=2)
    reference = run(x, residual, reference_bn, grad, native=False)
    native = run(x.bfloat16(), residual.bfloat16(), native_bn, grad.bfloat16(), native=True)
    assert_close(native, reference, rtol=3e-2, atol=3e-2)


def test_outputs_are_deterministic():
    """Partials are combined in a fixed order: the same input gives the same bits."""
    x = torch.randn(4, 16, 6, 6, 6)
    grad = torch.randn_like(x)
    outs = [run(x, None, pair(16, 0.1, True, seed=5)[1], grad, native=True) for _ in range(2)]
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_bad_dtype_is_refused_with_one_line():
    from naslung.native.batchnorm import batchnorm_relu

    with pytest.raises(ValueError, match="fp32 or bf16"):
        batchnorm_relu(torch.randn(1, 2, 2, 2, 2, dtype=torch.float64), torch.nn.BatchNorm3d(2).double())


def test_ops_pass_torch_library_opcheck():
    """Schemas, fake implementations and autograd registration are what torch.compile and CUDA
    graphs rely on."""
    from naslung.native.batchnorm import bn_relu, bn_relu_backward, bn_stats

    x = torch.randn(2, 4, 3, 3, 3)
    residual, grad = torch.randn_like(x), torch.randn_like(x)
    weight, bias = torch.rand(4) + 0.5, torch.rand(4) - 0.5
    mean, invstd = bn_stats(x, torch.zeros(4), torch.ones(4), 0.1, 1e-5)
    torch.library.opcheck(bn_stats, (x, torch.zeros(4), torch.ones(4), 0.1, 1e-5))
    torch.library.opcheck(bn_relu, (x.requires_grad_(), residual, mean, invstd, weight, bias, True))
    torch.library.opcheck(bn_relu_backward, (x.detach(), grad, mean, invstd, weight, bias, True))


@pytest.mark.parametrize("options", [{"track_running_stats": False}, {"affine": False}, {"momentum": None}],
                         ids=["untracked", "not-affine", "cumulative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_options_behave_as_torch(options, training):
    from naslung.native.batchnorm import batchnorm_relu

    reference, native = torch.nn.BatchNorm3d(4, **options), torch.nn.BatchNorm3d(4, **options)
    native.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    for module in (reference, native):
        module.train(training)
    torch.testing.assert_close(batchnorm_relu(x, native), torch.relu(reference(x)), rtol=1e-4, atol=1e-5)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(native.named_buffers())[name], buffer, msg=name)


def test_channels_last_input_gives_the_same_result():
    from naslung.native.batchnorm import batchnorm_relu

    x = torch.randn(2, 8, 4, 4, 4)
    bn = torch.nn.BatchNorm3d(8).eval()
    expected = batchnorm_relu(x, bn)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(batchnorm_relu(channels_last, bn), expected)


def test_inputs_the_kernels_would_misread_are_refused():
    from naslung.native.batchnorm import batchnorm_relu

    x = torch.randn(2, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="residual"):
        batchnorm_relu(x, torch.nn.BatchNorm3d(4), torch.randn(2, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="running_mean must be a contiguous fp32"):
        batchnorm_relu(x, torch.nn.BatchNorm3d(4).bfloat16())
    with pytest.raises(ValueError, match="non-empty"):
        batchnorm_relu(torch.randn(0, 4, 3, 3, 3), torch.nn.BatchNorm3d(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or library_path("cuda") is None,
                    reason="needs a CUDA GPU and the CUDA kernel library")
@pytest.mark.parametrize("shape", [(256, 4, 3, 3, 3), (2, 512, 1, 1, 1), (8, 16, 16, 16, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_build_matches_the_host_build(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    residual, grad = torch.randn_like(x), torch.randn_like(x)
    results = []
    for device in ("cpu", "cuda"):
        bn = pair(shape[1], 0.1, True, seed=4)[1].to(device)
        results.append({k: v.cpu() for k, v in run(x.to(device), residual.to(device), bn, grad.to(device),
                                                     native=True).items()})
    assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
