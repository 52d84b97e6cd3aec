"""ImageTensors validation and seeded subsets."""

from __future__ import annotations

import pytest
import torch

from metaquant.data.tensors import ImageTensors, subset


def data(n: int) -> ImageTensors:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageTensors(images=images, labels=torch.arange(n))


def test_subset_is_seeded_and_consistent():
    full = data(50)
    a, b, c = subset(full, 10, seed=1), subset(full, 10, seed=1), subset(full, 10, seed=2)
    assert torch.equal(a.labels, b.labels) and a.labels.tolist() != c.labels.tolist()
    assert len(set(a.labels.tolist())) == 10 and a.labels.tolist() == sorted(a.labels.tolist())
    # Images travel with their labels.
    assert a.images[:, 0, 0, 0].tolist() == a.labels.tolist()


def test_the_subset_of_a_seed_stays_the_same():
    # runs recorded with a train_size/test_size must be reproducible on the same examples
    assert subset(data(10), 4, seed=0).labels.tolist() == [1, 4, 5, 7]


def test_subset_none_and_full():
    full = data(5)
    assert subset(full, None, seed=0) is full
    assert sorted(subset(full, 5, seed=0).labels.tolist()) == list(range(5))


@pytest.mark.parametrize("size", [0, -1, 6])
def test_subset_bad_size(size):
    with pytest.raises(ValueError) as err:
        subset(data(5), size, seed=0)
    assert str(size) in str(err.value) and "1..5" in str(err.value)


def test_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensors(images=torch.zeros(2, 1, 2, 2), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        ImageTensors(images=torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageTensors(images=torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels=torch.zeros(3, dtype=torch.long))
