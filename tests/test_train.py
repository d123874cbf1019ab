"""Trainer: splits, learning, determinism, run directories, resume and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from naslung.data.folds import FoldSplit
from naslung.train.checkpoint import load_checkpoint
from naslung.train.crossval import RunError, cross_validate
from naslung.train.evaluate import evaluate_checkpoint
from naslung.train.trainer import TrainConfig, resolve_device, train_fold, volumes_on_device

CPU = torch.device("cpu")


def tensors(store, cfg):
    return volumes_on_device(store.crops, cfg, CPU), torch.from_numpy(store.labels)


def test_fold_split_is_disjoint_and_uses_next_fold_for_validation():
    folds = np.repeat(np.arange(5), 4)
    split = FoldSplit.of(folds, 4, 5)
    assert split.val_fold == 0
    assert set(folds[split.test]) == {4} and set(folds[split.val]) == {0}
    assert set(folds[split.train]) == {1, 2, 3}
    assert len(set(split.train) | set(split.val) | set(split.test)) == 20
    with pytest.raises(ValueError, match="out of range"):
        FoldSplit.of(folds, 5, 5)
    with pytest.raises(ValueError, match=">= 2 folds"):
        FoldSplit.of(folds * 0, 0, 1)


def test_two_folds_select_on_training_crops_never_on_the_test_fold():
    folds = np.array([0, 0, 1, 1, 1])
    split = FoldSplit.of(folds, 0, 2)
    assert split.val_fold == -1
    assert split.train.tolist() == split.val.tolist() == [2, 3, 4] and split.test.tolist() == [0, 1]


def test_short_training_run_learns(sphere_store):
    cfg = TrainConfig(arch="4/4/8", epochs=6, head="linear", lr=1e-3, channels_last=False)
    volumes, labels = tensors(sphere_store, cfg)
    result = train_fold(volumes, labels, FoldSplit.of(sphere_store.folds, 0, 5), cfg)
    losses = [h["train_loss"] for h in result.history]
    assert min(losses[-2:]) < 0.7 * losses[0], f"train loss did not drop: {losses}"
    assert result.test_metrics["auc"] > 0.8


def test_training_is_deterministic_on_cpu(sphere_store):
    cfg = TrainConfig(arch="4/4/8", epochs=1, seed=3)
    volumes, labels = tensors(sphere_store, cfg)
    split = FoldSplit.of(sphere_store.folds, 2, 5)
    a, b = (train_fold(volumes, labels, split, cfg) for _ in range(2))
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    np.testing.assert_array_equal(a.test_probabilities, b.test_probabilities)


def test_cross_validation_writes_run_and_resumes(sphere_store, tmp_path):
    cfg = TrainConfig(arch="4/4/8", epochs=1)
    run = cross_validate(sphere_store, cfg, tmp_path / "run", CPU, folds=[0, 3], show_progress=False)
    assert sorted(run.per_fold) == [0, 3]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["folds"]) == {"0", "3"} and "mean" in metrics["summary"]["auc"]
    for fold in (0, 3):
        fold_dir = tmp_path / "run" / f"fold{fold}"
        assert {p.name for p in fold_dir.iterdir()} == {
            "model.pt", "model.json", "history.csv", "predictions.csv"}
        predicted = (fold_dir / "predictions.csv").read_text().splitlines()
        assert len(predicted) - 1 == int((sphere_store.folds == fold).sum())

    weights = tmp_path / "run" / "fold0" / "model.pt"
    before = weights.stat().st_mtime_ns
    again = cross_validate(sphere_store, cfg, tmp_path / "run", CPU, folds=[0], show_progress=False)
    assert weights.stat().st_mtime_ns == before, "a finished fold must be reused, not retrained"
    assert again.per_fold[0] == run.per_fold[0]

    with pytest.raises(RunError, match="another config"):
        cross_validate(sphere_store, TrainConfig(arch="4/4/4", epochs=1), tmp_path / "run", CPU,
                       folds=[0], show_progress=False)


def test_checkpoint_round_trip_reproduces_test_metrics(sphere_store, tmp_path):
    cfg = TrainConfig(arch="4/4/8", epochs=1, cbam="woo", head="linear")
    run = cross_validate(sphere_store, cfg, tmp_path / "run", CPU, folds=[1], show_progress=False)
    model, meta = load_checkpoint(tmp_path / "run" / "fold1", CPU)
    assert meta["arch"] == "4/4/8" and meta["cbam"] == "woo" and meta["head"] == "linear"
    assert not model.training
    result = evaluate_checkpoint(tmp_path / "run" / "fold1", sphere_store, None, CPU)
    assert result.fold == 1 and result.warning is None
    assert result.metrics["confusion"] == run.per_fold[1]["confusion"]
    assert result.metrics["auc"] == pytest.approx(run.per_fold[1]["auc"])
    other = evaluate_checkpoint(tmp_path / "run" / "fold1", sphere_store, 2, CPU)
    assert "used for training" in other.warning


def test_weights_load_with_weights_only(sphere_store, tmp_path):
    cross_validate(sphere_store, TrainConfig(arch="4/4/4", epochs=1), tmp_path / "r", CPU,
                   folds=[0], show_progress=False)
    state = torch.load(tmp_path / "r" / "fold0" / "model.pt", weights_only=True)
    assert "head.weight" in state and "stages.0.down.conv.weight" in state


@pytest.mark.parametrize("name, message", [("tpu", "unknown device"), ("cuda:x", "unknown device")])
def test_bad_devices_are_rejected(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_config_validation():
    with pytest.raises(ValueError, match="selection metric"):
        TrainConfig(select="loss")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_empty_validation_fold_is_refused():
    folds = np.array([0, 0, 2, 2, 3, 3])  # fold 1 (validation for test fold 0) is empty
    with pytest.raises(ValueError, match="validation set is empty"):
        FoldSplit.of(folds, 0, 4)


def test_metrics_cover_folds_of_earlier_calls(sphere_store, tmp_path):
    cfg = TrainConfig(arch="4/4/4", epochs=1)
    cross_validate(sphere_store, cfg, tmp_path / "run", CPU, folds=[0], show_progress=False)
    run = cross_validate(sphere_store, cfg, tmp_path / "run", CPU, folds=[1, 1], show_progress=False)
    assert sorted(run.per_fold) == [0, 1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["folds"]) == {"0", "1"}


def test_a_fold_of_another_config_is_never_reused(sphere_store, tmp_path):
    cross_validate(sphere_store, TrainConfig(arch="4/4/4", epochs=1), tmp_path / "run", CPU,
                   folds=[0], show_progress=False)
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(RunError, match="another config"):
        cross_validate(sphere_store, TrainConfig(arch="4/4/8", epochs=1), tmp_path / "run", CPU,
                       folds=[0], show_progress=False)
