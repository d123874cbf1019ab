"""Reference PyTorch modules: ConvRes, its blocks, CBAM and the classifier heads."""

from naslung.models.blocks import ConvBNReLU, ResidualBlock
from naslung.models.cbam import CBAM_VARIANTS, ResidualCBAM, WooCBAM, make_cbam
from naslung.models.convres import ConvRes, Stage
from naslung.models.heads import HEAD_KINDS, AngleLinear, AngleLoss, make_head, make_loss

__all__ = [
    "CBAM_VARIANTS", "HEAD_KINDS", "AngleLinear", "AngleLoss", "ConvBNReLU", "ConvRes",
    "ResidualBlock", "ResidualCBAM", "Stage", "WooCBAM", "make_cbam", "make_head", "make_loss",
]
