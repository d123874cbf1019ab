"""ConvRes: NAS-Lung's 3D residual CNN with CBAM, built from an `Arch`."""

from __future__ import annotations

import torch
from torch import nn

from naslung.arch import STEM_WIDTH, Arch
from naslung.models.blocks import ConvBNReLU, ResidualBlock
from naslung.models.cbam import make_cbam
from naslung.models.heads import make_head


class Stage(nn.Module):
    """Stride-2 downsampling conv (no bias), residual blocks, then CBAM."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], cbam: str) -> None:
        super().__init__()
        self.down = ConvBNReLU(in_channels, in_channels, 3, stride=2, bias=False)
        blocks = []
        for width in widths:
            blocks.append(ResidualBlock(in_channels, width))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.cbam = make_cbam(in_channels, cbam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbam(self.blocks(self.down(x)))


class ConvRes(nn.Module):
    """The reference network: (N, 1, D, H, W) HU-normalised crops -> (N, 2) class logits.

    stem (two 3^3 convs to 4 channels, CBAM), three `Stage`s, global average pooling (so any
    crop size works; 32^3 gives the original's 4^3 map), then the head. Both modes return
    (N, 2) class logits; ``softmax(logits)[:, 1]`` is the malignancy probability.
    """

    def __init__(self, arch: Arch | str, cbam: str = "nas-lung", head: str = "asoftmax") -> None:
        super().__init__()
        self.arch = Arch.parse(arch) if isinstance(arch, str) else arch
        self.cbam_variant = cbam
        self.head_kind = head
        self.stem = nn.Sequential(ConvBNReLU(1, STEM_WIDTH), ConvBNReLU(STEM_WIDTH, STEM_WIDTH))
        self.stem_cbam = make_cbam(STEM_WIDTH, cbam)
        stages, channels = [], STEM_WIDTH
        for widths in self.arch.stages:
            stages.append(Stage(channels, widths, cbam))
            channels = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = make_head(head, channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N, C) the head classifies."""
        x = self.stem_cbam(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.pool(x).flatten(1)

    def explained_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's feature map (N, C, d, h, w), which the head sees through average
        pooling, and the stem CBAM's spatial attention (N, 1, D, H, W) at input resolution:
        what a Grad-CAM and an attention overlay are made from."""
        x, attention = self.stem_cbam.forward_with_attention(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return x, attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
