"""Batches of an in-memory split, augmented and normalised on the training device.

:class:`TensorLoader` keeps a whole uint8 split on the device once and builds
each batch there: gather, scale to [0, 1], augment (``crop_flip`` data sets,
training only), normalise. This replaces a worker-pool DataLoader for data
sets small enough to hold in memory, and makes every epoch's batches a pure
function of ``(seed, epoch)``, which exact resumption of a killed run relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from ..validation import check_int
from .augment import crop_at, crop_offsets, flip_mask, hflip_where
from .registry import DatasetInfo
from .sampling import batches_per_rank, check_batching, epoch_generator, num_batches, shard_indices
from .tensors import ImageTensors

__all__ = ["CROP_PADDING", "BatchLoader", "TensorLoader"]

# Zero padding before the random crop, the standard CIFAR recipe.
CROP_PADDING = 4


@runtime_checkable
class BatchLoader(Protocol):
    """What the training loop needs from a loader (TensorLoader and the ImageNet loader).

    A structural type: any object with ``set_epoch(epoch)``, ``__len__`` (batches
    per epoch on this rank) and ``__iter__`` (``(x, y)`` batches on the training
    device) qualifies, and ``isinstance`` checks for those methods.

    Example:
        >>> data = mq.data.ImageTensors(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
        >>> loader = mq.data.TensorLoader(data, mq.data.dataset_info("mnist"), 2, train=False)
        >>> isinstance(loader, mq.data.BatchLoader), isinstance([(0, 1)], mq.data.BatchLoader)
        (True, False)
    """

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorLoader:
    """Iterate over ``(x, y)`` batches of an :class:`ImageTensors` split on ``device``.

    ``x`` is float32 ``[B, C, H, W]`` equal to ``(augment(images / 255) - mean) / std``;
    ``y`` is int64 ``[B]``. With ``train=True`` the order is reshuffled every epoch
    and, if ``info.augment == "crop_flip"``, each image is zero-padded by 4, randomly
    cropped and randomly mirrored. With ``train=False`` the order is the data set's
    own and nothing is random.

    Randomness depends only on ``(seed, epoch)`` (augmentation also on ``rank``, so
    ranks do not share crop offsets): call :meth:`set_epoch` before each epoch, as
    with ``DistributedSampler``; iterating twice without it repeats the epoch.

    Sharding: ``rank`` of ``world_size`` takes a strided share (positions
    ``rank, rank + world_size, ...``) of the common epoch order, see
    :mod:`metaquant.data.sampling`; ``batch_size`` is per rank. With
    ``drop_last=False`` every example is visited exactly once per epoch over all
    ranks and the last batch may be smaller; ranks' batch counts can then differ
    by one, so distributed *training* should use ``drop_last=True``, which
    gives every rank the same number of full batches.

    Args:
        data: the split, e.g. from :func:`~metaquant.data.splits.load_split`;
            it is copied to ``device`` once.
        info: the data set's :class:`DatasetInfo` (normalisation, augmentation,
            expected image shape).
        batch_size: examples per batch on this rank.
        train: shuffle every epoch and augment (see above); False keeps the order.
        device: where the batches are built and returned.
        seed: seed of the shuffling and augmentation.
        drop_last: skip a last, smaller batch (and cut the epoch to a multiple of
            ``world_size``).
        rank: this process's index in ``0..world_size-1``.
        world_size: number of processes sharing the data.

    Raises:
        ValueError: ``batch_size < 1``, ``rank`` not in ``0..world_size-1``, or
            images that are not ``[info.in_channels, info.image_size, info.image_size]``;
            :meth:`set_epoch` with a negative epoch.

    Example:
        White MNIST images come out as ``(1 - mean) / std``; the order is a
        function of the epoch:

        >>> info = mq.data.dataset_info("mnist")
        >>> data = mq.data.ImageTensors(torch.full((5, 1, 28, 28), 255, dtype=torch.uint8), torch.arange(5))
        >>> loader = mq.data.TensorLoader(data, info, batch_size=2, train=True, seed=0)
        >>> len(loader), [y.tolist() for _, y in loader]
        (3, [[2, 0], [1, 3], [4]])
        >>> loader.set_epoch(1); [y.tolist() for _, y in loader]
        [[3, 4], [1, 2], [0]]
        >>> x, _ = next(iter(loader)); x.shape, round(x.max().item(), 4)
        (torch.Size([2, 1, 28, 28]), 2.8215)
    """

    def __init__(
        self,
        data: ImageTensors,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_batching(batch_size, rank, world_size)
        _, c, h, w = data.images.shape
        if (c, h, w) != (info.in_channels, info.image_size, info.image_size):
            raise ValueError(
                f"images of shape [{c}, {h}, {w}] do not match dataset {info.name!r}, which expects "
                f"[{info.in_channels}, {info.image_size}, {info.image_size}]"
            )
        self.info = info
        self.batch_size = batch_size
        self.train = train
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.augment = train and info.augment == "crop_flip"
        self.epoch = 0
        # Moved once: per-batch work then never crosses the host-device boundary
        # except for the small index/offset tensors.
        self._images = data.images.to(self.device)
        self._labels = data.labels.to(self.device)
        # (x / 255 - mean) / std folded into one fused x * scale + shift.
        mean = torch.tensor(info.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float64).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device=self.device, dtype=torch.float32)
        self._shift = (-mean / std).to(device=self.device, dtype=torch.float32)

    @property
    def num_examples(self) -> int:
        """Examples in the whole split (all ranks)."""
        return int(self._labels.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    def _indices(self) -> torch.Tensor:
        return shard_indices(
            self.num_examples,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.train,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        return batches_per_rank(
            self.num_examples, self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices().to(self.device)
        generator = epoch_generator(self.seed, self.epoch, f"augment/rank{self.rank}") if self.augment else None
        for b in range(num_batches(len(indices), self.batch_size, self.drop_last)):
            index = indices[b * self.batch_size : (b + 1) * self.batch_size]
            x = self._images[index]
            if generator is not None:
                # Augment the uint8 pixels (a quarter of the float traffic); the zero
                # padding is black, as in the usual PIL RandomCrop + Normalize pipeline.
                x = crop_at(x, CROP_PADDING, crop_offsets(len(index), CROP_PADDING, generator))
                x = hflip_where(x, flip_mask(len(index), generator))
            x = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
            yield x, self._labels[index]
