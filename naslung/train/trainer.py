"""Training one model on one cross-validation split, with selection on a validation fold.

The test fold is never looked at while training: the epoch to keep is chosen on a validation
fold carved from the training folds, and the test fold is scored once, with the kept weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from naslung.arch import Arch
from naslung.data.augment import AIR_HU, HU_WINDOW, Augmenter, Normalisation, centre_crop, pad_volumes
from naslung.data.folds import FoldSplit
from naslung.kernels.runtime import on_tensor_device
from naslung.models import ConvRes, make_loss
from naslung.models.fused import KERNEL_CHOICES, NATIVE_KERNELS, fuse_for, resolve_kernels
from naslung.train.formats import PRECISIONS, TrainFormat, choose_format
from naslung.train.graphs import TrainStep
from naslung.train.metrics import binary_metrics
from naslung.train.schedule import SCHEDULES, learning_rate

SELECT_METRICS = ("auc", "accuracy")
CHANNELS_LAST_MIN_GFLOPS = 0.5
"""On the CPU, channels_last_3d trained 8-14 % faster than NCDHW for archs of 1 and 12 GFLOPs
per crop, and 6-24 % slower for one of 0.38 GFLOPs (bench/test_bench_cpu.py, README)."""


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored with every run and checkpoint."""

    arch: str = "4,8,16/32,32/64,128"
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    head: str = "asoftmax"
    margin: bool = True
    """With the A-Softmax head: train with its margin (A-Softmax), or (False) plain
    cross-entropy on its normalised logits, as the original code shipped (``--loss original``)."""
    schedule: str = "cosine"
    """Chosen by the paired 10-fold comparison with a constant rate (README, Results)."""
    cbam: str = "nas-lung"
    crop: int = 32
    shift: int = 4
    zero_out: int = 4
    hu_window: tuple[float, float] = HU_WINDOW
    background: float = AIR_HU
    select: str = "auc"
    patience: int | None = None
    seed: int = 0
    channels_last: bool | None = False
    """None: the faster layout on this machine, measured (`naslung.train.formats`)."""
    precision: str = "fp32"
    """fp32, bf16 (autocast, fp32 master weights) or auto (measured, see formats)."""
    kernels: str = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        Arch.parse(self.arch)
        if self.select not in SELECT_METRICS:
            raise ValueError(f"unknown selection metric {self.select!r}; "
                             f"choose from {', '.join(SELECT_METRICS)}")
        for name in ("epochs", "batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be a positive number, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"the seed must lie in 0..2**32-1, got {self.seed}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose from {', '.join(KERNEL_CHOICES)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldResult:
    """The kept model of one split and how it scored."""

    model: ConvRes
    normalisation: Normalisation
    best_epoch: int
    val_metrics: dict
    test_metrics: dict
    test_probabilities: np.ndarray
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    train_format: TrainFormat = TrainFormat("fp32", False)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; clear errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) present")
    return device


def prefer_channels_last(arch: Arch, device: torch.device) -> bool:
    """The faster memory layout for training ``arch`` on ``device`` (see the bench figures)."""
    return device.type == "cpu" and arch.flops() >= CHANNELS_LAST_MIN_GFLOPS * 1e9


def _batch_maker(volumes: torch.Tensor, normalisation: Normalisation, cfg: TrainConfig, kernels: str,
                 generator: torch.Generator, seed: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """(store indices, batch number) -> the augmented batch: with the csrc/ kernels one launch
    drawing from Philox keyed by (seed, batch number), else `Augmenter`'s tensor ops drawing
    from ``generator``."""
    if kernels in NATIVE_KERNELS:
        from naslung.native.augment import augment_batch

        return lambda batch, number: augment_batch(volumes, batch, cfg.crop, cfg.shift, True, cfg.zero_out,
                                                   normalisation, seed, number)
    augment = Augmenter(cfg.crop, cfg.shift, True, cfg.zero_out)
    return lambda batch, number: augment(volumes[batch], normalisation, generator)


def volumes_on_device(crops: np.ndarray, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """The whole store as one int16 tensor on ``device``, padded with the background value
    where it is smaller than the crop plus its random shift."""
    volumes = torch.from_numpy(np.array(crops, dtype=np.int16)).to(device)  # copies the memmap
    return pad_volumes(volumes, cfg.crop + 2 * cfg.shift, cfg.background)


@torch.inference_mode()
def predict_proba(model: ConvRes, volumes: torch.Tensor, normalisation: Normalisation,
                  crop: int, batch_size: int = 64, channels_last: bool = False) -> np.ndarray:
    """Malignancy probabilities of the centre crops of ``volumes``, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(volumes), batch_size):
        x = normalisation(centre_crop(volumes[start:start + batch_size], crop)).unsqueeze(1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def selection_score(metrics: dict, select: str) -> float:
    """The validation score that picks an epoch: ``select``, or accuracy where it is NaN (an
    AUC on a one-class validation fold)."""
    score = metrics[select]
    return metrics["accuracy"] if math.isnan(score) else score


@on_tensor_device  # the kernels launch on the data's GPU, which need not be the current one
def train_fold(volumes: torch.Tensor, labels: torch.Tensor, split: FoldSplit, cfg: TrainConfig,
               progress: Progress | None = None, score_test: bool = True) -> FoldResult:
    """Train on ``split.train``, keep the epoch best on ``split.val``, score ``split.test`` once
    (or not at all with ``score_test=False``, as the architecture search does).

    ``volumes`` (N, D, H, W) int16 HU and ``labels`` (N,) live on the training device.
    """
    started = time.perf_counter()
    device = volumes.device
    if cfg.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device; drop it on the CPU")
    kernels = resolve_kernels(cfg.kernels, device)
    # The csrc/ kernels read NCDHW maps: channels_last would add a copy before each of them.
    channels_last = False if kernels in NATIVE_KERNELS else cfg.channels_last
    train_format, _ = choose_format(cfg.arch, cfg.cbam, cfg.head, cfg.crop, cfg.batch_size,
                                    cfg.precision, channels_last, device, kernels)
    seed = cfg.seed * 1_000 + split.test_fold
    torch.manual_seed(seed)  # the format's timing drew numbers
    generator = torch.Generator(device=device).manual_seed(seed)
    memory_format = train_format.memory_format

    model = ConvRes(Arch.parse(cfg.arch), cbam=cfg.cbam, head=cfg.head)
    model = fuse_for(model, kernels)
    model = model.to(device=device, memory_format=memory_format)
    loss_fn = make_loss(model.head, cfg.margin)
    # A captured step reads the rate from a tensor, so the schedule can change it between replays.
    lr0 = torch.tensor(cfg.lr, device=device) if cfg.cuda_graphs else cfg.lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr0, betas=cfg.betas, capturable=cfg.cuda_graphs)
    step = TrainStep(model, loss_fn, optimizer, cuda_graphs=cfg.cuda_graphs,
                     autocast_dtype=train_format.autocast_dtype)
    train_idx = torch.from_numpy(split.train).to(device)
    normalisation = Normalisation.fit(volumes[train_idx], cfg.crop, *cfg.hu_window)
    make_batch = _batch_maker(volumes, normalisation, cfg, kernels, generator, seed)
    val_idx = torch.from_numpy(split.val).to(device)
    val_volumes, val_labels = volumes[val_idx], labels[val_idx].cpu().numpy()

    n_batches = math.ceil(len(train_idx) / cfg.batch_size)
    task = progress.add_task(f"fold {split.test_fold}", total=n_batches) if progress else None
    best_score, best_epoch, best_state, best_val = -math.inf, -1, None, {}
    history = []
    for epoch in range(cfg.epochs):
        if progress:
            progress.reset(task, total=n_batches,
                           description=f"fold {split.test_fold} epoch {epoch + 1}/{cfg.epochs}")
        lr = learning_rate(cfg.schedule, cfg.lr, epoch, cfg.epochs)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # capturable Adam: the graph reads it
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        model.train()
        loss_fn.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator, device=device)]
        loss_sum = torch.zeros((), device=device)
        for number, batch in enumerate(order.split(cfg.batch_size), start=epoch * n_batches):
            x = make_batch(batch, number).contiguous(memory_format=memory_format)
            loss = step(x, labels[batch])
            loss_sum += loss * len(batch)
            if progress:
                progress.advance(task)
        train_loss = loss_sum.item() / len(train_idx)
        val_prob = predict_proba(model, val_volumes, normalisation, cfg.crop,
                                 channels_last=train_format.channels_last)
        val_metrics = binary_metrics(val_labels, val_prob)
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss,
                        **{f"val_{k}": v for k, v in val_metrics.items() if k != "confusion"}})
        score = selection_score(val_metrics, cfg.select)
        if progress:
            progress.console.print(f"  fold {split.test_fold} epoch {epoch + 1}/{cfg.epochs}: "
                                   f"train loss {train_loss:.4f}, val {cfg.select} {score:.3f}")
        if score > best_score:
            best_score, best_epoch, best_val = score, epoch, val_metrics
            best_state = copy.deepcopy(model.state_dict())
        elif cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            break

    model.load_state_dict(best_state)
    test_prob, test_metrics = np.zeros(0), {}
    if score_test:
        test_idx = torch.from_numpy(split.test).to(device)
        test_prob = predict_proba(model, volumes[test_idx], normalisation, cfg.crop,
                                  channels_last=train_format.channels_last)
        test_metrics = binary_metrics(labels[test_idx].cpu().numpy(), test_prob)
    if progress:
        progress.remove_task(task)
    return FoldResult(model.to(memory_format=torch.contiguous_format), normalisation,
                      best_epoch, best_val, test_metrics, test_prob, history,
                      time.perf_counter() - started, train_format)
