"""One call from a data set name to train and test loaders (:func:`make_loaders`), or to the test loader
alone for evaluation (:func:`make_test_loader`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .errors import DatasetNotFoundError
from .imagenet import imagenet_loaders, imagenet_val_loader
from .loader import BatchLoader, TensorLoader
from .registry import AUGMENTATIONS, DatasetInfo, dataset_info
from .splits import load_split
from .tensors import subset

__all__ = ["TEST_SUBSET_SEED", "make_loaders", "make_test_loader"]

# The test subset does not depend on the training seed, so runs with different
# seeds (and different train subsets) are evaluated on the same examples and
# their accuracies are comparable.
TEST_SUBSET_SEED = 0x7E57


def make_loaders(
    name: str,
    *,
    data_dir: str | Path | None = None,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    subset_seed: int | None = None,
    download: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    augment: str | None = None,
) -> tuple[BatchLoader, BatchLoader, DatasetInfo]:
    """Train loader, test loader and :class:`DatasetInfo` of data set ``name`` (see :data:`DATASETS`).

    Small sets are loaded into memory (:func:`load_split`), cut to seeded subsets if asked (train:
    ``subset_seed``, default ``seed``; test: the fixed :data:`TEST_SUBSET_SEED`) and served by
    :class:`TensorLoader`; ImageNet is streamed from ``data_dir`` (required) through torchvision, with
    ``num_workers``. Batch sizes are per rank (``test_batch_size`` defaults to ``batch_size``). With
    ``world_size > 1`` the train loader drops its ragged tail so all ranks take the same number of steps; the
    test loader never drops, so summed counts cover the test set once. ``augment`` (one of
    :data:`AUGMENTATIONS`) replaces the data set's own training augmentation; the returned ``info.augment`` is
    the one applied.

    Raises:
        ValueError: unknown ``name``, a subset size out of range, invalid ``batch_size``/``rank``/``world_size``,
            or an unknown ``augment`` or one given for ImageNet.
        DatasetNotFoundError: missing files (see :func:`load_split`), or ImageNet without ``data_dir``.
        DatasetFormatError: a corrupt data file, or an ImageNet folder of the wrong layout.
        ImportError: ImageNet without torchvision installed.
    """
    info = dataset_info(name)
    if augment is not None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
        if name == "imagenet":
            raise ValueError(
                "ImageNet's training transforms are fixed (random resized crop and flip): leave augment unset"
            )
        info = dataclasses.replace(info, augment=augment)
    test_batch_size = batch_size if test_batch_size is None else test_batch_size
    drop_last = world_size > 1
    train: BatchLoader
    test: BatchLoader
    if name == "imagenet":
        train, test = imagenet_loaders(
            _imagenet_dir(data_dir, "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"),
            batch_size=batch_size,
            test_batch_size=test_batch_size,
            device=device,
            seed=seed,
            test_seed=TEST_SUBSET_SEED,
            train_size=train_size,
            test_size=test_size,
            subset_seed=subset_seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
        )
        return train, test, info

    train_subset_seed = seed if subset_seed is None else subset_seed
    train_data = subset(load_split(name, "train", data_dir, download), train_size, train_subset_seed)
    train = TensorLoader(
        train_data,
        info,
        batch_size,
        train=True,
        drop_last=drop_last,
        device=device,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    test, _ = make_test_loader(
        name,
        data_dir=data_dir,
        batch_size=test_batch_size,
        device=device,
        seed=seed,
        test_size=test_size,
        download=download,
        rank=rank,
        world_size=world_size,
    )
    return train, test, info


def make_test_loader(
    name: str,
    *,
    data_dir: str | Path | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    test_size: int | None = None,
    download: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
) -> tuple[BatchLoader, DatasetInfo]:
    """The test loader of :func:`make_loaders` alone, and the :class:`DatasetInfo`: only the test split is read
    (ImageNet: ``data_dir/val``), so a machine that only evaluates needs no training data.

    The same ``test_size`` gives the same examples as in :func:`make_loaders` (:data:`TEST_SUBSET_SEED`), so an
    accuracy measured here is comparable with the one a run recorded. Raises as :func:`make_loaders`.
    """
    info = dataset_info(name)
    if name == "imagenet":
        test = imagenet_val_loader(
            _imagenet_dir(data_dir, "val/<wnid>/*.JPEG"),
            batch_size=batch_size,
            device=device,
            seed=seed,
            test_seed=TEST_SUBSET_SEED,
            test_size=test_size,
            num_classes=info.num_classes,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
        )
        return test, info
    test_data = subset(load_split(name, "test", data_dir, download), test_size, TEST_SUBSET_SEED)
    return TensorLoader(
        test_data, info, batch_size, train=False, device=device, seed=seed, rank=rank, world_size=world_size
    ), info


def _imagenet_dir(data_dir: str | Path | None, layout: str) -> str | Path:
    """``data_dir``, which ImageNet needs: it cannot be downloaded."""
    if data_dir is None:
        raise DatasetNotFoundError(
            f"ImageNet cannot be downloaded automatically; pass `data_dir` pointing at a folder with {layout}"
        )
    return data_dir
