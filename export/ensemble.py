"""The deployable ensemble: trained members read from a run, as one module from HU to labels.

`DeployedEnsemble` is what gets exported: HU crops in; mean malignancy probability, each
member's probability, the majority vote, the stem CBAM's spatial attention and a Grad-CAM
out. Each member clips and standardises its own input (members of one ensemble are trained
on different folds, with different statistics), so the graph takes plain HU.

Grad-CAM needs no backward pass here: the head sees the last feature map A only through
average pooling, and both heads are linear in the pooled features (A-Softmax's logits are
``x @ normalize(W)`` before a clamp that only binds at |cos| = 1), so the gradient of the
malignancy log-odds with respect to A is a constant direction g / V and Grad-CAM is
``relu(sum_c g_c A_c) / V`` exactly: one forward op, which ONNX and TensorRT can run
(checked against autograd in the tests).

Members come from a run directory: an ensemble (``naslung ensemble``'s output, or a search
run holding one), a cross-validation run, or one checkpoint. Of a member's fold models, the
one with the best validation score (the metric its training selected epochs by) is kept:
chosen on validation folds only, like everything else here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from naslung.arch import Arch
from naslung.data.augment import AIR_HU as AIR_PAD_HU
from naslung.data.augment import Normalisation
from naslung.data.crop import CROP_SIZE
from naslung.data.ct import AIR_HU as OUTSIDE_HU
from naslung.export.metadata import HU_UNITS, THRESHOLD, VOTE_RULE, MemberInfo, ModelMetadata
from naslung.models import ConvRes
from naslung.models.fused import FUSED
from naslung.models.heads import AngleLinear
from naslung.train.checkpoint import META_FILE, CheckpointError, checkpoint_normalisation, load_checkpoint
from naslung.train.trainer import selection_score
from naslung.versions import versions

SPACING_MM = 1.0
REFERENCE_CLASSES = {fused: reference for swaps in FUSED.values() for reference, fused in swaps.items()}


class ExportError(ValueError):
    """A run directory that cannot be deployed; one line saying what to do."""


def log_odds_direction(head: nn.Module) -> torch.Tensor:
    """d(logit_malignant - logit_benign) / d(pooled features), shape (C,): constant, since
    both heads are linear in the features (see the module docstring)."""
    if isinstance(head, AngleLinear):
        w = F.normalize(head.weight, dim=0)  # (in, out) columns of unit norm
        return w[:, 1] - w[:, 0]
    if isinstance(head, nn.Linear):
        return head.weight[1] - head.weight[0]
    raise ExportError(f"cannot explain a {type(head).__name__} head")


def grad_cam(feature_map: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the log-odds over ``feature_map`` (N, C, d, h, w): relu(sum_c g_c A_c) / V,
    shape (N, 1, d, h, w)."""
    voxels = feature_map[0, 0].numel()
    weighted = (feature_map * direction.to(feature_map.dtype)[None, :, None, None, None]).sum(1, keepdim=True)
    return torch.relu(weighted) / voxels


def unfused(model: ConvRes) -> ConvRes:
    """``model`` with every fused block turned back into its reference class (same weights):
    export traces the plain PyTorch modules, never the Triton kernels."""
    for module in model.modules():
        reference = REFERENCE_CLASSES.get(type(module))
        if reference is not None:
            module.__class__ = reference
    return model


class DeployedMember(nn.Module):
    """One trained ConvRes with its own input normalisation, in eval mode."""

    def __init__(self, model: ConvRes, normalisation: Normalisation) -> None:
        super().__init__()
        self.model = unfused(model).eval()
        # Tensors, not Python floats: the exporter lifts float constants of several members
        # under clashing names. They stay fp32 in an fp16 model (see `to_precision`).
        for name, value in normalisation.to_dict().items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        self.register_buffer("direction", log_odds_direction(self.model.head).detach().clone())

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 1, D, H, W) HU -> probability (N,), attention (N, 1, D, H, W), Grad-CAM scaled to
        a maximum of 1 per crop (N, 1, d, h, w); computed in the weights' dtype, returned in fp32."""
        x = ((hu.clamp(self.hu_min, self.hu_max) - self.mean) / self.std).to(self.direction.dtype)
        feature_map, attention = self.model.explained_features(x)
        logits = self.model.head(self.model.pool(feature_map).flatten(1))
        probability = torch.softmax(logits.float(), dim=1)[:, 1]
        cam = grad_cam(feature_map, self.direction).float()
        cam = cam / cam.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
        return probability, attention.float(), cam


