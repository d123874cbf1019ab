"""Helpers for the tests and benchmarks that hold fast and exported paths to the reference."""

from __future__ import annotations

import copy

import torch
from torch import nn


def sharp_cbam(channels: int, variant: str, seed: int) -> nn.Module:
    """A reference CBAM with weights large enough that the gates are far from flat, so parity
    tests of fused CBAMs exercise the softmax/sigmoid and the spatial gate away from 0.5."""
    from naslung.models.cbam import make_cbam

    torch.manual_seed(seed)
    module = make_cbam(channels, variant)
    with torch.no_grad():
        module.fc1.weight.mul_(2.0)
        module.fc2.weight.mul_(2.0)
        module.spatial_conv.weight.mul_(3.0)
    return module


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with every BatchNorm's running statistics and affine moved away
    from the identity, as after training: a fresh model's BN folds to nothing, so comparing
    folded or fused paths on it would prove little, and its outputs barely vary between crops."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm3d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| over max |expected|, or over ``floor`` where that is smaller (the
    gradient of a conv bias followed by BatchNorm is zero up to rounding)."""
    err = (actual.double() - expected.double()).abs().max()
    return (err / expected.double().abs().max().clamp_min(floor)).item()


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from naslung.models import make_loss

    loss = make_loss(model.head)(model(x), y)
    loss.backward()
    return loss


def compare_step(arch: str, cbam: str, crop: int, batch: int, device: str, dtype_tol: float,
                 backend: str = "triton") -> None:
    """One ConvRes training step on ``backend``'s fused modules against the float64 reference:
    loss, every parameter gradient, every BatchNorm running statistic, then the eval output."""
    from naslung.models import ConvRes
    from naslung.models.fused import fuse

    torch.manual_seed(0)
    reference = ConvRes(arch, cbam=cbam).to(device)
    fused_model = fuse(copy.deepcopy(reference), backend=backend)
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
