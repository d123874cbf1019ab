"""The training recipe: learning-rate schedules, precision and layout, the loss choices, the
presets, and the search's score over its last epochs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from naslung.cli.train import LOSSES, PRESETS
from naslung.data.folds import FoldSplit
from naslung.models import ConvRes, make_loss
from naslung.models.heads import AngleLinear, AngleLoss
from naslung.search.driver import SearchConfig, _score
from naslung.train.formats import TrainFormat, candidate_formats, choose_format, cpu_supports_bf16
from naslung.train.schedule import decay_epochs, learning_rate
from naslung.train.trainer import TrainConfig, train_fold, volumes_on_device

CPU = torch.device("cpu")


def test_the_original_schedule_decays_over_the_last_70_of_400_epochs():
    assert decay_epochs(400) == 70 and decay_epochs(14) == 2 and decay_epochs(1) == 1
    lr = 2e-4
    assert learning_rate("original", lr, 0, 400) == lr
    assert learning_rate("original", lr, 330, 400) == lr  # the first decay follows epoch 330
    assert learning_rate("original", lr, 331, 400) == pytest.approx(lr * 69 / 70)
    assert learning_rate("original", lr, 399, 400) == pytest.approx(lr * (69 / 70) ** 69)
    assert learning_rate("original", lr, 399, 400) / lr == pytest.approx(0.3706, abs=1e-4)


def test_cosine_and_constant_schedules():
    assert learning_rate("cosine", 1.0, 0, 10) == 1.0
    assert learning_rate("cosine", 1.0, 5, 10) == pytest.approx(0.5)
    assert 0 < learning_rate("cosine", 1.0, 9, 10) < 0.03
    assert {learning_rate("constant", 0.1, e, 7) for e in range(7)} == {0.1}
    with pytest.raises(ValueError, match="outside"):
        learning_rate("cosine", 1.0, 10, 10)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_final_training_defaults_to_cosine():
    """The default the 10-fold comparison with a constant rate chose (README, Results)."""
    assert TrainConfig().schedule == "cosine"


def test_the_trainer_follows_the_schedule(sphere_store):
    cfg = TrainConfig(arch="4/4/8", epochs=3, schedule="cosine", lr=1e-3)
    volumes = volumes_on_device(sphere_store.crops, cfg, CPU)
    result = train_fold(volumes, torch.from_numpy(sphere_store.labels),
                        FoldSplit.of(sphere_store.folds, 0, 5), cfg, score_test=False)
    assert [h["lr"] for h in result.history] == [learning_rate("cosine", 1e-3, e, 3) for e in range(3)]


def test_losses_reproduce_the_original_and_the_margin():
    assert LOSSES == {"asoftmax": ("asoftmax", True), "original": ("asoftmax", False),
                      "ce": ("linear", True)}
    model = ConvRes("4/4/8", head="asoftmax")
    assert isinstance(model.head, AngleLinear)
    assert isinstance(make_loss(model.head), AngleLoss)
    plain = make_loss(model.head, margin=False)
    assert isinstance(plain, nn.CrossEntropyLoss)
    x, y = torch.randn(3, 1, 16, 16, 16), torch.tensor([0, 1, 1])
    logits = model(x)
    assert plain(logits, y).item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())


def test_presets_say_what_the_readme_says():
    assert PRESETS["paper"] == {"epochs": 400, "batch_size": 8, "lr": 2e-4, "schedule": "original",
                                "patience": 50, "limit": None}
    study = PRESETS["study"]
    assert study == {"epochs": 14, "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "loss": "ce",
                     "limit": None}
    head, margin = LOSSES[study["loss"]]
    TrainConfig(epochs=study["epochs"], batch_size=study["batch_size"], lr=study["lr"],
                schedule=study["schedule"], head=head, margin=margin, precision="auto",
                channels_last=None)


def test_format_candidates_on_the_cpu():
    assert candidate_formats("fp32", False, CPU) == [TrainFormat("fp32", False)]
    auto = candidate_formats("auto", None, CPU)
    expected = {"fp32", "bf16"} if cpu_supports_bf16() else {"fp32"}
    assert {f.precision for f in auto} == expected and {f.channels_last for f in auto} == {False, True}
    with pytest.raises(ValueError, match="precision"):
        candidate_formats("fp16", None, CPU)


def test_choose_format_times_every_candidate_and_picks_the_fastest():
    chosen, timings = choose_format("4/4/8", "nas-lung", "linear", 16, 2, "fp32", None, CPU)
    assert set(timings) == {"fp32", "fp32 channels_last_3d"}
    assert all(t > 0 for t in timings.values())
    label = "fp32 channels_last_3d" if chosen.channels_last else "fp32"
    assert timings[label] == min(timings.values())


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_reaches_the_fp32_validation_auc(sphere_store):
    volumes = None
    aucs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(arch="4/4/8", epochs=6, head="linear", lr=1e-3, precision=precision)
        volumes = volumes if volumes is not None else volumes_on_device(sphere_store.crops, cfg, CPU)
        result = train_fold(volumes, torch.from_numpy(sphere_store.labels),
                            FoldSplit.of(sphere_store.folds, 0, 5), cfg)
        assert result.train_format.precision == precision
        aucs[precision] = result.val_metrics["auc"]
    assert aucs["fp32"] > 0.8 and abs(aucs["bf16"] - aucs["fp32"]) < 0.1, aucs


def test_search_scores_the_mean_of_the_last_epochs():
    history = [{"val_auc": v, "val_accuracy": 0.5} for v in (0.9, 0.6, 0.7, 0.8)]
    assert _score(history, "auc", 3) == pytest.approx(0.7)
    assert _score(history, "auc", 10) == pytest.approx(0.75)  # fewer epochs than asked
    history[-1]["val_auc"] = math.nan  # one class in the fold: that epoch counts its accuracy
    assert _score(history, "auc", 2) == pytest.approx(np.mean([0.7, 0.5]))
    assert SearchConfig().metric == "auc" and SearchConfig().score_epochs == 5
    with pytest.raises(ValueError, match="score_epochs"):
        SearchConfig(score_epochs=0)
