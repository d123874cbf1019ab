"""A whole training epoch: naslung's loop against one written the way the original trains.

Both train `4,8,16/32,32/64,128` with the A-Softmax loss, Adam and batch 8 on the same 256
crops of a synthetic store, for one epoch, warm (the first epoch is not timed):

* ``original_loop``: NAS-Lung's data path, per sample in Python on the CPU: the 32^3 crop
  scaled to 0..255, padded by 2 voxels on the low side with 170, a random 32^3 crop, a zeroed
  random 4^3 cube, a tensor normalised by a mean and std, then batched by a DataLoader (no
  worker processes: two cores), fp32 NCDHW;
* ``naslung_loop``: `train_fold` for one epoch (batched augmentation on the device, the
  format `--precision auto` and the measured layout choose), plus its validation pass.

Run with ``python -m pytest bench/test_bench_loop.py -q``; the ratio is in the report.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from naslung import Arch, ConvRes
from naslung.data.folds import FoldSplit
from naslung.models import make_loss
from naslung.train.trainer import TrainConfig, train_fold, volumes_on_device

ARCH = "4,8,16/32,32/64,128"
N_TRAIN, N_VAL, SIDE, BATCH = 256, 32, 48, 8


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    crops = rng.normal(-700, 200, (N_TRAIN + N_VAL, SIDE, SIDE, SIDE)).astype(np.int16)
    return crops, (np.arange(len(crops)) % 2).astype(np.int64)


class OriginalStyleCrops(Dataset):
    """Per-sample augmentation as the original's transforms do it."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray) -> None:
        lo = (SIDE - 32) // 2
        hu = crops[:, lo:lo + 32, lo:lo + 32, lo:lo + 32].astype(np.float32)
        self.scaled = np.clip((hu + 1000) / 1400 * 255, 0, 255)
        self.labels = labels
        self.rng = np.random.default_rng(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        padded = np.pad(self.scaled[i], ((2, 0), (2, 0), (2, 0)), constant_values=170)
        z, y, x = self.rng.integers(0, 3, 3)
        crop = padded[z:z + 32, y:y + 32, x:x + 32].copy()
        a, b, c = self.rng.integers(0, 29, 3)
        crop[a:a + 4, b:b + 4, c:c + 4] = 0
        tensor = (torch.from_numpy(crop)[None] / 255.0 - 0.25) / 0.16
        return tensor, int(self.labels[i])


def test_epoch_original_loop(benchmark, data) -> None:
    crops, labels = data
    benchmark.group = "epoch-256-crops"
    benchmark.extra_info.update(provider="original_loop", crops=N_TRAIN)
    torch.manual_seed(0)
    model = ConvRes(Arch.parse(ARCH))
    loss_fn = make_loss(model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = DataLoader(OriginalStyleCrops(crops[:N_TRAIN], labels[:N_TRAIN]), batch_size=BATCH,
                        shuffle=True)

    def epoch() -> None:
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

    benchmark.pedantic(epoch, warmup_rounds=1, rounds=3, iterations=1)


def test_epoch_naslung_loop(benchmark, data) -> None:
    crops, labels = data
    benchmark.group = "epoch-256-crops"
    cfg = TrainConfig(arch=ARCH, epochs=1, precision="auto", channels_last=None)
    volumes = volumes_on_device(np.concatenate([crops, crops[:1]]), cfg, torch.device("cpu"))
    targets = torch.from_numpy(np.r_[labels, 0])
    split = FoldSplit(2, 1, np.arange(N_TRAIN), np.arange(N_TRAIN, N_TRAIN + N_VAL),
                      np.array([N_TRAIN + N_VAL]))
    result = train_fold(volumes, targets, split, cfg, score_test=False)  # warm, chooses the format
    benchmark.extra_info.update(provider="naslung_loop", crops=N_TRAIN,
                                precision=result.train_format.precision,
                                channels_last=result.train_format.channels_last)
    benchmark.pedantic(lambda: train_fold(volumes, targets, split, cfg, score_test=False),
                       warmup_rounds=0, rounds=3, iterations=1)
