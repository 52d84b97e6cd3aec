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
    """Train loader, test loader and :class:`DatasetInfo` of data set ``name``.

    Small sets are loaded into memory (:func:`load_split`), optionally cut to a
    seeded subset (train: ``subset_seed``, default ``seed``; test: the fixed
    :data:`TEST_SUBSET_SEED`),
    and served by :class:`TensorLoader`; ImageNet is streamed from
    ``data_dir`` through torchvision (``num_workers`` applies to it only).

    ``batch_size`` and ``test_batch_size`` (default: ``batch_size``) are per
    rank. The train loader drops its ragged tail when ``world_size > 1`` so all
    ranks take the same number of steps (distributed training would otherwise
    hang); the test loader never drops anything, so an evaluation that sums
    correct counts over ranks covers the test set exactly once.

    Args:
        name: registry name of the data set (see :data:`DATASETS`).
        data_dir: folder of the data set's files; required for ``"imagenet"``.
        batch_size: training batch size per rank.
        test_batch_size: evaluation batch size per rank (default: ``batch_size``).
        device: where the batches are delivered.
        seed: seed of the shuffling and augmentation.
        train_size: train on a seeded subset of this many examples (None: all).
        test_size: evaluate on a subset of this many examples (None: all).
        subset_seed: seed of the training subset (default: ``seed``).
        download: small data sets only: fetch missing files (see :func:`load_split`).
        rank: this process's index in ``0..world_size-1``.
        world_size: number of processes sharing the data.
        num_workers: decoding workers of the ImageNet loader.
        augment: the training augmentation, one of :data:`AUGMENTATIONS` (``"crop_flip"``: pad 4, random crop,
            random horizontal flip), instead of the data set's own (``info.augment``); None keeps the data set's.
            ImageNet's training transforms are fixed.

    Returns:
        ``(train_loader, test_loader, info)``; ``info.augment`` is the augmentation the train loader applies.

    Raises:
        ValueError: unknown ``name``, a subset size out of range, or invalid
            ``batch_size`` / ``rank`` / ``world_size``; ``augment`` not one of
            :data:`AUGMENTATIONS`, or given for ImageNet.
        DatasetNotFoundError: the files are missing (see :func:`load_split`), or
            ``name == "imagenet"`` without ``data_dir``.
        DatasetFormatError: a data file is corrupt, or the ImageNet folder has
            the wrong layout.
        ImportError: ImageNet without torchvision installed.

    Example:
        Ten training and four test images in the MNIST IDX format:

        >>> for s, n in (("train", 10), ("t10k", 4)):
        ...     _ = mq.data.write_idx(f"tiny-mnist/{s}-images-idx3-ubyte", torch.zeros(n, 28, 28, dtype=torch.uint8))
        ...     _ = mq.data.write_idx(f"tiny-mnist/{s}-labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8))
        >>> train, test, info = mq.data.make_loaders("mnist", data_dir="tiny-mnist", batch_size=4, train_size=8,
        ...                                          download=False)
        >>> info.name, train.num_examples, len(train), [y.tolist() for _, y in test]
        ('mnist', 8, 2, [[0, 1, 2, 3]])
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
    """The test loader of :func:`make_loaders` alone, and the :class:`DatasetInfo`: only the test split is
    read (ImageNet: only ``data_dir/val``), so a machine that evaluates a model needs no training data.

    The same ``test_size`` gives the same examples as in :func:`make_loaders` (the fixed
    :data:`TEST_SUBSET_SEED`), so an accuracy measured here is comparable with the one a run recorded.

    Args:
        name: registry name of the data set.
        data_dir: folder of the data set's files; required for ``"imagenet"``.
        batch_size: evaluation batch size per rank.
        device, seed, download, rank, world_size, num_workers: as for :func:`make_loaders`.
        test_size: evaluate on a subset of this many examples (None: all).

    Returns:
        ``(test_loader, info)``.

    Raises:
        ValueError: unknown ``name``, ``test_size`` out of range, or invalid ``batch_size`` / ``rank`` /
            ``world_size``.
        DatasetNotFoundError: the test files are missing, or ``name == "imagenet"`` without ``data_dir``.
        DatasetFormatError: a test file is corrupt, or ``data_dir/val`` has the wrong layout.
        ImportError: ImageNet without torchvision installed.

    Example:
        Only the test files exist:

        >>> _ = mq.data.write_idx("eval-only/t10k-images-idx3-ubyte", torch.zeros(5, 28, 28, dtype=torch.uint8))
        >>> _ = mq.data.write_idx("eval-only/t10k-labels-idx1-ubyte", torch.arange(5, dtype=torch.uint8))
        >>> test, info = mq.data.make_test_loader("mnist", data_dir="eval-only", batch_size=2, download=False)
        >>> [y.tolist() for _, y in test]
        [[0, 1], [2, 3], [4]]
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
            f"ImageNet cannot be downloaded automatically; pass data_dir (CLI: --data-dir) pointing at a folder "
            f"with {layout}"
        )
    return data_dir
