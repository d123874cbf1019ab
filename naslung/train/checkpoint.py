"""Checkpoints: a state_dict (``model.pt``) beside JSON metadata (``model.json``).

The weights load with ``torch.load(weights_only=True)``, so opening a checkpoint never runs
code from the file; everything needed to rebuild the model and its input pipeline (arch, CBAM
variant, head, crop size, HU window and normalisation) is in the JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from naslung.arch import Arch
from naslung.data.augment import Normalisation
from naslung.fileio import write_atomically, write_json
from naslung.models import ConvRes

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match its metadata."""


def save_checkpoint(directory: str | os.PathLike, model: ConvRes, meta: dict[str, Any]) -> Path:
    """Write ``model.pt`` then ``model.json`` (the JSON last: its presence marks completeness)."""
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
    meta = {**meta, "arch": str(model.arch), "cbam": model.cbam_variant, "head": model.head_kind}
    write_json(directory / META_FILE, meta)
    return directory


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[ConvRes, dict[str, Any]]:
    """Rebuild the model (eval mode) from a checkpoint directory or its ``model.pt``."""
    path = Path(path)
    directory = path.parent if path.suffix == ".pt" else path
    weights, meta_file = directory / WEIGHTS_FILE, directory / META_FILE
    if not weights.is_file() or not meta_file.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected {WEIGHTS_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
        model = ConvRes(Arch.parse(meta["arch"]), cbam=meta["cbam"], head=meta["head"])
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {directory} is unusable: {err}") from err
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # a damaged file makes the unpickler raise almost anything
        reason = (str(err).splitlines() or ["damaged"])[0]
        raise CheckpointError(f"checkpoint {directory} is unusable: {type(err).__name__} reading "
                              f"{WEIGHTS_FILE}: {reason}") from err
    return model.to(device).eval(), meta


def checkpoint_normalisation(meta: dict[str, Any]) -> Normalisation:
    """The input normalisation a checkpoint was trained with."""
    return Normalisation(**meta["normalisation"])
