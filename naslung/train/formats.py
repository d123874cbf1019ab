"""Numeric precision and memory layout of training, chosen by measuring on the machine at hand.

bf16 autocast keeps fp32 master weights (the optimizer and BatchNorm statistics stay fp32)
and runs convolutions in bfloat16. On CPUs with AVX512-BF16/AMX it and the channels_last_3d
layout are much faster than fp32 NCDHW, by amounts that depend on the arch and the CPU, so
``auto`` times a few forward and backward passes of each candidate on random data of the
run's shape once per process and picks the fastest. A CPU without bf16 support keeps fp32; on
a GPU ``auto`` means fp32 (the fused kernels' reference precision) and the contiguous layout.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from naslung.arch import Arch

PRECISIONS = ("auto", "fp32", "bf16")
TIMED_STEPS = 3


@dataclass(frozen=True)
class TrainFormat:
    """How a training step runs: its autocast precision and memory layout."""

    precision: str
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype a training step's forward pass autocasts to (None: plain fp32)."""
        return torch.bfloat16 if self.precision == "bf16" else None


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16, AMX); emulated bf16 is slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def candidate_formats(precision: str, channels_last: bool | None,
                      device: torch.device) -> list[TrainFormat]:
    """The formats ``auto`` choices leave open on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16 asked for, but this GPU has no bfloat16 support")
    if precision == "auto":
        precisions = ["fp32", "bf16"] if device.type == "cpu" and cpu_supports_bf16() else ["fp32"]
    else:
        precisions = [precision]
    layouts = [channels_last] if channels_last is not None else (
        [False, True] if device.type == "cpu" else [False])
    return [TrainFormat(p, c) for p in precisions for c in layouts]


def choose_format(arch: str, cbam: str, head: str, crop: int, batch_size: int, precision: str,
                  channels_last: bool | None, device: torch.device,
                  kernels: str = "torch") -> tuple[TrainFormat, dict[str, float]]:
    """The fastest candidate format on ``kernels`` and every candidate's measured seconds per step."""
    candidates = candidate_formats(precision, channels_last, device)
    if len(candidates) == 1:
        return candidates[0], {}
    timings = _timed_formats(arch, cbam, head, crop, batch_size, tuple(candidates), str(device), kernels)
    return min(candidates, key=lambda f: timings[_label(f)]), timings


def _label(fmt: TrainFormat) -> str:
    return f"{fmt.precision}{' channels_last_3d' if fmt.channels_last else ''}"


@functools.cache
def _timed_formats(arch: str, cbam: str, head: str, crop: int, batch_size: int,
                   candidates: tuple[TrainFormat, ...], device: str, kernels: str) -> dict[str, float]:
    """Median seconds of a forward and backward pass per format.

    The candidates take turns step by step, so a change in the machine's load while they are
    timed falls on all of them alike (one candidate timed after another let a busy spell pick
    the wrong one). The optimizer step is left out: it updates the same fp32 master weights in
    every format."""
    from naslung.models import ConvRes, make_loss
    from naslung.models.fused import fuse_for

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, crop, crop, crop, generator=generator).to(device)
    y = (torch.arange(batch_size) % 2).to(device)
    runs = []
    for fmt in candidates:
        model = fuse_for(ConvRes(Arch.parse(arch), cbam=cbam, head=head), kernels)
        model = model.to(device, memory_format=fmt.memory_format)
        runs.append((fmt, model, make_loss(model.head), x.contiguous(memory_format=fmt.memory_format)))
    seconds: dict[str, list[float]] = {_label(fmt): [] for fmt in candidates}
    for _ in range(TIMED_STEPS + 1):  # the first round warms up oneDNN's primitive cache
        for fmt, model, loss_fn, batch in runs:
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            with torch.autocast(batch.device.type, dtype=fmt.autocast_dtype,
                                enabled=fmt.autocast_dtype is not None):
                loss = loss_fn(model(batch), y)
            loss.backward()
            seconds[_label(fmt)].append(time.perf_counter() - started)
    return {label: sorted(s[1:])[len(s[1:]) // 2] for label, s in seconds.items()}
