"""ImageNet (ILSVRC-2012) from an ImageFolder layout, streamed through torchvision.

ImageNet does not fit in memory, so a worker pool (torch DataLoader + torchvision transforms) decodes and
augments it and only finished batches move to the device. Expected layout::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG      # validation images sorted into class folders

torchvision (optional, the ``vision`` extra: ``pip install torchvision``) is imported only when a loader is built,
after the layout is checked. Epoch order and sharding come from :mod:`metaquant.data.sampling`; the workers
are seeded from (seed, epoch, rank, worker id), so an epoch is reproducible with ``num_workers > 0`` (with 0
the transforms draw from the main process's global generator).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..validation import check_int
from .errors import DatasetFormatError, DatasetNotFoundError
from .registry import dataset_info
from .sampling import batches_per_rank, check_batching, epoch_seed, shard_indices
from .tensors import subset_indices

__all__ = ["ImageFolderLoader", "check_imagenet_layout", "imagenet_loaders", "imagenet_val_loader"]

logger = logging.getLogger(__name__)

_LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG"
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def check_imagenet_layout(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check that ``root`` has the ImageFolder layout for ``splits``; the sorted class names (index = position).

    Only folders are inspected (every sub-directory of a split is a class, as in ImageFolder): no torchvision, no
    image read.

    Raises:
        DatasetNotFoundError: ``root`` or a split folder is missing.
        DatasetFormatError: a split has no class folders, or train and val classes differ.
    """
    if not splits or not set(splits) <= {"train", "val"}:
        raise ValueError(f"splits {splits!r}: expected ('train', 'val'), ('train',) or ('val',)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"ImageNet root {root} is not a directory; expected {_LAYOUT}")
    classes: dict[str, list[str]] = {}
    for split in splits:
        directory = root / split
        if not directory.is_dir():
            raise DatasetNotFoundError(f"ImageNet folder {directory} is missing; expected {_LAYOUT}")
        # Same rule as torchvision's ImageFolder: every sub-directory is a class.
        names = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
        if not names:
            loose = any(p.suffix.lower() in _IMAGE_SUFFIXES for p in directory.iterdir())
            hint = (
                "; it holds images directly: sort them into one folder per class (wnid), e.g. with "
                "the valprep.sh script of the ILSVRC-2012 devkit"
                if loose
                else ""
            )
            raise DatasetFormatError(f"ImageNet folder {directory} has no class folders{hint}; expected {_LAYOUT}")
        classes[split] = names
    if len(classes) == 2 and classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DatasetFormatError(
            f"ImageNet train and val class folders under {root} differ: only in train: "
            f"{only_train[:5]}{'...' if len(only_train) > 5 else ''} ({len(only_train)}), only in val: "
            f"{only_val[:5]}{'...' if len(only_val) > 5 else ''} ({len(only_val)})"
        )
    return classes[splits[0]]


def _import_torchvision() -> tuple[ModuleType, ModuleType]:
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError(
            "ImageNet loading needs torchvision (the vision extra), which is not installed: pip install torchvision"
        ) from exc
    return datasets, transforms


def _seed_worker(seed: int, epoch: int, rank: int, worker_id: int) -> None:
    # Seed everything a transform might draw from, per (seed, epoch, rank, worker).
    s = epoch_seed(seed, epoch, f"augment/rank{rank}/worker{worker_id}")
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


class ImageFolderLoader:
    """Batches of a map-style data set of ``(image, label)`` (e.g. an ``ImageFolder``) on ``device``; the
    ``BatchLoader`` interface of ``TensorLoader``.

    Shuffles (``train=True``) and shards across ``world_size`` processes like ``TensorLoader``; a fresh
    DataLoader per epoch makes the workers' seeds depend only on ``(seed, epoch, rank)``.

    Raises:
        ValueError: ``batch_size < 1``, ``rank`` not in ``0..world_size-1``, or ``num_workers < 0``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        check_batching(batch_size, rank, world_size)
        check_int("num_workers", num_workers, minimum=0)
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    def _indices(self) -> list[int]:
        return shard_indices(
            len(self.dataset),
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.train,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        ).tolist()

    def __len__(self) -> int:
        return batches_per_rank(
            len(self.dataset), self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._indices(),
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=functools.partial(_seed_worker, self.seed, self.epoch, self.rank),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def imagenet_loaders(
    root: str | Path,
    *,
    batch_size: int,
    test_batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    test_seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    subset_seed: int | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
) -> tuple[ImageFolderLoader, ImageFolderLoader]:
    """Train and validation loaders for ImageNet in ImageFolder layout under ``root``.

    Train: RandomResizedCrop(224) + horizontal flip; eval: Resize(256) + CenterCrop(224); both normalised with the
    ImageNet mean/std. ``train_size``/``test_size`` pick seeded subsets (seeds ``subset_seed``, default ``seed``,
    and ``test_seed``).

    Raises:
        DatasetNotFoundError, DatasetFormatError: wrong layout (checked before torchvision is imported).
        ImportError: torchvision is not installed.
        ValueError: a subset size out of range, or invalid ``batch_size``/``rank``/``world_size``/``num_workers``.
    """
    check_imagenet_layout(root)
    common: dict[str, Any] = dict(device=device, rank=rank, world_size=world_size, num_workers=num_workers)
    train_subset_seed = seed if subset_seed is None else subset_seed
    train = _split_loader(
        root,
        "train",
        batch_size,
        seed=seed,
        subset_seed=train_subset_seed,
        size=train_size,
        drop_last=drop_last,
        **common,
    )
    test = _split_loader(root, "val", test_batch_size, seed=seed, subset_seed=test_seed, size=test_size, **common)
    return train, test


def imagenet_val_loader(
    root: str | Path,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    test_seed: int = 0,
    test_size: int | None = None,
    num_classes: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
) -> ImageFolderLoader:
    """The validation loader of :func:`imagenet_loaders` alone: only ``root/val`` is read.

    A class's index is its folder's position among the sorted folders of ``val/``, so a missing folder would
    shift every later label; ``num_classes`` (the model's output size) guards against that.

    Raises:
        DatasetNotFoundError, DatasetFormatError: ``root/val`` is missing, has no class folders, or not
            ``num_classes`` of them.
        ImportError: torchvision is not installed.
    """
    classes = check_imagenet_layout(root, splits=("val",))
    if num_classes is not None and len(classes) != num_classes:
        raise DatasetFormatError(
            f"ImageNet folder {Path(root) / 'val'} holds {len(classes)} class folders, expected {num_classes}: "
            "a missing class would shift the labels of every class after it"
        )
    return _split_loader(
        root,
        "val",
        batch_size,
        device=device,
        seed=seed,
        subset_seed=test_seed,
        size=test_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )


def _split_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    *,
    device: torch.device | str,
    seed: int,
    subset_seed: int,
    size: int | None,
    rank: int,
    world_size: int,
    num_workers: int,
    drop_last: bool = False,
) -> ImageFolderLoader:
    """One split's loader; ``train`` augments (RandomResizedCrop + flip), ``val`` resizes and center-crops."""
    datasets, transforms = _import_torchvision()
    info = dataset_info("imagenet")
    normalize = transforms.Normalize(mean=info.mean, std=info.std)
    if split == "train":
        augment = [transforms.RandomResizedCrop(info.image_size), transforms.RandomHorizontalFlip()]
    else:
        augment = [transforms.Resize(256), transforms.CenterCrop(info.image_size)]
    folder = Path(root).expanduser() / split
    dataset = datasets.ImageFolder(
        str(folder), transform=transforms.Compose([*augment, transforms.ToTensor(), normalize])
    )
    logger.info("imagenet %s: %d images in %d classes under %s", split, len(dataset), len(dataset.classes), folder)
    if size is not None:
        dataset = torch.utils.data.Subset(dataset, subset_indices(len(dataset), size, subset_seed).tolist())
    return ImageFolderLoader(
        dataset,
        batch_size,
        train=split == "train",
        seed=seed,
        drop_last=drop_last,
        device=device,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
