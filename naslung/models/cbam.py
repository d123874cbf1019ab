"""CBAM attention for 3D feature maps: NAS-Lung's residual variant and Woo et al.'s original.

Both variants have the same parameters (a bias-free C -> C//4 -> C channel MLP shared by the
average- and max-pooled vectors, and a bias-free 3x3x3 conv from [max, mean] over channels to
one spatial map), so a checkpoint of one loads into the other and `Arch` counts both alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CBAM_VARIANTS = ("nas-lung", "woo")


class _CBAMParameters(nn.Module):
    """The weights both variants share, and the pooling both do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // 4, bias=False)
        self.fc2 = nn.Linear(channels // 4, channels, bias=False)
        self.spatial_conv = nn.Conv3d(2, 1, kernel_size=3, padding=1, bias=False)

    def channel_scores(self, x: torch.Tensor, hidden_activation: bool) -> torch.Tensor:
        """MLP(avgpool(x)) + MLP(maxpool(x)), shape (N, C); one matmul for both pools."""
        pooled = torch.stack((x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))))
        hidden = self.fc1(pooled)
        if hidden_activation:
            hidden = F.relu(hidden)
        scores = self.fc2(hidden)
        return scores[0] + scores[1]

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(conv([max over channels, mean over channels])), shape (N, 1, D, H, W)."""
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return torch.sigmoid(self.spatial_conv(pooled))

    def channel_gated(self, x: torch.Tensor) -> torch.Tensor:
        """x scaled by the variant's channel weights."""
        raise NotImplementedError

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map, shape (N, 1, D, H, W), that the block applies."""
        return self.spatial_map(self.channel_gated(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and the spatial attention map it applied (to explain a prediction)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]


class ResidualCBAM(_CBAMParameters):
    """CBAM as NAS-Lung's search code has it (DESIGN.md section 3).

    Channel weights are a softmax over channels of MLP(avg) + MLP(max), with no activation
    inside the MLP; they only shape the spatial map, which then scales the block input:
    ``out = s * x + x``.
    """

    def channel_gated(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.channel_scores(x, hidden_activation=False), dim=1)
        return x * weights[:, :, None, None, None]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.attention(x)
        return attention * x + x, attention  # the block input, not the channel-gated map


class WooCBAM(_CBAMParameters):
    """The standard CBAM of Woo et al. (ECCV 2018), in 3D.

    Sigmoid channel gate from a ReLU MLP, then a sigmoid spatial gate on the channel-gated
    map, applied in sequence: ``x_c = g_c * x; out = g_s(x_c) * x_c``. The spatial kernel is
    3x3x3 (not 7x7) to suit 4^3..32^3 maps and to share NAS-Lung's parameters.
    """

    def channel_gated(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.channel_scores(x, hidden_activation=True))
        return x * gate[:, :, None, None, None]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gated = self.channel_gated(x)
        attention = self.spatial_map(gated)
        return attention * gated, attention


def make_cbam(channels: int, variant: str = "nas-lung") -> _CBAMParameters:
    """A CBAM module of the named variant (one of `CBAM_VARIANTS`)."""
    if variant == "nas-lung":
        return ResidualCBAM(channels)
    if variant == "woo":
        return WooCBAM(channels)
    raise ValueError(f"unknown CBAM variant {variant!r}; choose from {', '.join(CBAM_VARIANTS)}")