class DeployedEnsemble(nn.Module):
    """HU crops (N, 1, crop, crop, crop) -> the outputs named in `export.metadata.OUTPUT_NAMES`."""

    def __init__(self, members: list[DeployedMember], metadata: ModelMetadata) -> None:
        super().__init__()
        if not members:
            raise ExportError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.metadata = metadata

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probabilities, attentions, cams = zip(*(member(hu) for member in self.members), strict=True)
        member_probabilities = torch.stack(probabilities, dim=1)
        votes = (member_probabilities >= THRESHOLD).float().mean(dim=1)
        majority_vote = (votes >= 0.5).to(torch.int64)
        return (member_probabilities.mean(dim=1), member_probabilities, majority_vote,
                torch.stack(attentions).mean(dim=0), torch.stack(cams).mean(dim=0))

    def to_precision(self, precision: str) -> DeployedEnsemble:
        """The members' weights in fp32 or fp16 (inputs and outputs stay fp32)."""
        dtypes = {"fp32": torch.float32, "fp16": torch.float16}
        if precision not in dtypes:
            raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(dtypes)}")
        for member in self.members:
            member.model.to(dtypes[precision])
            member.direction = member.direction.to(dtypes[precision])
        self.metadata = dataclasses.replace(self.metadata, precision=precision)
        return self


# --- reading members from a run -------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} is unreadable ({err})") from err


def validation_score(meta: dict[str, Any]) -> float:
    """How a fold's training scored the epoch it kept (`selection_score` of its validation
    metrics); -inf when its checkpoint does not say."""
    metric = (meta.get("train_config") or {}).get("select", "auc")
    recorded = meta.get("val_metrics") or {}
    metrics = {name: float("nan") if recorded.get(name) is None else float(recorded[name])
               for name in ("accuracy", metric)}
    score = selection_score(metrics, metric)
    return -math.inf if math.isnan(score) else score


def best_fold_checkpoint(run_dir: Path) -> Path:
    """The fold checkpoint of a cross-validation run with the best `validation_score`; the
    lower fold on ties."""
    candidates = []
    for meta_file in sorted(run_dir.glob(f"fold*/{META_FILE}")):
        meta = _read_json(meta_file)
        candidates.append((-validation_score(meta), int(meta.get("fold", 0)), meta_file.parent))
    if not candidates:
        raise ExportError(f"{run_dir}: no finished fold checkpoint (fold*/{META_FILE})")
    return min(candidates)[2]


