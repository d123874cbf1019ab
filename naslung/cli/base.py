"""What every command shares: the one-line usage error, the parser that raises it, option
helps and checks, and how a command finds its store or the previous command's run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from naslung.arch import ArchError
from naslung.console import console
from naslung.data.ct import CTReadError
from naslung.data.store import CropStore, StoreError
from naslung.export.ensemble import ExportError
from naslung.export.metadata import ModelError
from naslung.fileio import OutputError
from naslung.locking import LockedError
from naslung.paths import default_phantom_dir
from naslung.processes import WorkerError
from naslung.train.checkpoint import CheckpointError
from naslung.train.crossval import RunError

if TYPE_CHECKING:
    import torch

USAGE_ERROR = 2


class UsageError(Exception):
    """A request the user can fix; reported as one line, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (with a hint to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def fmt_int(value: int) -> str:
    return f"{value:,}"


def fmt_metric(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN when a class is absent


CUDA_GRAPHS_HELP = ("replay each training step as one CUDA graph (CUDA only; static shapes, the ragged "
                    "last batch runs eagerly)")
PRECISION_HELP = ("auto (default): the fastest of fp32 and bf16 autocast measured on this machine at "
                  "the start (bf16 only where the CPU has native bf16; fp32 on a GPU); fp32; bf16")
KERNELS_HELP = ("auto (default): the fused Triton kernels on CUDA, plain PyTorch elsewhere; torch: "
                "always plain PyTorch; triton: always the fused Triton kernels (CUDA only); native: "
                "the csrc/ C++ kernels on the CPU; cuda: the csrc/ CUDA kernels on a GPU (with "
                "torch's convolutions)")


def add_verify_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of the store's files against the SHA-256 in its manifest "
                   "(about a second per 400 MB; sizes and headers are always checked)")


def check_test_fold(store: CropStore, fold: int, option: str) -> None:
    """The held-out test fold must exist in the store and leave training and validation data."""
    from naslung.data.folds import FoldSplit

    try:
        FoldSplit.of(store.folds, fold, store.n_folds)
    except ValueError as err:
        raise UsageError(f"{option} {fold}: {err}") from err


def check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    if cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device; drop it on the CPU")


def newest_run(pattern: str, what: str, option: str = "--run") -> Path:
    """The most recently modified ``runs/<pattern>`` (for commands run in sequence without
    ``option``)."""
    runs = sorted(Path("runs").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UsageError(f"no {what} under ./runs: pass {option}")
    console.print(f"using the newest {what}: {runs[-1]}")
    return runs[-1]


def phantom_store(data_dir: Path | None, limit: int | None, progress: bool,
                   **options) -> CropStore:
    from naslung.data.phantom import prepare_phantom  # imports pylidc: only when needed

    try:
        return prepare_phantom(data_dir, limit=limit, progress=progress, **options)
    except ValueError as err:
        raise UsageError(str(err)) from err


def open_store(data_dir: Path | None, limit: int | None, progress: bool, verify: bool) -> CropStore:
    """The store at ``--data-dir``; without one, the built-in phantom (built on first use).
    With ``verify`` its files are checked against the manifest's SHA-256."""
    if data_dir is not None:
        return CropStore.open(data_dir, verify=verify)
    default = default_phantom_dir(limit)
    if not default.exists():
        console.print(f"building the built-in lidc-phantom store in {default} (once)")
    store = phantom_store(None, limit, progress)
    if verify and store.verified != "sha256":
        store.verify()
    return store


def parse_folds(text: str | None, store: CropStore) -> list[int]:
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


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; a user error is one line and status 2."""
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
