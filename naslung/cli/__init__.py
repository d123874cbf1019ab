"""The `naslung` command line: inspect architectures, prepare data, search, train, evaluate,
export, predict. One module per command group, each command's options beside its handler; the
parser is wired here.

Every user error (bad arch text, fold out of range, missing store, unknown device...) ends
with one line on stderr and exit status 2; no traceback. Interrupts are handled by the console
scripts' entry points (`naslung.entry`).
"""

from __future__ import annotations

import argparse

from naslung.cli import arch, baselines, ensemble, export, latency, predict, prepare, search, train
from naslung.cli.base import CommandParser, UsageError, run
from naslung.cli.export import export_main
from naslung.cli.search import search_main

__all__ = ["UsageError", "build_parser", "export_main", "main", "search_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="naslung", description=(
        "Search, train, evaluate and deploy small 3D CNNs (NAS-Lung's ConvRes) that classify lung "
        "nodules in chest CT as malignant or benign, and run them on a CT (naslung predict)."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for add in (arch.add_parser, prepare.add_parser, train.add_parser, search.add_parser, latency.add_parser,
                ensemble.add_parser, baselines.add_parser, export.add_parser, predict.add_parser,
                train.add_eval_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