def _ensemble_member_runs(ensemble_dir: Path) -> list[Path]:
    """The members' cross-validation runs of an ensemble directory, in its table's order."""
    table = ensemble_dir / "ensemble.csv"
    if not table.is_file():
        raise ExportError(f"{ensemble_dir}: no ensemble.csv; the ensemble did not finish: rerun "
                          "`naslung ensemble`, which resumes")
    with open(table, newline="") as f:
        archs = [row["model"] for row in csv.DictReader(f) if row.get("kind") == "member"]
    runs = [ensemble_dir / "members" / Arch.parse(a).dirname for a in archs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if not archs or missing:
        raise ExportError(f"{ensemble_dir}: member runs missing ({', '.join(missing) or 'none listed'})")
    return runs


def member_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint directories to deploy from ``path``: an ensemble directory, a search run
    with an ``ensemble/`` inside, a cross-validation run, a checkpoint directory or model.pt."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        path = path.parent
    if not path.is_dir():
        raise ExportError(f"{path}: no such run directory")
    if (path / META_FILE).is_file():
        return [path]
    for ensemble_dir in (path, path / "ensemble"):
        if (ensemble_dir / "members").is_dir():
            return [best_fold_checkpoint(run) for run in _ensemble_member_runs(ensemble_dir)]
    if any(path.glob(f"fold*/{META_FILE}")):
        return [best_fold_checkpoint(path)]
    if (path / "pareto.json").is_file():
        raise ExportError(f"{path} is a search run without an ensemble: run `naslung ensemble --run "
                          f"{path}` first, or pass one checkpoint directory")
    raise ExportError(f"{path} holds no checkpoint: expected an ensemble directory, a search run "
                      "with its ensemble, a cross-validation run or a checkpoint directory")


def _store_manifest(checkpoint_dir: Path) -> dict[str, Any]:
    """The manifest of the store the checkpoint was trained on, when that store is still there."""
    config = checkpoint_dir.parent / "config.json"
    store = _read_json(config).get("store") if config.is_file() else None
    manifest = Path(store) / "manifest.json" if store else None
    return _read_json(manifest) if manifest is not None and manifest.is_file() else {}


def _input_pipeline(checkpoint_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """crop, grid and units of one member, from its checkpoint and its store."""
    config = meta.get("train_config") or {}
    manifest = _store_manifest(checkpoint_dir)
    padded_with_air = float(config.get("background", AIR_PAD_HU)) == AIR_PAD_HU
    units = manifest.get("units", HU_UNITS if manifest or padded_with_air else None)
    if units is None:
        raise ExportError(f"{checkpoint_dir}: its crop store is gone and its inputs are not the "
                          "default HU pipeline, so their units are unknown")
    grid = int((manifest.get("crop_shape") or [CROP_SIZE])[0])
    parameters = {**manifest, **(manifest.get("parameters") or {})}
    rule = {k: parameters[k] for k in ("source", "label_rule", "min_readers", "min_diameter_mm")
            if k in parameters}
    if "label_rule" in rule:
        rule["text"] = (f"the readers' {rule['label_rule']} malignancy rating > 3 malignant, < 3 "
                        "benign, = 3 left out")
    return {"crop": int(meta["crop"]), "grid": max(grid, int(meta["crop"])), "units": units,
            "reference_labels": rule}


def load_ensemble(path: str | Path) -> DeployedEnsemble:
    """The deployable ensemble of the run (or checkpoint) at ``path``, on the CPU, fp32."""
    members, infos, pipelines = [], [], []
    for checkpoint_dir in member_checkpoints(path):
        try:
            model, meta = load_checkpoint(checkpoint_dir)
            normalisation = checkpoint_normalisation(meta)
        except (CheckpointError, KeyError, TypeError) as err:
            raise ExportError(f"{checkpoint_dir}: unusable checkpoint ({err})") from err
        members.append(DeployedMember(model, normalisation))
        infos.append(MemberInfo(arch=str(model.arch), cbam=model.cbam_variant, head=model.head_kind,
                                normalisation=normalisation.to_dict(), source=str(checkpoint_dir),
                                fold=meta.get("fold"), val_metrics=meta.get("val_metrics")))
        pipelines.append(_input_pipeline(checkpoint_dir, meta))
    first = pipelines[0]
    for info, pipeline in zip(infos[1:], pipelines[1:], strict=True):
        differs = [k for k in ("crop", "grid", "units") if pipeline[k] != first[k]]
        if differs:
            raise ExportError(f"member {info.source} differs from {infos[0].source} in "
                              f"{', '.join(differs)}: members of one model must share the input")
    metadata = ModelMetadata(
        crop=first["crop"], grid=first["grid"], spacing_mm=SPACING_MM,
        outside_hu=float(OUTSIDE_HU), units=first["units"], members=infos,
        label_rule={"threshold": THRESHOLD, "vote": VOTE_RULE,
                    "reference_labels": first["reference_labels"]},
        versions=versions())
    return DeployedEnsemble(members, metadata).eval()

