"""Scoring a saved checkpoint on a crop store, with the normalisation it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from naslung.data.store import CropStore
from naslung.train.checkpoint import checkpoint_normalisation, load_checkpoint
from naslung.train.metrics import binary_metrics
from naslung.train.trainer import predict_proba, volumes_on_device


@dataclass
class EvalResult:
    """Metrics of one checkpoint on one fold (or ``"all"``), and a caveat if there is one."""

    fold: int | str
    metrics: dict
    probabilities: np.ndarray
    warning: str | None = None


def evaluate_checkpoint(checkpoint: str | os.PathLike, store: CropStore, fold: int | str | None,
                        device: torch.device) -> EvalResult:
    """Score ``checkpoint`` on ``fold`` of ``store``; ``None`` = the fold it was tested on."""
    model, meta = load_checkpoint(checkpoint, device)
    fold = meta.get("fold", "all") if fold is None else fold
    indices = np.arange(len(store)) if fold == "all" else np.flatnonzero(store.folds == int(fold))
    warning = None
    if meta.get("store_sha256") != store.fingerprint:
        warning = "this store is not the one the model was trained on: folds may overlap training"
    elif fold != "all" and int(fold) != meta.get("fold"):
        warning = (f"fold {fold} is not this model's test fold ({meta.get('fold')}): "
                   "it was used for training or selection")
    crop = int(meta["crop"])
    volumes = volumes_on_device(store.crops[indices], crop, 0, device)
    probabilities = predict_proba(model, volumes, checkpoint_normalisation(meta), crop)
    return EvalResult(fold, binary_metrics(store.labels[indices], probabilities), probabilities,
                      warning)
