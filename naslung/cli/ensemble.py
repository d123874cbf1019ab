"""`naslung ensemble`: cross-validate a search's best front archs and ensemble them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from naslung.argtypes import (
    positive_int,
)
from naslung.cli.base import (
    UsageError,
    add_verify_option,
    newest_run,
)
from naslung.console import console
from naslung.data.store import CropStore
from naslung.fileio import check_output_dir
from naslung.locking import lock_run_dir
from naslung.paths import default_phantom_dir
from naslung.train.trainer import resolve_device

if TYPE_CHECKING:
    pass


ENSEMBLE_PRESETS: dict[str, dict] = {
    # About a minute on two CPU cores after `naslung-search --preset smoke`.
    "smoke": {"top": 2, "epochs": 2},
}


def cmd_ensemble(args: argparse.Namespace) -> int:
    from naslung.train.ensemble import run_ensemble

    preset = ENSEMBLE_PRESETS.get(args.preset, {})
    top = args.top if args.top is not None else preset.get("top", 3)
    epochs = args.epochs if args.epochs is not None else preset.get("epochs", 20)
    args.run = args.run or newest_run("search-*/pareto.json", "search run").parent
    pareto_file = args.run / "pareto.json"
    try:
        pareto = json.loads(pareto_file.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{pareto_file} is missing or unreadable: is {args.run} a search run?") from err
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = check_output_dir(args.out or args.run / "ensemble", "--out")
    store = CropStore.open(args.data_dir or pareto.get("store") or default_phantom_dir(),
                           verify=not args.no_verify)
    if args.data_dir is None and pareto.get("store_sha256") not in (None, store.fingerprint):
        raise UsageError(f"the store at {store.root} changed since the search; pass --data-dir")
    try:
        with lock_run_dir(out, "ensemble folder"):
            report = run_ensemble(args.run, store, out, device, top=top, epochs=epochs,
                                  show_progress=not args.no_progress)
    except ValueError as err:
        raise UsageError(str(err)) from err
    console.print((out / "ensemble.md").read_text())
    console.print(f"{len(report.archs)} member(s) cross-validated on {len(report.folds)} folds; "
                  f"table in {out / 'ensemble.md'} and {out / 'ensemble.csv'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble", help="cross-validate a search's best front archs and ensemble them",
        description="Train the --top front archs of a search on every fold (patient-level CV), "
        "evaluate each, their mean-probability and majority-vote ensembles, beside the "
        "baselines of `naslung baselines` fitted on the same folds, with patient-bootstrap 95% "
        "intervals of the paired differences; writes ensemble.md and ensemble.csv.")
    p.add_argument("--run", type=Path,
                   help="search run directory (has pareto.json; default: the newest runs/search-*)")
    p.add_argument("--preset", choices=sorted(ENSEMBLE_PRESETS),
                   help="smoke: top 2, 2 epochs per fold (about a minute on a CPU after the smoke "
                   "search); explicit options win")
    p.add_argument("--top", type=positive_int, help="front archs to ensemble (default 3)")
    p.add_argument("--epochs", type=positive_int, help="epochs per fold (default 20)")
    p.add_argument("--data-dir", type=Path, help="crop store (default: the one the search used)")
    p.add_argument("--out", type=Path, help="output directory (default RUN/ensemble)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_verify_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ensemble)
