"""Registry constants and lookup."""

from __future__ import annotations

import dataclasses

import pytest

from metaquant.data.registry import DATASETS, dataset_info


def test_names():
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet")


@pytest.mark.parametrize(
    "name, classes, channels, size, augment",
    [
        ("mnist", 10, 1, 28, "none"),
        ("fashion-mnist", 10, 1, 28, "none"),
        ("cifar10", 10, 3, 32, "crop_flip"),
        ("cifar100", 100, 3, 32, "crop_flip"),
        ("imagenet", 1000, 3, 224, "none"),
    ],
)
def test_info(name, classes, channels, size, augment):
    info = dataset_info(name)
    assert (info.name, info.num_classes, info.in_channels, info.image_size, info.augment) == (
        name,
        classes,
        channels,
        size,
        augment,
    )
    assert len(info.mean) == len(info.std) == channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


def test_constants():
    assert dataset_info("mnist").mean == (0.1307,) and dataset_info("mnist").std == (0.3081,)
    assert dataset_info("cifar100").std == (0.2673, 0.2564, 0.2762)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset_info("mnist").num_classes = 3  # type: ignore[misc]


def test_unknown_name():
    with pytest.raises(ValueError) as err:
        dataset_info("cifar-10")
    assert "'cifar-10'" in str(err.value) and "cifar10" in str(err.value) and "imagenet" in str(err.value)
