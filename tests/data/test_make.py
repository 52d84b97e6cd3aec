"""make_loaders on small data sets written in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaquant.data import splits
from metaquant.data.errors import DatasetNotFoundError
from metaquant.data.loader import TensorLoader
from metaquant.data.make import make_loaders, make_test_loader

from .formats import make_cifar, write_cifar_archive, write_idx


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(splits, "CACHE_ROOT", tmp_path / "cache")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 40)):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=True
        )
        # Label = index mod 10 lets the test recognise examples.
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10, gz=True)
    return tmp_path


def test_small_set(mnist_dir):
    train, test, info = make_loaders("mnist", data_dir=mnist_dir, batch_size=16, test_batch_size=25, download=False)
    assert info.name == "mnist" and isinstance(train, TensorLoader) and isinstance(test, TensorLoader)
    assert (len(train), len(test)) == (4, 2)
    assert train.train and not test.train
    x, y = next(iter(test))
    assert tuple(x.shape) == (25, 1, 28, 28) and y.tolist() == [i % 10 for i in range(25)]


def test_subsets(mnist_dir):
    def test_images(seed, train_size):
        train, test, _ = make_loaders(
            "mnist", data_dir=mnist_dir, batch_size=8, seed=seed, train_size=train_size, test_size=15, download=False
        )
        assert sum(len(y) for _, y in train) == train_size
        return torch.cat([x for x, _ in test]), torch.cat([x for x, _ in train])

    test_a, train_a = test_images(0, 20)
    test_b, train_b = test_images(1, 20)
    assert len(test_a) == 15
    # The test subset is the same whatever the training seed; the train subset is not.
    assert torch.equal(test_a, test_b)
    assert not torch.equal(train_a.sort(0).values, train_b.sort(0).values)
    with pytest.raises(ValueError, match="1..60"):
        make_loaders("mnist", data_dir=mnist_dir, train_size=61, download=False)


def test_distributed_train_drops_tail(mnist_dir):
    loaders = [
        make_loaders("mnist", data_dir=mnist_dir, batch_size=7, rank=r, world_size=2, download=False) for r in range(2)
    ]
    # 60 train examples → 30 per rank → 4 full batches of 7 on both ranks.
    assert [len(train) for train, _, _ in loaders] == [4, 4]
    # Test: 40 examples → 20 per rank, nothing dropped.
    assert [sum(len(y) for _, y in test) for _, test, _ in loaders] == [20, 20]


def test_cifar(tmp_path):
    write_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100", make_cifar("cifar100", 6, seed=0))
    train, test, info = make_loaders("cifar100", data_dir=tmp_path, batch_size=4, download=False)
    assert info.num_classes == 100 and train.augment and not test.augment
    assert [tuple(x.shape) for x, _ in train] == [(4, 3, 32, 32), (2, 3, 32, 32)]


def test_imagenet_needs_data_dir():
    with pytest.raises(DatasetNotFoundError, match="`data_dir`"):
        make_loaders("imagenet")


def test_unknown_name():
    with pytest.raises(ValueError, match="'mnist2'"):
        make_loaders("mnist2")


def test_subset_seed_fixes_the_training_subset_across_seeds(mnist_dir):
    def train_images(seed):
        train, _, _ = make_loaders(
            "mnist", data_dir=mnist_dir, batch_size=8, seed=seed, train_size=20, subset_seed=3, download=False
        )
        return torch.cat([x for x, _ in train]).sort(0).values

    assert torch.equal(train_images(0), train_images(1))


@pytest.mark.parametrize("rank", [0, 1])
def test_the_test_loader_alone_serves_the_same_batches_without_the_training_files(mnist_dir, rank):
    kwargs = dict(data_dir=mnist_dir, seed=3, test_size=13, download=False, rank=rank, world_size=2)
    _, expected, _ = make_loaders("mnist", batch_size=8, test_batch_size=4, **kwargs)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (mnist_dir / name).unlink()
    test, info = make_test_loader("mnist", batch_size=4, **kwargs)
    assert info.name == "mnist" and len(test) == len(expected)
    for (x, y), (x0, y0) in zip(test, expected, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    with pytest.raises(DatasetNotFoundError):
        make_loaders("mnist", batch_size=8, **kwargs)


def test_augment_replaces_the_data_sets_own_augmentation(mnist_dir):
    """MNIST's own is none; crop_flip turns it on for the train loader only, and none turns it off again."""

    def batches(augment):
        train, test, info = make_loaders(
            "mnist", data_dir=mnist_dir, batch_size=60, seed=3, download=False, augment=augment
        )
        train.set_epoch(0)
        return next(iter(train))[0], torch.cat([x for x, _ in test]), info

    plain, test_plain, info_plain = batches(None)
    off, test_off, info_off = batches("none")
    on, test_on, info_on = batches("crop_flip")
    assert (info_plain.augment, info_off.augment, info_on.augment) == ("none", "none", "crop_flip")
    assert torch.equal(plain, off) and torch.equal(test_plain, test_on)  # the test loader never augments
    assert not torch.equal(plain, on)
    # every augmented image is a padded crop (and maybe a flip) of its un-augmented self
    background = (0 - info_on.mean[0]) / info_on.std[0]  # zero padding of the [0, 1] image, normalised
    for a, b in zip(on, plain):
        padded = torch.nn.functional.pad(b, (4, 4, 4, 4), value=background)
        candidates = [padded[:, i : i + 28, j : j + 28] for i in range(9) for j in range(9)]
        assert any(torch.equal(a, c) or torch.equal(a, c.flip(-1)) for c in candidates)
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'; allowed: none, crop_flip"):
        make_loaders("mnist", data_dir=mnist_dir, download=False, augment="mixup")
    with pytest.raises(ValueError, match="ImageNet's training transforms are fixed"):
        make_loaders("imagenet", data_dir=mnist_dir, download=False, augment="none")
