"""Convolution blocks of ConvRes: conv+BatchNorm+ReLU, and the residual block built from it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    """Conv3d -> BatchNorm3d -> ReLU, the unit every ConvRes convolution uses."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """out = conv2(conv1(x)) + shortcut(x); the shortcut is always a 1x1x1 conv+BN+ReLU.

    As in the original there is no ReLU after the sum, and the shortcut exists even when
    input and output widths agree (that is what gives the original's parameter counts).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, 3)
        self.conv2 = ConvBNReLU(out_channels, out_channels, 3)
        self.shortcut = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)
