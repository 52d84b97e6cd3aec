"""ImageNet (ILSVRC-2012) from an ImageFolder layout, streamed through torchvision.

ImageNet does not fit in memory, so unlike the small data sets it is decoded
and augmented by a worker pool (torch DataLoader + torchvision transforms) and
only the finished batches are moved to the device. Expected layout::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG      # validation images sorted into class folders

torchvision is an optional dependency (``pip install 'metaquant-torch[vision]'``)
and is imported only when an ImageNet loader is built. The layout is checked
before that, so layout mistakes are reported even without torchvision.

Epoch order and sharding come from :mod:`metaquant.data.sampling`, like for
:class:`~metaquant.data.loader.TensorLoader`. Augmentation randomness lives in
the workers, each seeded from (seed, epoch, rank, worker id), so with
``num_workers > 0`` an epoch is reproducible; with ``num_workers == 0`` the
transforms draw from the main process's global RNG and are not.
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
    """Check that ``root`` has the ImageFolder layout; return the sorted class names.

    Only the folders are inspected (every sub-directory of ``train/`` and
    ``val/`` is a class, as in torchvision's ImageFolder), so this works
    without torchvision and without reading any image.

    Args:
        root: folder holding ``train/<wnid>/`` and ``val/<wnid>/``.
        splits: the split folders to check, ``("train", "val")`` or one of
            them (evaluation needs ``("val",)`` only).

    Returns:
        The class folder names, sorted (the class index of each is its position).

    Raises:
        DatasetNotFoundError: ``root``, ``root/train`` or ``root/val`` is missing.
        DatasetFormatError: a split has no class folders, or train and val classes differ.

    Example:
        >>> from pathlib import Path
        >>> for wnid in ("n01440764", "n01443537"):
        ...     (Path("imagenet-layout") / "train" / wnid).mkdir(parents=True)
        >>> (Path("imagenet-layout") / "val" / "n01440764").mkdir(parents=True)
        >>> try:
        ...     mq.data.check_imagenet_layout("imagenet-layout")
        ... except mq.data.DatasetFormatError as err:
        ...     print(err)
        ImageNet train and val class folders under imagenet-layout differ: only in train: ['n01443537'] (1), ...
        >>> (Path("imagenet-layout") / "val" / "n01443537").mkdir()
        >>> mq.data.check_imagenet_layout("imagenet-layout")
        ['n01440764', 'n01443537']
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
            "ImageNet loading needs torchvision, which is not installed; install it with "
            "pip install 'metaquant-torch[vision]'"
        ) from exc
    return datasets, transforms


def _seed_worker(seed: int, epoch: int, rank: int, worker_id: int) -> None:
    # Seed everything a transform might draw from, per (seed, epoch, rank, worker).
    s = epoch_seed(seed, epoch, f"augment/rank{rank}/worker{worker_id}")
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


class ImageFolderLoader:
    """Batches of an image folder data set on ``device``; same interface as TensorLoader.

    Shuffles (``train=True``) and shards like TensorLoader; a fresh torch
    DataLoader is built per epoch so each epoch's worker seeds depend only on
    ``(seed, epoch, rank)``.

    Args:
        dataset: a map-style data set of ``(image tensor, label)`` pairs, e.g.
            torchvision's ``ImageFolder`` with its transforms.
        batch_size: examples per batch on this rank.
        train: reshuffle every epoch; False keeps the data set's order.
        device: where the batches are moved.
        seed: seed of the shuffling and of the workers' augmentation.
        drop_last: skip a last, smaller batch (and cut the epoch to a multiple
            of ``world_size``).
        rank: this process's index in ``0..world_size-1``.
        world_size: number of processes sharing the data.
        num_workers: DataLoader worker processes (0: decode in this process).

    Raises:
        ValueError: ``batch_size < 1``, ``rank`` not in ``0..world_size-1``,
            or ``num_workers < 0``; :meth:`set_epoch` with a negative epoch.

    Example:
        Any map-style data set works; rank 1 of 2 takes every second example:

        >>> ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10))
        >>> loader = mq.data.ImageFolderLoader(ds, 4, train=False, num_workers=0)
        >>> len(loader), [y.tolist() for _, y in loader]
        (3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])
        >>> shard = mq.data.ImageFolderLoader(ds, 2, train=False, rank=1, world_size=2, num_workers=0)
        >>> [y.tolist() for _, y in shard]
        [[1, 3], [5, 7], [9]]
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

    Train: RandomResizedCrop(224) + horizontal flip; eval: Resize(256) +
    CenterCrop(224); both normalised with the ImageNet mean/std. ``train_size`` /
    ``test_size`` pick seeded subsets (seeds ``subset_seed``, default ``seed``, / ``test_seed``).

    Args:
        root: folder with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.
        batch_size: training batch size per rank.
        test_batch_size: validation batch size per rank.
        device: where the batches are moved.
        seed: seed of the shuffling and the augmentation (and of the train subset, unless ``subset_seed``).
        test_seed: seed of the validation subset.
        train_size: train on a seeded subset of this many images (None: all).
        test_size: validate on a seeded subset of this many images (None: all).
        subset_seed: seed of the train subset (default: ``seed``).
        drop_last: the train loader skips its last, smaller batch.
        rank: this process's index in ``0..world_size-1``.
        world_size: number of processes sharing the data.
        num_workers: decoding worker processes per loader.

    Returns:
        ``(train_loader, val_loader)``, two :class:`ImageFolderLoader`.

    Raises:
        DatasetNotFoundError, DatasetFormatError: wrong layout (checked first).
        ImportError: torchvision is not installed.
        ValueError: a subset size out of range, or invalid ``batch_size`` /
            ``rank`` / ``world_size`` / ``num_workers``.

    Example:
        The layout is checked before torchvision is needed:

        >>> from pathlib import Path
        >>> (Path("imagenet-root") / "train" / "n01440764").mkdir(parents=True)
        >>> try:
        ...     mq.data.imagenet_loaders("imagenet-root", batch_size=256, test_batch_size=256)
        ... except mq.data.DatasetNotFoundError as err:
        ...     print(err)
        ImageNet folder imagenet-root/val is missing; expected <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG
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
    """The validation loader of :func:`imagenet_loaders` alone: only ``root/val`` is needed and read.

    A class's index is its folder's position among the sorted folders of ``val/``, so a missing folder would
    shift every later label; ``num_classes`` (the model's output size) guards against that.

    Args:
        root: folder with ``val/<wnid>/*.JPEG``.
        batch_size: batch size per rank.
        device, seed, test_seed, test_size, rank, world_size, num_workers: as for
            :func:`imagenet_loaders`.
        num_classes: the number of class folders ``val/`` must hold (None: not checked).

    Returns:
        An :class:`ImageFolderLoader` over the validation images (Resize(256) + CenterCrop(224)).

    Raises:
        DatasetNotFoundError, DatasetFormatError: ``root/val`` is missing, has no class folders, or not
            ``num_classes`` of them.
        ImportError: torchvision is not installed.
        ValueError: ``test_size`` out of range, or invalid ``batch_size`` / ``rank`` / ``world_size``.

    Example:
        A machine that only evaluates needs no training images:

        >>> from pathlib import Path
        >>> (Path("imagenet-val-only") / "val").mkdir(parents=True)
        >>> try:
        ...     mq.data.imagenet_val_loader("imagenet-val-only", batch_size=256)
        ... except mq.data.DatasetFormatError as err:
        ...     print(err)
        ImageNet folder imagenet-val-only/val has no class folders; expected ...
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
