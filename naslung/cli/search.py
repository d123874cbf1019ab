"""`naslung-search` (also `naslung search`): the Partial Order Pruning architecture search."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from naslung.argtypes import (
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
)
from naslung.cli.base import (
    CUDA_GRAPHS_HELP,
    KERNELS_HELP,
    CommandParser,
    UsageError,
    add_verify_option,
    check_cuda_graphs,
    check_test_fold,
    open_store,
    run,
)
from naslung.console import console
from naslung.data.store import CropStore
from naslung.fileio import check_output_dir
from naslung.locking import lock_run_dir
from naslung.models.fused import KERNEL_CHOICES, resolve_kernels
from naslung.search.executors import EXECUTORS
from naslung.train.crossval import RunError
from naslung.train.formats import PRECISIONS
from naslung.train.trainer import resolve_device

if TYPE_CHECKING:
    import torch

    from naslung.search.executors import TrialExecutor


SEARCH_OPTIONS = ("widths", "min_depth", "max_depth", "epochs", "batch_size", "lr", "objective",
                  "metric", "patience", "max_candidates", "time_budget_s", "seed", "test_fold", "kernels",
                  "cuda_graphs", "precision")
SEARCH_PRESETS: dict[str, dict] = {
    # Minutes on two CPU cores: a tiny space, two epochs, at most 8 candidates, 60-scan phantom.
    "smoke": {"widths": (4, 8, 16), "min_depth": 3, "max_depth": 4, "epochs": 2, "lr": 1e-3,
              "max_candidates": 8, "limit": 60},
    # The original's search: widths 4..128, depth 3..9, 20 epochs, front unchanged for 30.
    "paper": {"widths": (4, 8, 16, 32, 64, 128), "min_depth": 3, "max_depth": 9, "epochs": 20,
              "batch_size": 8, "lr": 2e-4, "patience": 30, "limit": None},
}


def cmd_search(args: argparse.Namespace) -> int:
    from naslung.search.driver import SearchConfig, run_search
    from naslung.search.executors import ExecutorError
    from naslung.search.journal import JournalError

    preset = dict(SEARCH_PRESETS.get(args.preset, {}))
    limit = preset.pop("limit", None)
    settings = {**preset, **{k: getattr(args, k) for k in SEARCH_OPTIONS if getattr(args, k) is not None}}
    if isinstance(settings.get("widths"), str):
        try:
            settings["widths"] = tuple(int(w) for w in settings["widths"].split(","))
        except ValueError as err:
            raise UsageError(f"--widths {settings['widths']!r}: expected e.g. 4,8,16") from err
    try:
        cfg = SearchConfig(**settings)
        device = resolve_device(args.device)
        resolve_kernels(cfg.kernels, device)
        check_cuda_graphs(cfg.cuda_graphs, device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = check_output_dir(args.out or Path("runs") / f"search-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    store = open_store(args.data_dir, limit, not args.no_progress, verify=not args.no_verify)
    check_test_fold(store, cfg.test_fold, "--test-fold")
    with lock_run_dir(out, "search run"):
        try:
            executor = _search_executor(args, store, device)
        except ExecutorError as err:
            raise UsageError(str(err)) from err
        console.print(f"searching widths {list(cfg.widths)}, depth {cfg.min_depth}..{cfg.max_depth} on "
                      f"{store.root} ({len(store)} nodules): {cfg.epochs} epochs per candidate, "
                      f"validation fold {(cfg.test_fold + 1) % store.n_folds}, test fold "
                      f"{cfg.test_fold} held out -> {out}")
        try:
            result = run_search(store, cfg, out, device, resume=args.resume,
                                show_progress=not args.no_progress, executor=executor)
        except (JournalError, ValueError) as err:
            raise UsageError(str(err)) from err
        finally:
            if executor is not None:  # run_search closes it too, unless it refused to start
                executor.close()
    if not result.front:
        raise RunError(f"no candidate trained successfully ({result.stop_reason}); the journal in "
                       f"{out} has each failure")
    table = Table(title=f"Pareto front ({result.stop_reason}; {result.trained} trained, "
                        f"{result.pruned:,} pruned, {result.remaining:,} left)")
    for column in ("arch", f"val {cfg.metric}", "params", "GFLOPs"):
        table.add_column(column, justify="left" if column == "arch" else "right")
    for member in result.front:
        table.add_row(member["arch"], f"{member[cfg.metric]:.3f}", f"{member['params']:,}",
                      f"{member['flops'] / 1e9:.3f}")
    console.print(table)
    console.print(f"journal, pareto.json, pareto.png and front checkpoints in {out}")
    return 0


def _search_executor(args: argparse.Namespace, store: CropStore,
                     device: torch.device) -> TrialExecutor | None:
    """The executor the --executor, --workers and Ray options ask for (None: in-process)."""
    from naslung.search.executors import ProcessPoolTrialExecutor, RayExecutor, RayResources
    from naslung.search.trial import TrialData

    kind = args.executor or ("process" if args.workers is not None else "inprocess")
    if kind != "ray" and (args.ray_address or args.gpus_per_trial is not None):
        raise UsageError("--ray-address and --gpus-per-trial need --executor ray")
    if kind != "process" and args.workers is not None:
        raise UsageError(f"--workers sets the local process pool; it does not apply to --executor {kind}")
    if kind == "process":
        return ProcessPoolTrialExecutor(store, device, 2 if args.workers is None else args.workers)
    if kind == "ray":
        gpus = args.gpus_per_trial if args.gpus_per_trial is not None else 0.0
        return RayExecutor(TrialData.of(store), RayResources(args.cpus_per_trial, gpus), args.ray_address)
    return None


def add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(SEARCH_PRESETS), help="smoke: minutes on a CPU "
                   "(widths 4,8,16, depth 3..4, 2 epochs, <= 8 candidates, 60-scan phantom); "
                   "paper: the original's settings on the full store; explicit options win")
    p.add_argument("--data-dir", type=Path, help="crop store (default: built-in lidc-phantom)")
    p.add_argument("--out", type=Path, help="run directory (default runs/search-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the search journalled in --out")
    p.add_argument("--widths", help="block widths to search, e.g. 4,8,16,32,64,128")
    p.add_argument("--min-depth", type=positive_int, help="fewest blocks (default 3)")
    p.add_argument("--max-depth", type=positive_int, help="most blocks (default 9)")
    p.add_argument("--epochs", type=positive_int, help="epochs per candidate (default 20)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 8)")
    p.add_argument("--lr", type=positive_number, help="Adam learning rate (default 2e-4)")
    p.add_argument("--objective", choices=("params", "flops", "latency"),
                   help="cost to trade accuracy against (default params); latency: batch-1 inference "
                        "on --device, predicted from a table of block latencies measured once and cached "
                        "(see naslung latency)")
    p.add_argument("--metric", choices=("accuracy", "auc"), help="validation metric (default auc): "
                   "a candidate scores the mean of it over its last 5 epochs")
    p.add_argument("--patience", type=positive_int,
                   help="stop when the front is unchanged this long (default 30)")
    p.add_argument("--max-candidates", type=positive_int, help="train at most this many candidates")
    p.add_argument("--time-budget", dest="time_budget_s", type=positive_number,
                   help="stop after this many seconds")
    p.add_argument("--seed", type=non_negative_int, help="sampling and training seed (default 0)")
    p.add_argument("--test-fold", type=non_negative_int, help="fold held out of the search (default 0)")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default: every candidate and "
                   "every repeat of a search trains alike); bf16: autocast with fp32 master "
                   "weights, faster on CPUs with native bf16; auto: timed per worker process")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, help=KERNELS_HELP)
    p.add_argument("--cuda-graphs", action="store_true", default=None, help=CUDA_GRAPHS_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (in-process and "
                   "--workers; with cuda the workers take the GPUs in turn)")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="where candidates train: inprocess (default), process (a local pool, see "
                        "--workers) or ray (a local Ray runtime, or --ray-address)")
    p.add_argument("--workers", type=positive_int, help="train this many candidates at once in a local "
                   "process pool, one device each (implies --executor process; default 2 there)")
    p.add_argument("--ray-address", help="Ray cluster to join, e.g. ray://head:10001 or auto "
                   "(default: start a local Ray runtime)")
    p.add_argument("--gpus-per-trial", type=non_negative_number, help="GPUs per candidate on Ray; "
                   "fractions share a GPU between small candidates, e.g. 0.25 (default 0: CPU)")
    p.add_argument("--cpus-per-trial", type=positive_number, default=1.0,
                   help="CPUs per candidate on Ray (default 1)")
    add_verify_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search)


SEARCH_DESCRIPTION = (
    "Partial Order Pruning search over ConvRes architectures: train a random unpruned candidate "
    "on the training folds, score it on the validation fold (the test fold stays held out), "
    "prune every narrower or shallower arch that cannot beat the front, repeat. Resumable from "
    "its journal (--resume).")


def search_main(argv: list[str] | None = None) -> int:
    """Entry point of `naslung-search` (the same as `naslung search`)."""
    parser = CommandParser(prog="naslung-search", description=SEARCH_DESCRIPTION)
    add_search_options(parser)
    return run(parser, argv)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_search_options(sub.add_parser("search", help="architecture search (also naslung-search)",
                                      description=SEARCH_DESCRIPTION))
