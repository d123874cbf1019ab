"""`Arch`: a searched NAS-Lung architecture, its text form and its exact cost.

An architecture is three stages of residual-block widths, written the way a user types it:
``4,8,16/32,32/64,128`` (stages split by ``/``, block widths by ``,``). Everything about its
size follows from the widths, so parameters and FLOPs are computed here analytically, layer
by layer, without building a model; `tests/test_arch.py` checks them against the module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STEM_WIDTH = 4
"""Channels of the two stem convolutions (fixed by the original network)."""

MIN_WIDTH = 4
"""Smallest block width: CBAM's channel MLP has width // 4 hidden units, so it needs >= 4."""

MAX_WIDTH = 4096
NUM_STAGES = 3
NUM_CLASSES = 2
HEAD_KINDS = ("asoftmax", "linear")


class ArchError(ValueError):
    """An architecture text or value that does not describe a valid `Arch`."""


@dataclass(frozen=True)
class LayerCost:
    """One weighted layer of the network: where it sits and what it costs for one crop."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    flops: int


@dataclass(frozen=True)
class Arch:
    """Three stages of block widths; immutable, hashable, comparable."""

    stages: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.stages) != NUM_STAGES:
            raise ArchError(f"an arch has {NUM_STAGES} stages, got {len(self.stages)}")
        for i, stage in enumerate(self.stages, 1):
            if not stage:
                raise ArchError(f"stage {i} is empty: every stage needs at least one block")
            for width in stage:
                if not isinstance(width, int) or isinstance(width, bool):
                    raise ArchError(f"stage {i}: width {width!r} is not an integer")
                if not MIN_WIDTH <= width <= MAX_WIDTH:
                    raise ArchError(
                        f"stage {i}: width {width} is outside {MIN_WIDTH}..{MAX_WIDTH}"
                    )

    @classmethod
    def parse(cls, text: str) -> Arch:
        """Read the text form, e.g. ``"4,8,16/32,32/64,128"``; raise `ArchError` if invalid."""
        if not isinstance(text, str) or not text.strip():
            raise ArchError("empty arch: expected three '/'-separated stages like 4,8,16/32,32/64,128")
        parts = text.strip().split("/")
        if len(parts) != NUM_STAGES:
            raise ArchError(
                f"arch {text!r} has {len(parts)} stage(s); expected {NUM_STAGES} "
                "'/'-separated stages like 4,8,16/32,32/64,128"
            )
        stages = []
        for i, part in enumerate(parts, 1):
            items = [item.strip() for item in part.split(",")]
            if items == [""]:
                raise ArchError(f"arch {text!r}: stage {i} is empty")
            for item in items:
                if not re.fullmatch(r"\d+", item):
                    raise ArchError(f"arch {text!r}: stage {i} has {item!r}, not a positive integer")
            stages.append(tuple(int(item) for item in items))
        return cls(tuple(stages))

    @classmethod
    def from_lists(cls, stages: list[list[int]]) -> Arch:
        """Build from nested lists, the form the original code used for its `config`."""
        return cls(tuple(tuple(stage) for stage in stages))

    def __str__(self) -> str:
        return "/".join(",".join(str(w) for w in stage) for stage in self.stages)

    @property
    def dirname(self) -> str:
        """A file-system-safe name for the arch: ``4,8/16/32`` -> ``4-8_16_32``."""
        return str(self).replace("/", "_").replace(",", "-")

    @property
    def depth(self) -> int:
        """Total number of residual blocks."""
        return sum(len(stage) for stage in self.stages)

    @property
    def widths(self) -> tuple[int, ...]:
        """All block widths in order, stages flattened."""
        return tuple(w for stage in self.stages for w in stage)

    @property
    def out_channels(self) -> int:
        """Channels entering the head."""
        return self.stages[-1][-1]

    def layers(self, crop: int = 32, head: str = "asoftmax") -> list[LayerCost]:
        """Every weighted layer with its parameters and FLOPs for one ``crop``^3 input.

        FLOPs count 2 x multiply-accumulates of convolutions and matrix products, which is
        what `torch.utils.flop_counter` counts; BatchNorm, ReLU, pooling and the softmax are
        left out. Layer names are the module names in `naslung.ConvRes`.
        """
        if head not in HEAD_KINDS:
            raise ArchError(f"unknown head {head!r}; choose from {', '.join(HEAD_KINDS)}")
        if crop < 1:
            raise ArchError(f"crop size must be positive, got {crop}")
        layers: list[LayerCost] = []
        size = crop

        def conv(name: str, cin: int, cout: int, k: int, stride: int, bias: bool) -> None:
            nonlocal size
            out_size = (size + 2 * (k // 2) - k) // stride + 1
            macs = out_size**3 * cout * cin * k**3
            params = cin * cout * k**3 + (cout if bias else 0) + 2 * cout  # + BN gamma, beta
            layers.append(
                LayerCost(name, f"conv{k}s{stride}+bn+relu", (cin, size, size, size),
                          (cout, out_size, out_size, out_size), params, 2 * macs)
            )
            size = out_size

        def cbam(name: str, channels: int) -> None:
            hidden = channels // 4
            mlp_macs = 2 * (channels * hidden + hidden * channels)  # avg- and max-pooled vectors
            spatial_macs = size**3 * 2 * 27
            shape = (channels, size, size, size)
            params = 2 * channels * hidden + 2 * 27
            layers.append(LayerCost(name, "cbam", shape, shape, params, 2 * (mlp_macs + spatial_macs)))

        conv("stem.0", 1, STEM_WIDTH, 3, 1, True)
        conv("stem.1", STEM_WIDTH, STEM_WIDTH, 3, 1, True)
        cbam("stem_cbam", STEM_WIDTH)
        channels = STEM_WIDTH
        for s, stage in enumerate(self.stages):
            conv(f"stages.{s}.down", channels, channels, 3, 2, False)
            for b, width in enumerate(stage):
                prefix = f"stages.{s}.blocks.{b}"
                conv(f"{prefix}.conv1", channels, width, 3, 1, True)
                conv(f"{prefix}.conv2", width, width, 3, 1, True)
                conv(f"{prefix}.shortcut", channels, width, 1, 1, True)
                channels = width
            cbam(f"stages.{s}.cbam", channels)
        head_params = channels * NUM_CLASSES + (NUM_CLASSES if head == "linear" else 0)
        layers.append(
            LayerCost("head", head, (channels,), (NUM_CLASSES,), head_params,
                      2 * channels * NUM_CLASSES)
        )
        return layers

    def params(self, head: str = "asoftmax") -> int:
        """Exact number of trainable parameters of `ConvRes(self, head=head)`."""
        return sum(layer.params for layer in self.layers(head=head))

    def flops(self, crop: int = 32, head: str = "asoftmax") -> int:
        """FLOPs of one forward pass on a ``crop``^3 input (see `layers`)."""
        return sum(layer.flops for layer in self.layers(crop, head))


PAPER_28M = Arch.parse("64,64,64/128,128,256/256,256,256,512")
"""The largest architecture the original evaluated: 28,456,204 parameters."""
