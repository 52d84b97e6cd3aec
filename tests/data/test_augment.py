"""Batch augmentations against slow per-image references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaquant.data.augment import crop_at, crop_offsets, flip_mask, hflip_where, random_crop, random_hflip


def reference_crop(x: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Explicit zero padding and slicing, one image at a time."""
    n, c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(n):
        padded = np.zeros((c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
        padded[:, padding : padding + h, padding : padding + w] = x[i]
        top, left = offsets[i]
        out[i] = padded[:, top : top + h, left : left + w]
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_matches_reference(dtype):
    x = (torch.rand(64, 3, 8, 10, generator=torch.Generator().manual_seed(0)) * 255).to(dtype)
    out = random_crop(x, 4, torch.Generator().manual_seed(42))
    offsets = crop_offsets(64, 4, torch.Generator().manual_seed(42))

    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    np.testing.assert_array_equal(out.numpy(), reference_crop(x.numpy(), 4, offsets.numpy()))
    # The draws really vary per image and cover the whole range.
    assert offsets.min() == 0 and offsets.max() == 8
    assert len({tuple(o) for o in offsets.tolist()}) > 20


def test_crop_at_known_offsets():
    x = torch.arange(1, 1 + 2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    out = crop_at(x, 1, torch.tensor([[0, 0], [2, 1]]))
    # Image 0 shifted down-right (zero row/column enter top-left); image 1 shifted up.
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert out[1, 0].tolist() == [[13, 14, 15], [16, 17, 18], [0, 0, 0]]


def test_crop_identity_at_center_and_zero_padding():
    x = torch.rand(5, 2, 6, 6)
    assert torch.equal(crop_at(x, 4, torch.full((5, 2), 4)), x)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(1)), x)


def test_crop_bad_offsets():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="0..8"):
        crop_at(x, 4, torch.tensor([[0, 9], [0, 0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        crop_at(x, 4, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        random_crop(torch.zeros(3, 4, 4), 1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_hflip_matches_reference(dtype):
    x = (torch.rand(64, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 255).to(dtype)
    out = random_hflip(x, torch.Generator().manual_seed(7))
    mask = flip_mask(64, torch.Generator().manual_seed(7))

    expected = x.numpy().copy()
    for i in range(64):
        if mask[i]:
            expected[i] = expected[i][:, :, ::-1]
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out.numpy(), expected)
    assert 10 < int(mask.sum()) < 54  # both outcomes happen


def test_hflip_where_explicit():
    x = torch.tensor([[[[1.0, 2.0, 3.0]]], [[[4.0, 5.0, 6.0]]]])
    out = hflip_where(x, torch.tensor([True, False]))
    assert out.tolist() == [[[[3.0, 2.0, 1.0]]], [[[4.0, 5.0, 6.0]]]]


def test_generator_seed_determines_result():
    x = torch.rand(32, 3, 8, 8)
    a = random_hflip(random_crop(x, 4, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(1))
    b = random_hflip(random_crop(x, 4, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(1))
    c = random_hflip(random_crop(x, 4, torch.Generator().manual_seed(2)), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_the_draws_of_a_seeded_generator_stay_the_same():
    # a run resumed or repeated with the same seed must augment as before
    assert crop_offsets(4, 2, torch.Generator().manual_seed(0)).tolist() == [[4, 4], [3, 0], [3, 4], [2, 3]]
    assert flip_mask(6, torch.Generator().manual_seed(0)).tolist() == [True, False, True, True, True, False]
    assert crop_offsets(3, 0).tolist() == [[0, 0]] * 3
