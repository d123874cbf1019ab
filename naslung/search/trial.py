"""One search trial: train a candidate arch on the training folds and score it on validation.

A trial is plain data in and plain data out (numpy arrays, dicts, a CPU state_dict), so it runs
the same in the driver's process, in a worker process or in a Ray task on another machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from naslung.arch import Arch
from naslung.data.folds import FoldSplit
from naslung.data.store import CropStore
from naslung.train.trainer import TrainConfig, prefer_channels_last, train_fold, volumes_on_device


@dataclass(frozen=True)
class TrialData:
    """What a worker needs of the crop store; ``fingerprint`` names it in caches and journals."""

    crops: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    n_folds: int
    fingerprint: str

    @classmethod
    def of(cls, store: CropStore) -> TrialData:
        return cls(store.crops, store.labels, store.folds, store.n_folds, store.fingerprint)


@dataclass(frozen=True)
class Trial:
    """One candidate to train: its index in the search space and its training settings."""

    index: int
    train_config: TrainConfig
    test_fold: int


@dataclass
class TrialResult:
    """A trained candidate: validation metrics, the kept weights (on the CPU) and where it ran."""

    val_metrics: dict[str, Any]
    best_epoch: int
    seconds: float
    state_dict: dict[str, torch.Tensor]
    normalisation: dict[str, float]
    train_config: TrainConfig
    device: str
    history: list[dict[str, Any]]
    """Per-epoch training loss and validation metrics (the search's score is made from them)."""


_volumes: dict[tuple, torch.Tensor] = {}
"""The store's crops on each device this process trained on, kept between trials (one store at
a time): copying and padding them is the costly part; labels are moved per trial."""


def _on_device(data: TrialData, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (data.fingerprint, str(device), cfg.crop + 2 * cfg.shift, cfg.background)
    if key not in _volumes:
        _volumes.clear()
        _volumes[key] = volumes_on_device(data.crops, cfg, device)
    return _volumes[key], torch.from_numpy(np.asarray(data.labels)).to(device)


def run_trial(trial: Trial, data: TrialData, device: torch.device,
              progress: Progress | None = None) -> TrialResult:
    """Train ``trial``'s arch on ``device``; the test fold is never scored."""
    started = time.perf_counter()
    cfg = replace(trial.train_config,
                  channels_last=prefer_channels_last(Arch.parse(trial.train_config.arch), device))
    volumes, labels = _on_device(data, cfg, device)
    split = FoldSplit.of(np.asarray(data.folds), trial.test_fold, data.n_folds)
    result = train_fold(volumes, labels, split, cfg, progress, score_test=False)
    cfg = replace(cfg, precision=result.train_format.precision)  # what "auto" chose
    state = {name: tensor.detach().cpu() for name, tensor in result.model.state_dict().items()}
    return TrialResult(result.val_metrics, result.best_epoch, time.perf_counter() - started, state,
                       result.normalisation.to_dict(), cfg, str(device), result.history)
