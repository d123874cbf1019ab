"""Batched augmentation: shapes, seeding, and that each op does exactly what it says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from naslung.data.augment import Augmenter, Normalisation, centre_crop, crop_at, pad_volumes

IDENTITY = Normalisation(-1e9, 1e9, 0.0, 1.0)


def volumes(n=4, side=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 400, (n, side, side, side), generator=g, dtype=torch.int16)


def test_crop_at_equals_slicing():
    v = volumes()
    starts = torch.tensor([[0, 1, 2], [8, 8, 8], [3, 0, 7], [5, 5, 0]])
    out = crop_at(v, starts, 32)
    for i, (a, b, c) in enumerate(starts.tolist()):
        assert torch.equal(out[i], v[i, a:a + 32, b:b + 32, c:c + 32])


def test_output_shape_dtype_and_seeding():
    v = volumes()
    aug = Augmenter(crop=32, shift=4, zero_out=4)
    norm = Normalisation.fit(v, 32)
    a = aug(v, norm, torch.Generator().manual_seed(7))
    b = aug(v, norm, torch.Generator().manual_seed(7))
    c = aug(v, norm, torch.Generator().manual_seed(8))
    assert a.shape == (4, 1, 32, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_augmentation_is_the_normalised_centre_crop():
    v = volumes()
    norm = Normalisation(-1000, 400, -300.0, 200.0)
    out = Augmenter(32, shift=0, flip=False, zero_out=0)(v, norm, torch.Generator())
    expected = (centre_crop(v, 32).float().clamp(-1000, 400) + 300) / 200
    assert torch.allclose(out[:, 0], expected)


def test_flips_are_axis_flips_of_the_centre_crop():
    v = volumes(n=16)
    out = Augmenter(32, shift=0, flip=True, zero_out=0)(v, IDENTITY, torch.Generator().manual_seed(1))
    centre = centre_crop(v, 32).float()
    seen = set()
    for i in range(16):
        matches = [axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r)
                   if torch.equal(out[i, 0], centre[i].flip([a - 1 for a in axes]) if axes else centre[i])]
        assert matches, f"sample {i} is not a flip of its crop"
        seen.add(matches[0])
    assert len(seen) > 2, "flips must vary across the batch"


def test_shift_stays_within_bounds():
    v = volumes(n=64)
    out = Augmenter(32, shift=4, flip=False, zero_out=0)(v, IDENTITY, torch.Generator().manual_seed(2))
    for i in range(64):
        found = any(torch.equal(out[i, 0], v[i, a:a + 32, b:b + 32, c:c + 32].float())
                    for a in range(9) for b in range(9) for c in range(9))
        assert found


def test_zero_out_clears_one_cube():
    v = torch.full((8, 32, 32, 32), 100, dtype=torch.int16)
    out = Augmenter(32, shift=0, flip=False, zero_out=4)(v, IDENTITY, torch.Generator().manual_seed(3))
    for i in range(8):
        zeros = (out[i, 0] == 0).nonzero()
        assert len(zeros) == 64
        assert (zeros.max(0).values - zeros.min(0).values).tolist() == [3, 3, 3]


def test_labels_follow_their_crops():
    """Augmentation is per sample and order-preserving: label i still belongs to crop i."""
    v = torch.stack([torch.full((40, 40, 40), value, dtype=torch.int16) for value in (-900, 0, 300)])
    out = Augmenter(32, shift=4, zero_out=0)(v, IDENTITY, torch.Generator().manual_seed(4))
    assert [float(out[i].max()) for i in range(3)] == [-900, 0, 300]


def test_normalisation_fit_standardises_training_crops():
    v = volumes(n=8)
    norm = Normalisation.fit(v, 32)
    x = norm(centre_crop(v, 32))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="empty"):
        Normalisation.fit(v[:0], 32)


def test_pad_volumes_pads_with_air():
    v = torch.zeros((2, 28, 28, 28), dtype=torch.int16)
    padded = pad_volumes(v, 40)
    assert padded.shape == (2, 40, 40, 40) and padded.dtype == torch.int16
    assert int(padded[0, 0, 0, 0]) == -1000 and int(padded[0, 20, 20, 20]) == 0
    assert pad_volumes(v, 20) is v
    assert np.array_equal(padded[:, 6:34, 6:34, 6:34].numpy(), v.numpy())
