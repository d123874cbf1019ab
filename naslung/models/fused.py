"""ConvRes on fused kernels: the same modules, the same state_dicts, fused forward passes.

Two backends: ``triton`` (kernels/, conv+BatchNorm+ReLU and CBAM, CUDA) and ``native`` (csrc/,
built by CMake: torch's convolution, then BatchNorm+ReLU(+residual) and CBAM in the host
library on the CPU or the CUDA library on a GPU; ``--kernels native`` and ``--kernels cuda``).
Each fused module subclasses the reference module it replaces and only overrides ``forward``,
so parameters, buffers and state_dict keys are the reference's: a checkpoint saved from one
loads into the other. `fuse` turns a reference ConvRes into its fused form.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from naslung.kernels.runtime import interpreting
from naslung.models.blocks import ConvBNReLU, ResidualBlock
from naslung.models.cbam import ResidualCBAM, WooCBAM

KERNEL_CHOICES = ("auto", "torch", "triton", "native", "cuda")
NATIVE_KERNELS = ("native", "cuda")
"""The choices that run the csrc/ kernels (the host build on the CPU, the CUDA build on a GPU)."""


class FusedConvBNReLU(ConvBNReLU):
    """Conv3d + BatchNorm3d + ReLU (+ a residual added after the ReLU) in fused kernels."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        from naslung.kernels.batchnorm import conv_bn_relu

        bn = self.bn
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)  # momentum None: a cumulative average over these, on the device
        return conv_bn_relu(x, self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.running_mean,
                            bn.running_var, training=bn.training, momentum=bn.momentum, eps=bn.eps,
                            stride=self.conv.stride[0], padding=self.conv.padding[0], residual=residual,
                            num_batches_tracked=bn.num_batches_tracked)


class NativeConvBNReLU(ConvBNReLU):
    """torch's Conv3d, then BatchNorm3d + ReLU (+ a residual after the ReLU) in csrc/ kernels."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        from naslung.native.batchnorm import batchnorm_relu

        return batchnorm_relu(self.conv(x), self.bn, residual)


class FusedResidualBlock(ResidualBlock):
    """The residual block with the sum fused into conv2's normalise-and-ReLU pass (either
    backend: its convolution units take the residual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), residual=self.shortcut(x))


class FusedResidualCBAM(ResidualCBAM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from naslung.kernels.cbam import cbam

        return cbam(x, self.fc1.weight, self.fc2.weight, self.spatial_conv.weight, "nas-lung")


class FusedWooCBAM(WooCBAM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from naslung.kernels.cbam import cbam

        return cbam(x, self.fc1.weight, self.fc2.weight, self.spatial_conv.weight, "woo")


class NativeResidualCBAM(ResidualCBAM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from naslung.native.cbam import cbam

        return cbam(x, self.fc1.weight, self.fc2.weight, self.spatial_conv.weight, "nas-lung")


class NativeWooCBAM(WooCBAM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from naslung.native.cbam import cbam

        return cbam(x, self.fc1.weight, self.fc2.weight, self.spatial_conv.weight, "woo")


FUSED = {
    "triton": {ConvBNReLU: FusedConvBNReLU, ResidualBlock: FusedResidualBlock,
               ResidualCBAM: FusedResidualCBAM, WooCBAM: FusedWooCBAM},
    "native": {ConvBNReLU: NativeConvBNReLU, ResidualBlock: FusedResidualBlock,
               ResidualCBAM: NativeResidualCBAM, WooCBAM: NativeWooCBAM},
}
"""Backend -> reference module class -> its fused subclass."""


def fuse(model: nn.Module, inplace: bool = False, backend: str = "triton") -> nn.Module:
    """``model`` with every reference block swapped for its fused subclass on ``backend``
    (weights shared when ``inplace``, else copied). The state_dict is unchanged."""
    model = model if inplace else copy.deepcopy(model)
    swaps = FUSED[backend]
    for module in model.modules():
        fused = swaps.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model


def resolve_kernels(choice: str, device: torch.device) -> str:
    """``auto`` -> triton on CUDA, torch elsewhere; ``triton`` off CUDA only under the
    Triton interpreter (TRITON_INTERPRET=1), which is for tests, not for speed."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; choose from {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("--kernels triton needs a CUDA device (on the CPU the Triton kernels run only "
                         "under TRITON_INTERPRET=1, for testing); use --kernels torch or auto")
    if choice in NATIVE_KERNELS:
        from naslung.native.library import NativeLibraryError, load

        wanted = "cpu" if choice == "native" else "cuda"
        if device.type != wanted:
            other = "cuda" if choice == "native" else "native"
            raise ValueError(f"--kernels {choice} runs on {'the CPU' if wanted == 'cpu' else 'a CUDA GPU'}; "
                             f"on {device.type} use --kernels {other}, triton or torch")
        try:
            load("host" if choice == "native" else "cuda")
        except NativeLibraryError as err:
            raise ValueError(str(err)) from err
    return choice


def fuse_for(model: nn.Module, kernels: str) -> nn.Module:
    """``model`` (in place) on the resolved ``kernels``: torch leaves it as it is."""
    if kernels == "torch":
        return model
    return fuse(model, inplace=True, backend="triton" if kernels == "triton" else "native")
