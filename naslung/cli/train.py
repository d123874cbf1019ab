"""`naslung train` (patient-level cross-validation of one architecture) and `naslung eval`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markdown import Markdown
from rich.table import Table

from naslung.arch import Arch
from naslung.argtypes import (
    non_negative_int,
    number_range,
    positive_int,
    positive_number,
)
from naslung.cli.base import (
    CUDA_GRAPHS_HELP,
    KERNELS_HELP,
    PRECISION_HELP,
    UsageError,
    add_verify_option,
    check_cuda_graphs,
    fmt_metric,
    open_store,
    parse_folds,
)
from naslung.cli.baselines import compare_with_baselines, run_row
from naslung.console import console
from naslung.data.augment import AIR_HU, HU_WINDOW
from naslung.data.store import CropStore
from naslung.fileio import check_output_dir
from naslung.locking import lock_run_dir
from naslung.models import CBAM_VARIANTS
from naslung.models.fused import KERNEL_CHOICES, resolve_kernels
from naslung.train.checkpoint import META_FILE
from naslung.train.crossval import cross_validate
from naslung.train.evaluate import evaluate_checkpoint
from naslung.train.formats import PRECISIONS
from naslung.train.metrics import summarise
from naslung.train.schedule import SCHEDULES
from naslung.train.trainer import SELECT_METRICS, TrainConfig, resolve_device

if TYPE_CHECKING:
    pass


TRAIN_OPTIONS = ("arch", "epochs", "batch_size", "lr", "schedule", "loss", "patience", "precision")
LOSSES = {"asoftmax": ("asoftmax", True), "original": ("asoftmax", False), "ce": ("linear", True)}
"""--loss -> (head, margin): A-Softmax with its margin; the original as shipped (the same
normalised head, plain softmax cross-entropy, no margin); a linear head with cross-entropy."""
PRESETS: dict[str, dict] = {
    # Minutes on two CPU cores: the phantom store of the first 60 scans, a short schedule.
    "smoke": {"epochs": 3, "lr": 1e-3, "limit": 60},
    # The original's final training (run_training.sh, main.py): 400 epochs, batch 8, Adam 2e-4,
    # betas (0.5, 0.999), the rate decayed over the last 70 epochs; here it stops early when the
    # validation AUC has not improved for 50 epochs.
    "paper": {"epochs": 400, "batch_size": 8, "lr": 2e-4, "schedule": "original",
              "patience": 50, "limit": None},
    # The reported 10-fold study (README, Results): sized to about 1.5 hours on two CPU cores.
    "study": {"epochs": 14, "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "loss": "ce",
              "limit": None},
}


def cmd_train(args: argparse.Namespace) -> int:
    preset = dict(PRESETS.get(args.preset, {}))
    limit = preset.pop("limit", None)
    settings = {**preset, **{k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}}
    settings.setdefault("precision", "auto")
    loss = settings.pop("loss", "asoftmax")
    head, margin = LOSSES[loss]
    Arch.parse(settings.get("arch", TrainConfig.arch))  # a bad arch fails before any work
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = check_output_dir(args.out or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    store = open_store(args.data_dir, limit, not args.no_progress, verify=not args.no_verify)
    # A store not in HU (e.g. NoduleMNIST3D) says its intensity window, background and crop.
    manifest = store.manifest
    try:
        cfg = TrainConfig(
            **settings, head=head, margin=margin, cbam=args.cbam, select=args.select,
            seed=args.seed, channels_last=args.channels_last,
            crop=args.crop if args.crop is not None else int(manifest.get("crop", TrainConfig.crop)),
            hu_window=args.hu_window or tuple(manifest.get("intensity_window", HU_WINDOW)),
            background=float(manifest.get("background_value", AIR_HU)), kernels=args.kernels,
            cuda_graphs=args.cuda_graphs)
        kernels = resolve_kernels(cfg.kernels, device)
        check_cuda_graphs(cfg.cuda_graphs, device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    folds = parse_folds(args.folds, store)
    if store.n_folds == 2:
        console.print("[yellow]the store has only 2 patient-level folds: each model's epoch is "
                      "picked on its training crops (there is no separate validation fold)[/yellow]")
    console.print(f"training {cfg.arch} ({Arch.parse(cfg.arch).params(cfg.head):,} params) on "
                  f"{store.root} ({len(store)} nodules), folds {folds}, {cfg.epochs} epochs, "
                  f"batch {cfg.batch_size}, lr {cfg.lr:g} ({cfg.schedule}), {loss} loss, "
                  f"precision {cfg.precision}, device {device}, {kernels} kernels -> {out}")
    try:
        with lock_run_dir(out, "training run"):
            run = cross_validate(store, cfg, out, device, folds, show_progress=not args.no_progress)
    except ValueError as err:  # a fold whose train, validation or test set is empty
        raise UsageError(str(err)) from err
    _print_metrics(run.per_fold, run.summary, f"test-fold metrics ({out})")
    cnn = run_row(out, store, folds)
    try:
        table = compare_with_baselines(store, folds, cfg.crop, out, [cnn],
                                       f"{cnn.name} beside the baselines, test folds {folds} of {store.root}")
    except ValueError as err:  # e.g. a store of one class: the CNN's metrics still stand
        console.print(f"[yellow]no baselines beside the CNN: {err}[/yellow]")
        console.print(f"run written to {out}")
        return 0
    console.print(Markdown(table))
    console.print(f"run written to {out} (results.md, roc.png, reliability.png: the CNN beside "
                  "the baselines)")
    return 0


def _print_metrics(per_fold: dict, summary: dict, title: str) -> None:
    names = ("accuracy", "sensitivity", "specificity", "f1", "auc")
    table = Table(title=title)
    for column in ("fold", *names, "n", "TN FP FN TP"):
        table.add_column(column, justify="left" if column == "fold" else "right")
    for fold, m in sorted(per_fold.items()):
        (tn, fp), (fn, tp) = m["confusion"]
        table.add_row(str(fold), *(fmt_metric(m[k]) for k in names), str(m["n"]),
                      f"{tn} {fp} {fn} {tp}")
    table.add_section()
    for stat in ("mean", "std"):
        table.add_row(stat, *(fmt_metric(summary[k][stat]) for k in names), "", "")
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    target = args.target
    if (target / "config.json").is_file():
        checkpoints = sorted(p.parent for p in target.glob(f"fold*/{META_FILE}"))
        if not checkpoints:
            raise UsageError(f"run directory {target} has no finished fold")
        try:
            store_dir = args.data_dir or Path(json.loads((target / "config.json").read_text())["store"])
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{target / 'config.json'} is unreadable ({err!r})") from err
    else:
        checkpoints = [target.parent if target.suffix == ".pt" else target]
        store_dir = args.data_dir
    if store_dir is None:
        raise UsageError("evaluating a single checkpoint needs --data-dir (the crop store)")
    store = CropStore.open(store_dir, verify=not args.no_verify)
    fold = None
    if args.fold == "all":
        fold = "all"
    elif args.fold is not None:
        try:
            fold = int(args.fold)
        except ValueError as err:
            raise UsageError(f"--fold takes one fold index or 'all', got {args.fold!r}") from err
        if not 0 <= fold < store.n_folds:
            raise UsageError(f"fold {fold} is out of range: the store has folds 0..{store.n_folds - 1}")
    per_model = {}
    for index, checkpoint in enumerate(checkpoints):
        result = evaluate_checkpoint(checkpoint, store, fold, device)
        if result.warning:
            print(f"naslung: warning: {checkpoint}: {result.warning}", file=sys.stderr)
        per_model[index if result.model_fold is None else result.model_fold] = result.metrics
    scored = "each model's own test fold" if fold is None else f"fold {fold}"
    _print_metrics(per_model, summarise(list(per_model.values())),
                   f"{scored} of {store.root} (rows: the model tested on that fold)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="patient-level k-fold cross-validation of one architecture",
        description="Train one model per test fold (validation = the next fold, used to pick "
        "the epoch; the test fold is scored once) and report per-fold and mean ± std metrics.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="smoke: minutes on a CPU (store "
                   "of the first 60 scans, 3 epochs, lr 1e-3); paper: the original's final "
                   "training (400 epochs, batch 8, Adam 2e-4, decay over the last 70 epochs, "
                   "stopping after 50 epochs without a better validation AUC); study: the "
                   "README's 10-fold study (14 epochs, lr 1e-3, cosine, ce); explicit options win")
    p.add_argument("--arch", help="architecture text (default 4,8,16/32,32/64,128)")
    p.add_argument("--data-dir", type=Path, help="crop store (default: built-in lidc-phantom)")
    p.add_argument("--folds", help="'all' (default) or test folds, e.g. 0,3")
    p.add_argument("--epochs", type=positive_int, help="epochs per fold (default 20)")
    p.add_argument("--crop", type=positive_int,
                   help="input crop side in voxels (default: the store's, else 32)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 8)")
    p.add_argument("--hu-window", type=number_range, metavar="LOW,HIGH",
                   help="intensities clipped to this window before normalisation (default: the "
                   "store's, -1000,400 for HU stores; DeepLung used -1200,600); write it with '=', "
                   "e.g. --hu-window=-1200,600")
    p.add_argument("--lr", type=positive_number, help="Adam learning rate (default 2e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule: cosine "
                   "(default: to 0 over the epochs; chosen by a 10-fold comparison, see README), "
                   "constant, or original (NAS-Lung's decay over the last 70/400 of the epochs)")
    p.add_argument("--loss", choices=tuple(LOSSES), help="asoftmax (default): A-Softmax head "
                   "with margin m=4; original: the same normalised head with plain softmax "
                   "cross-entropy, as the original code trained; ce: linear head, cross-entropy")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--cbam", choices=CBAM_VARIANTS, default="nas-lung",
                   help="CBAM variant: the original's residual one, or Woo et al.'s")
    p.add_argument("--select", choices=SELECT_METRICS, default="auc",
                   help="validation metric that picks the epoch to keep")
    p.add_argument("--patience", type=positive_int, help="stop after this many epochs without gain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="train in channels_last_3d memory layout (default: on the CPU, whichever "
                   "layout is faster, measured at the start; on a GPU, no)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto", help=KERNELS_HELP)
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", type=Path, help="run directory (default runs/train-<time>)")
    add_verify_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a checkpoint or a run directory on a crop store",
                       description="A run directory: each fold's model on its test fold. A "
                       "checkpoint: on --fold (default its own test fold) of --data-dir.")
    p.add_argument("target", type=Path, help="run directory, checkpoint directory or model.pt")
    p.add_argument("--data-dir", type=Path, help="crop store (default: the run's own)")
    p.add_argument("--fold", help="fold index, or 'all' for every crop in the store")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_verify_option(p)
    p.set_defaults(func=cmd_eval)
