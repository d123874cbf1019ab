"""`naslung baselines`: what simple models reach on a store's folds, optionally beside a CNN run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.markdown import Markdown

from naslung.argtypes import positive_int
from naslung.cli.base import UsageError, add_verify_option, open_store, parse_folds
from naslung.console import console
from naslung.data.store import CropStore
from naslung.fileio import check_output_dir
from naslung.train.baselines import BASELINE_NAMES, run_baselines
from naslung.train.crossval import RunError, read_predictions
from naslung.train.results import Row, score_rows, write_results

SIZE_IMAGE = BASELINE_NAMES["size-image"]


def compare_with_baselines(store: CropStore, folds: list[int], crop: int, out_dir: Path,
                           models: list[Row], title: str) -> str:
    """Fit every baseline on ``folds``, score them beside ``models`` and write the results
    into ``out_dir``; each model is compared with every baseline (without models: every
    baseline with ``size-image``). Returns the Markdown table."""
    baselines = [Row(BASELINE_NAMES[b.name], b.probabilities) for b in run_baselines(store, folds, crop)]
    if models:
        pairs = [(m.name, b.name) for m in models for b in baselines]
    else:
        pairs = [(b.name, SIZE_IMAGE) for b in baselines if b.name != SIZE_IMAGE]
    rows = [*models, *baselines]
    results = score_rows(store, folds, rows, pairs)
    return write_results(out_dir, store, results, rows, title)


def run_row(run_dir: Path, store: CropStore, folds: list[int]) -> Row:
    """A `naslung train` run's out-of-fold predictions as a row; it must cover ``folds``."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        probabilities = read_predictions(run_dir, store.column("id"))
    except (OSError, ValueError, RunError) as err:
        raise UsageError(f"--run {run_dir}: not a readable training run ({err})") from err
    if config.get("store_sha256") != store.fingerprint:
        raise UsageError(f"--run {run_dir} was trained on another store than {store.root}")
    missing = [f for f in folds if np.isnan(probabilities[store.folds == f]).any()]
    if missing:
        raise UsageError(f"--run {run_dir} has no predictions for test fold(s) {missing}")
    return Row(f"CNN {config['train']['arch']}", probabilities)


def cmd_baselines(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, None, not args.no_progress, verify=not args.no_verify)
    folds = parse_folds(args.folds, store)
    crop = args.crop or int(store.manifest.get("crop", 32))
    out = check_output_dir(args.out or Path("runs") / f"baselines-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    models = [run_row(args.run, store, folds)] if args.run else []
    console.print(f"fitting baselines on {store.root} ({len(store)} nodules), test folds {folds}, "
                  f"centre crop {crop}^3 -> {out}")
    try:
        table = compare_with_baselines(store, folds, crop, out, models,
                                       f"Baselines on {store.root}, test folds {folds}")
    except ValueError as err:
        raise UsageError(str(err)) from err
    console.print(Markdown(table))
    console.print(f"written to {out} (results.md, results.csv, roc.png, reliability.png)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baselines", help="fit the baselines (size, image features, ratings) on a store's folds",
        description="For every test fold: logistic regressions fitted on the training folds only "
        "(any choice on the validation fold), scored on the test fold: size-image (log "
        "consensus-mask volume), size-reader (log reader diameter), features (14 image "
        "features of the centre crop and mask) and, for LIDC-derived stores, ratings (8 "
        "ratings + diameter; optimistic, the readers also gave the label). With --run, a "
        "training run's CNN is compared with each (paired patient bootstrap, 95 %% CI).")
    p.add_argument("--data-dir", type=Path, help="crop store (default: built-in lidc-phantom)")
    p.add_argument("--folds", help="'all' (default) or test folds, e.g. 0,3")
    p.add_argument("--run", type=Path, help="a `naslung train` run directory to compare")
    p.add_argument("--crop", type=positive_int,
                   help="side of the centre crop the features see (default: the store's, else 32)")
    p.add_argument("--out", type=Path, help="output folder (default runs/baselines-<time>)")
    add_verify_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_baselines)
