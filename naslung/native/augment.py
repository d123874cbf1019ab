"""A whole training batch in one kernel launch, on csrc/augment.cu.

`augment_batch` cuts every sample of a batch from the int16 crop store, shifts, flips, windows
and standardises it and zeroes a random cube, straight into the network's (N, 1, crop, crop,
crop) input: the semantics of `naslung.data.augment.Augmenter`, without its chain of
whole-batch tensor ops. Its random draws come from Philox4x32-10 keyed by the seed and counted
by (step, sample) (the mapping is in csrc/augment.h), so a batch is a pure function of its
arguments: the host library (CPU) and the CUDA library give the same bits, and no generator
state is carried between steps. `augment_draws` returns those draws, so that a plain PyTorch
rebuild of a batch can check it.
"""

from __future__ import annotations

import ctypes

import torch

from naslung.data.augment import Normalisation
from naslung.native.library import (
    DTYPES,
    F32,
    I64,
    INT,
    PTR,
    call,
    declare,
    device_kind,
    on_device_of,
    stream_of,
)

U64 = ctypes.c_ulonglong
"""The seed and step of the C ABI (unsigned 64-bit)."""

declare({
    "nl_augment_draws": (INT, [I64, I64, I64, I64, INT, INT, INT, INT, U64, U64, PTR, PTR]),
    "nl_augment_batch": (INT, [INT, PTR, I64, I64, I64, I64, PTR, I64, INT, INT, INT, INT, F32, F32, F32, F32,
                               U64, U64, PTR, PTR]),
    "nl_philox4x32_10_host": (INT, [PTR, PTR, PTR]),
})

_SEED_LIMIT = 2**63  # seed and step travel through torch.library's int, a signed 64-bit integer


def _check_sizes(volumes: torch.Tensor, crop: int, shift: int, zero_out: int, seed: int, step: int) -> None:
    """Refuse what the kernels would refuse, with a message that says what is wrong."""
    if volumes.dtype != torch.int16 or volumes.dim() != 4:
        raise ValueError(f"the crop store must be an (N, D, H, W) int16 tensor, not {volumes.dtype} "
                         f"of shape {tuple(volumes.shape)}")
    if not volumes.is_contiguous():
        raise ValueError("the crop store must be contiguous (it is read in place, never copied)")
    if len(volumes) == 0:
        raise ValueError("the crop store is empty")
    if crop < 1 or min(volumes.shape[1:]) < crop:
        raise ValueError(f"crops of {tuple(volumes.shape[1:])} are smaller than {crop}^3")
    if shift < 0 or not 0 <= zero_out <= crop:
        raise ValueError(f"shift {shift} must be >= 0 and zero_out {zero_out} in [0, crop {crop}]")
    for name, value in (("seed", seed), ("step", step)):
        if not 0 <= value < _SEED_LIMIT:
            raise ValueError(f"{name} {value} must be in [0, 2^63)")


@torch.library.custom_op("naslung::augment_batch", mutates_args=())
def augment_batch_op(volumes: torch.Tensor, indices: torch.Tensor, crop: int, shift: int, flip: bool,
                     zero_out: int, hu_min: float, hu_max: float, mean: float, std: float, seed: int,
                     step: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernel launch behind `augment_batch`, which checks the sizes first; the index check
    is here, inside the op, where torch.compile does not trace it."""
    if indices.device.type == "cpu" and len(indices):
        bad = indices[(indices < 0) | (indices >= len(volumes))]
        if len(bad):
            raise IndexError(f"batch index {bad[0].item()} is outside the store of {len(volumes)} crops")
    out = torch.empty((len(indices), 1, crop, crop, crop), device=volumes.device, dtype=dtype)
    with on_device_of(volumes):
        call(device_kind(volumes), "nl_augment_batch", DTYPES[dtype], volumes.data_ptr(), *volumes.shape,
             indices.data_ptr(), len(indices), crop, shift, int(flip), zero_out, hu_min, hu_max, mean, std,
             seed, step, out.data_ptr(), stream_of(volumes))
    return out


@augment_batch_op.register_fake
def _(volumes, indices, crop, shift, flip, zero_out, hu_min, hu_max, mean, std, seed, step, dtype):
    return volumes.new_empty((indices.shape[0], 1, crop, crop, crop), dtype=dtype)


def augment_batch(volumes: torch.Tensor, indices: torch.Tensor, crop: int, shift: int, flip: bool,
                  zero_out: int, normalisation: Normalisation | tuple[float, float, float, float], seed: int,
                  step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The augmented, normalised batch (len(indices), 1, crop, crop, crop) of the store's
    crops ``volumes`` (N, D, H, W) int16 at ``indices``, in fp32 or bf16, on the store's
    device. The same (seed, step) gives the same batch on every device.

    On the CPU an index outside the store raises IndexError; on a GPU checking would wait for
    the stream, so that sample comes out NaN instead (never read outside the store).
    """
    _check_sizes(volumes, crop, shift, zero_out, seed, step)
    if dtype not in DTYPES:
        raise ValueError(f"the batch is fp32 or bf16, not {dtype}")
    if not isinstance(normalisation, Normalisation):
        normalisation = Normalisation(*normalisation)
    if not normalisation.std > 0:
        raise ValueError(f"the normalisation's std must be positive, not {normalisation.std}")
    indices = indices.to(device=volumes.device, dtype=torch.int64).contiguous()
    if indices.dim() != 1:
        raise ValueError(f"indices must be one-dimensional, not of shape {tuple(indices.shape)}")
    return augment_batch_op(volumes, indices, crop, shift, bool(flip), zero_out, normalisation.hu_min,
                            normalisation.hu_max, normalisation.mean, normalisation.std, seed, step, dtype)


def augment_draws(volumes: torch.Tensor, batch: int, crop: int, shift: int, flip: bool, zero_out: int,
                  seed: int, step: int) -> dict[str, torch.Tensor]:
    """The random draws `augment_batch` makes for a batch of ``batch`` samples with the same
    arguments, each (batch, 3) int32 on the store's device, axes z, y, x: ``starts`` (the
    crop's corner in its volume, after clamping), ``flips`` (0 or 1) and ``corners`` (the
    zeroed cube's corner in the crop; 0 when ``zero_out`` is 0)."""
    _check_sizes(volumes, crop, shift, zero_out, seed, step)
    if batch < 0:
        raise ValueError(f"batch {batch} must be >= 0")
    draws = torch.empty((batch, 9), device=volumes.device, dtype=torch.int32)
    with on_device_of(volumes):
        call(device_kind(volumes), "nl_augment_draws", *volumes.shape[1:], batch, crop, shift, int(flip),
             zero_out, seed, step, draws.data_ptr(), stream_of(volumes))
    return {"starts": draws[:, 0:3], "flips": draws[:, 3:6], "corners": draws[:, 6:9]}
