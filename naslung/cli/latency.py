"""`naslung latency`: the per-device table of block latencies and its check against whole models."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.table import Table

from naslung.arch import HEAD_KINDS
from naslung.argtypes import (
    non_negative_int,
    positive_int,
)
from naslung.cli.base import (
    UsageError,
)
from naslung.console import console
from naslung.models import CBAM_VARIANTS
from naslung.train.trainer import resolve_device

if TYPE_CHECKING:
    pass


def cmd_latency(args: argparse.Namespace) -> int:
    from naslung.search.latency import latency_table, predict, rank_correlation
    from naslung.search.space import SearchSpace

    try:
        widths = tuple(int(w) for w in args.widths.split(","))
        space = SearchSpace(widths, args.min_depth, args.max_depth)
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    table = latency_table(space, device, cbam=args.cbam, head=args.head, refresh=args.refresh,
                          progress=not args.no_progress)
    predicted = predict(space, table)
    console.print(f"latency table for {table.facts.get('device_name', device)}: {len(table.blocks)} blocks, "
                  f"batch {table.facts['batch']}, crop {table.facts['crop']}^3; predicted batch-1 latency of "
                  f"the {len(space):,} archs: {predicted.min():.2f} .. {predicted.max():.2f} ms")
    if args.sample:
        result = rank_correlation(space, table, args.sample, args.seed, progress=not args.no_progress)
        rows = Table(title=f"predicted vs measured whole-model latency ({args.sample} random archs)")
        for column in ("arch", "predicted ms", "measured ms"):
            rows.add_column(column, justify="left" if column == "arch" else "right")
        for index, pred, meas in zip(result.indices, result.predicted, result.measured, strict=True):
            rows.add_row(str(space.arch(int(index))), f"{pred:.2f}", f"{meas:.2f}")
        console.print(rows)
        console.print(f"Spearman rank correlation {result.rho:.3f} (p = {result.pvalue:.2g})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latency", help="measure the per-device block latency table and check it against whole models",
        description="Measure (once, then cached) the batch-1 latency of every block the search space "
        "contains on --device, predict every arch's latency as the sum of its blocks, and with "
        "--sample N time N random whole models and report the rank correlation.")
    p.add_argument("--widths", default="4,8,16,32,64,128", help="block widths of the space")
    p.add_argument("--min-depth", type=positive_int, default=3)
    p.add_argument("--max-depth", type=positive_int, default=9)
    p.add_argument("--cbam", choices=CBAM_VARIANTS, default="nas-lung")
    p.add_argument("--head", choices=HEAD_KINDS, default="asoftmax")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--sample", type=non_negative_int, default=20, help="whole models to time (0: none)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--refresh", action="store_true", help="measure everything anew")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_latency)
