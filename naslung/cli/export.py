"""`naslung-export` (also `naslung export`): a trained ensemble as one checked ONNX graph (and a
TensorRT engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from naslung.argtypes import positive_int
from naslung.cli.base import CommandParser, UsageError, newest_run, run
from naslung.console import console
from naslung.export.deploy import ExportReport
from naslung.export.onnx_export import MIN_OPSET, OPSET

DESCRIPTION = (
    "Export a trained ensemble (a `naslung ensemble` directory, a search run holding one, a "
    "cross-validation run or one checkpoint) as ONE ONNX graph: HU crops in; mean malignancy "
    "probability, member probabilities, majority vote, CBAM attention and Grad-CAM out; "
    "BatchNorm folded, dynamic batch, crop/HU window/normalisation/archs/label rule/versions in "
    "its metadata. Of each member's fold models the one with the best validation score is "
    "used. The ONNX Runtime output is checked against PyTorch before anything is kept. With "
    "--trt also a TensorRT engine (needs an NVIDIA GPU and `pip install 'naslung[trt]'`).")


def add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path,
                   help="ensemble dir, search run with ensemble/, cross-validation run or checkpoint "
                   "(default: the newest runs/*/ with an ensemble/)")
    p.add_argument("--out", type=Path, help="export directory (default RUN/export)")
    p.add_argument("--opset", type=int, default=OPSET,
                   help=f"ONNX opset, {MIN_OPSET} up to what torch's exporter supports (default {OPSET})")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="TensorRT engine precision (fp16 builds from an fp16 ONNX)")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="largest batch of the engine (default 64)")


def print_report(report: ExportReport) -> None:
    console.print(f"exported {len(report.members)} member(s) ({', '.join(report.members)}) to "
                  f"{report.onnx}; ONNX Runtime vs PyTorch: max |difference| in probability "
                  f"{report.parity['probability']:.1e}")
    if report.engine:
        console.print(f"TensorRT engine {report.engine} (sidecar {report.engine}.json)")


def cmd_export(args: argparse.Namespace) -> int:
    from naslung.export.deploy import TensorRTSkipped, export_run
    from naslung.export.onnx_export import MIN_OPSET, max_opset

    newest = max_opset()
    if not MIN_OPSET <= args.opset <= newest:
        raise UsageError(f"--opset {args.opset}: this torch and onnx export opsets {MIN_OPSET}..{newest}")
    args.run = args.run or newest_run("*/ensemble/ensemble.csv", "ensemble").parent.parent
    out = args.out or (args.run.parent if args.run.suffix == ".pt" else args.run) / "export"
    try:
        report = export_run(args.run, out, opset=args.opset, trt=args.trt, precision=args.precision,
                            max_batch=args.max_batch)
    except TensorRTSkipped as err:
        raise UsageError(str(err)) from err
    print_report(report)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of `naslung-export` (the same as `naslung export`)."""
    parser = CommandParser(prog="naslung-export", description=DESCRIPTION)
    add_export_options(parser)
    parser.set_defaults(func=cmd_export)
    return run(parser, argv)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="the ensemble as one ONNX graph (and a TensorRT engine)",
                       description=DESCRIPTION)
    add_export_options(p)
    p.set_defaults(func=cmd_export)
