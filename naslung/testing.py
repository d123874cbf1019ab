"""Helpers for the tests and benchmarks that hold fast and exported paths to the reference."""

from __future__ import annotations

import torch
from torch import nn


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
