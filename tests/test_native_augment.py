"""csrc/augment.cu: Philox4x32-10 against its published answers, the draws against their
documented mapping, and every batch against a plain PyTorch rebuild from its draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naslung.data.augment import Normalisation, crop_at
from naslung.native.augment import augment_batch, augment_batch_op, augment_draws
from naslung.native.library import NativeLibraryError, available, call, library_path

pytestmark = pytest.mark.skipif(library_path("host") is None,
                                reason="the host kernel library is not built (pip install -e . builds csrc/)")

NORMALISATION = Normalisation(hu_min=-1000.0, hu_max=400.0, mean=-612.25, std=351.5)


def philox(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 of the host library."""
    counter_words, key_words = np.array(counter, np.uint32), np.array(key, np.uint32)
    out = np.zeros(4, np.uint32)
    call("host", "nl_philox4x32_10_host", counter_words.ctypes.data, key_words.ctypes.data, out.ctypes.data)
    return [int(word) for word in out]


# Random123's kat_vectors for philox4x32 with 10 rounds: counter, key, answer.
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize(("counter", "key", "answer"), KNOWN_ANSWERS)
def test_philox_gives_the_published_answers(counter, key, answer):
    assert philox(counter, key) == answer


def store(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Random HU on both sides of the window."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2000, 2000, (n, *shape), generator=generator, dtype=torch.int16)


def reference_batch(volumes: torch.Tensor, indices: torch.Tensor, crop: int, zero_out: int,
                    normalisation: Normalisation, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch rebuilt from its draws with whole-batch tensor ops, as `Augmenter` does."""
    x = normalisation(crop_at(volumes[indices], draws["starts"].long(), crop))
    for axis in range(3):
        flip = draws["flips"][:, axis].bool()
        x = torch.where(flip[:, None, None, None], x.flip(axis + 1), x)
    if zero_out:
        steps = torch.arange(crop)
        corner = draws["corners"].long()
        inside = [(steps >= corner[:, a, None]) & (steps < corner[:, a, None] + zero_out) for a in range(3)]
        cube = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
        x = x.masked_fill(cube, 0.0)
    return x.unsqueeze(1)


# (store size, store shape, batch indices, crop, shift, flip, zero_out)
CASES = {
    "48-cubed": (6, (48, 48, 48), [0, 5, 2, 2, 1, 3, 4, 0], 32, 4, True, 4),
    "non-cubic-odd-batch": (5, (40, 36, 45), [4, 0, 3, 1, 2, 2, 0], 32, 6, True, 8),
    "crop-equals-side": (3, (32, 33, 32), [2], 32, 4, True, 4),
    "all-off": (4, (40, 40, 40), [3, 2, 1, 0, 0, 1, 2, 3], 32, 0, False, 0),
    "whole-crop-zeroed": (3, (20, 21, 22), [1, 2, 0], 8, 3, True, 8),
}
SEEDS = [(0, 0), (12345, 7), (2**40 + 3, 2**33 + 1)]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize(("seed", "step"), SEEDS)
def test_batch_equals_the_reference_rebuilt_from_its_draws(case, seed, step):
    n, shape, batch, crop, shift, flip, zero_out = case
    volumes, indices = store(n, shape, seed=n), torch.tensor(batch)
    draws = augment_draws(volumes, len(indices), crop, shift, flip, zero_out, seed, step)
    expected = reference_batch(volumes, indices, crop, zero_out, NORMALISATION, draws)
    fp32 = augment_batch(volumes, indices, crop, shift, flip, zero_out, NORMALISATION, seed, step)
    assert fp32.shape == (len(batch), 1, crop, crop, crop) and fp32.dtype == torch.float32
    assert torch.equal(fp32, expected)
    bf16 = augment_batch(volumes, indices, crop, shift, flip, zero_out, NORMALISATION, seed, step,
                         dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, expected.to(torch.bfloat16))  # one rounding to nearest even, as torch's
    again = augment_batch(volumes, indices, crop, shift, flip, zero_out, NORMALISATION, seed, step)
    assert torch.equal(again.view(torch.int32), fp32.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_op_passes_torch_library_checks(dtype):
    """Schema, fake (meta) implementation and dispatch of naslung::augment_batch."""
    volumes, indices = store(3, (10, 11, 12)), torch.tensor([2, 0])
    torch.library.opcheck(augment_batch_op, (volumes, indices, 8, 2, True, 3, -1000.0, 400.0, -600.0, 350.0,
                                             5, 6, dtype))


def test_draws_follow_the_documented_mapping():
    """csrc/augment.h: two Philox calls per sample, each draw from its own 32-bit word."""
    volumes, crop, shift, zero_out = store(1, (40, 37, 50)), 32, 5, 6
    seed, step = 2**35 + 11, 2**32 + 9
    draws = augment_draws(volumes, 5, crop, shift, True, zero_out, seed, step)
    key = [seed % 2**32, seed >> 32]
    for sample in range(5):
        placement = philox([step % 2**32, step >> 32, sample, 0], key)
        cube = philox([step % 2**32, step >> 32, sample, 1], key)
        for axis, side in enumerate(volumes.shape[1:]):
            room = side - crop
            offset = placement[axis] * (2 * shift + 1) // 2**32 - shift
            assert draws["starts"][sample, axis] == min(max(room // 2 + offset, 0), room)
            assert draws["flips"][sample, axis] == (placement[3] >> axis) & 1
            assert draws["corners"][sample, axis] == cube[axis] * (crop - zero_out + 1) // 2**32


def test_steps_and_seeds_give_different_draws_and_switches_are_independent():
    volumes = store(1, (48, 48, 48))
    base = augment_draws(volumes, 16, 32, 4, True, 4, seed=3, step=10)
    for other in (augment_draws(volumes, 16, 32, 4, True, 4, seed=3, step=11),
                  augment_draws(volumes, 16, 32, 4, True, 4, seed=4, step=10)):
        for name in ("starts", "flips", "corners"):
            assert not torch.equal(base[name], other[name]), name
    assert len({tuple(row) for row in base["starts"].tolist()}) > 1  # samples differ within a batch
    no_flip = augment_draws(volumes, 16, 32, 4, False, 4, seed=3, step=10)
    assert torch.equal(no_flip["starts"], base["starts"]) and torch.equal(no_flip["corners"], base["corners"])
    assert not no_flip["flips"].any()
    no_cube = augment_draws(volumes, 16, 32, 4, True, 0, seed=3, step=10)
    assert torch.equal(no_cube["starts"], base["starts"]) and torch.equal(no_cube["flips"], base["flips"])
    assert not no_cube["corners"].any()


def test_draw_statistics():
    """Over many samples: fair flips, every offset in [-shift, shift] and every corner in
    [0, crop - zero_out] about equally often."""
    samples, crop, shift, zero_out = 6000, 32, 4, 4
    draws = augment_draws(store(1, (48, 48, 48)), samples, crop, shift, True, zero_out, seed=99, step=1)
    flips = draws["flips"].double().mean(0)
    assert ((flips - 0.5).abs() < 0.03).all(), flips
    offsets = draws["starts"] - (48 - crop) // 2
    for values, low, high in ((offsets, -shift, shift), (draws["corners"], 0, crop - zero_out)):
        for axis in range(3):
            counts = torch.bincount(values[:, axis].long() - low, minlength=high - low + 1)
            assert len(counts) == high - low + 1, "a draw outside its range"
            expected = samples / (high - low + 1)
            assert (counts > 0.7 * expected).all() and (counts < 1.3 * expected).all(), counts


def test_bad_arguments_give_clear_errors():
    volumes = store(3, (40, 40, 40))
    args = (32, 4, True, 4, NORMALISATION, 0, 0)
    with pytest.raises(IndexError, match="batch index 3 is outside the store of 3 crops"):
        augment_batch(volumes, torch.tensor([0, 3]), *args)
    with pytest.raises(IndexError, match="batch index -1"):
        augment_batch(volumes, torch.tensor([-1]), *args)
    with pytest.raises(ValueError, match=r"crops of \(40, 40, 40\) are smaller than 41\^3"):
        augment_batch(volumes, torch.tensor([0]), 41, 4, True, 4, NORMALISATION, 0, 0)
    with pytest.raises(ValueError, match="zero_out 33"):
        augment_draws(volumes, 1, 32, 4, True, 33, 0, 0)
    with pytest.raises(ValueError, match="seed -1"):
        augment_batch(volumes, torch.tensor([0]), 32, 4, True, 4, NORMALISATION, -1, 0)


def test_the_library_refuses_a_bad_index_before_writing():
    """The C ABI's own check (the host build reads host indices before any work)."""
    volumes, indices = store(2, (34, 34, 34)), torch.tensor([1, 2])
    out = torch.full((2, 1, 32, 32, 32), 7.0)
    with pytest.raises(NativeLibraryError, match="nl_augment_batch failed: bad arguments"):
        call("host", "nl_augment_batch", 0, volumes.data_ptr(), *volumes.shape, indices.data_ptr(),
             len(indices), 32, 1, 1, 4, -1000.0, 400.0, 0.0, 1.0, 0, 0, out.data_ptr(), None)
    assert (out == 7.0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not available("cuda"),
                    reason="needs a CUDA GPU and the CUDA kernel library")
def test_the_cuda_build_gives_the_host_builds_bits():
    volumes, indices = store(7, (48, 44, 50)), torch.tensor([6, 0, 3, 3, 1, 5, 2, 4, 0])
    args = (32, 4, True, 4, NORMALISATION, 2**34 + 5, 123)
    gpu_volumes, gpu_indices = volumes.cuda(), indices.cuda()
    host_draws, gpu_draws = augment_draws(volumes, 9, 32, 4, True, 4, 2**34 + 5, 123), augment_draws(
        gpu_volumes, 9, 32, 4, True, 4, 2**34 + 5, 123)
    for name, draw in host_draws.items():
        assert torch.equal(gpu_draws[name].cpu(), draw), name
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        host = augment_batch(volumes, indices, *args, dtype=dtype)
        gpu = augment_batch(gpu_volumes, gpu_indices, *args, dtype=dtype).cpu()
        assert torch.equal(gpu.view(bits), host.view(bits)), dtype
    # A bad index on the GPU: that sample is NaN, the others are untouched.
    gpu = augment_batch(gpu_volumes, torch.tensor([1, 7], device="cuda"), *args).cpu()
    assert torch.isnan(gpu[1]).all()
    assert torch.equal(gpu[0], augment_batch(volumes, torch.tensor([1]), *args)[0])
