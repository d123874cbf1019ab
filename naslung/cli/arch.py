"""`naslung arch`: the layer table, parameters and FLOPs of an architecture."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.table import Table

from naslung.arch import HEAD_KINDS, Arch
from naslung.argtypes import (
    positive_int,
)
from naslung.cli.base import (
    fmt_int,
)
from naslung.console import console

if TYPE_CHECKING:
    pass


def cmd_arch(args: argparse.Namespace) -> int:
    arch = Arch.parse(args.text)
    layers = arch.layers(args.crop, args.head)
    table = Table(title=f"ConvRes {arch}  (input 1x{args.crop}^3, head {args.head})")
    for name in ("layer", "kind", "in", "out", "params", "FLOPs"):
        table.add_column(name, justify="right" if name in ("params", "FLOPs") else "left")
    for layer in layers:
        table.add_row(layer.name, layer.kind, "x".join(map(str, layer.in_shape)),
                      "x".join(map(str, layer.out_shape)), fmt_int(layer.params),
                      fmt_int(layer.flops))
    params, flops = sum(x.params for x in layers), sum(x.flops for x in layers)
    table.add_section()
    table.add_row("total", "", "", "", fmt_int(params), fmt_int(flops))
    console.print(table)
    console.print(f"{arch}: depth {arch.depth}, {fmt_int(params)} parameters "
                  f"({params / 1e6:.2f} M), {flops / 1e9:.3f} GFLOPs per crop")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("arch", help="parameters, FLOPs and layer table of an architecture",
                       description="Print the per-layer table, parameters and FLOPs of an arch. "
                       "An arch is three '/'-separated stages of ','-separated block widths, "
                       "e.g. 4,8,16/32,32/64,128.")
    p.add_argument("text", help="the architecture, e.g. 4,8,16/32,32/64,128")
    p.add_argument("--crop", type=positive_int, default=32, help="input crop side in voxels (default 32)")
    p.add_argument("--head", choices=HEAD_KINDS, default="asoftmax")
    p.set_defaults(func=cmd_arch)
