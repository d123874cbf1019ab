"""Scoring a saved checkpoint on a crop store, with the input pipeline it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from naslung.data.store import CropStore
from naslung.train.checkpoint import CheckpointError, checkpoint_normalisation, load_checkpoint
from naslung.train.metrics import binary_metrics
from naslung.train.trainer import TrainConfig, predict_proba, volumes_on_device


@dataclass
class EvalResult:
    """Metrics of one checkpoint on one fold (or ``"all"``), and a caveat if there is one."""

    model_fold: int | None
    fold: int | str
    metrics: dict
    probabilities: np.ndarray
    warning: str | None = None


def _overlap_warning(meta: dict, store: CropStore, fold: int | str) -> str | None:
    """Say so when the scored crops include ones the model was trained or selected on."""
    if meta.get("store_sha256") != store.fingerprint:
        return "this store is not the one the model was trained on: its folds may overlap training"
    own = meta.get("fold")
    if fold == "all" and own is not None:
        return "'all' includes the crops this model was trained and selected on"
    if fold != "all" and own is not None and int(fold) != own:
        return f"fold {fold} is not this model's test fold ({own}): it was used for training or selection"
    return None


def evaluate_checkpoint(checkpoint: str | os.PathLike, store: CropStore, fold: int | str | None,
                        device: torch.device) -> EvalResult:
    """Score ``checkpoint`` on ``fold`` of ``store``; ``None`` = the fold it was tested on."""
    model, meta = load_checkpoint(checkpoint, device)
    try:
        crop = int(meta["crop"])
        normalisation = checkpoint_normalisation(meta)
        cfg = TrainConfig(**{**meta["train_config"], "hu_window": tuple(meta["train_config"]["hu_window"]),
                             "betas": tuple(meta["train_config"]["betas"])})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} lacks input metadata ({err!r})") from err
    fold = meta.get("fold", "all") if fold is None else fold
    indices = np.arange(len(store)) if fold == "all" else np.flatnonzero(store.folds == int(fold))
    # The same padding and memory layout as at training time, so the crops and the numbers match.
    volumes = volumes_on_device(store.crops[indices], cfg, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    probabilities = predict_proba(model, volumes, normalisation, crop, channels_last=cfg.channels_last)
    return EvalResult(meta.get("fold"), fold, binary_metrics(store.labels[indices], probabilities),
                      probabilities, _overlap_warning(meta, store, fold))
