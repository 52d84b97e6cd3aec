"""Batches of an in-memory split, augmented and normalised on the training device.

:class:`TensorLoader` keeps a whole uint8 split on the device and builds each batch there (gather, scale to
[0, 1], augment, normalise) instead of a worker-pool DataLoader; every epoch's batches are a pure function of
``(seed, epoch)``, which exact resumption of a killed run relies on.
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
    """What the training loop needs from a loader (``TensorLoader``, ``ImageFolderLoader``): ``set_epoch``, ``len``
    (batches per epoch on this rank) and ``(x, y)`` batches on the training device; ``isinstance`` checks them."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorLoader:
    """``(x, y)`` batches of an :class:`ImageTensors` split, copied once to ``device``.

    ``x`` is float32 ``[B, C, H, W]`` ``= (augment(images / 255) − mean) / std``, ``y`` int64 ``[B]``. With
    ``train=True`` the order is reshuffled every epoch and ``info.augment == "crop_flip"`` pads by 4, crops and
    mirrors at random; with ``train=False`` the order is the data set's and nothing is random. Randomness depends
    only on ``(seed, epoch)`` (augmentation also on ``rank``): call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``. ``rank`` of ``world_size`` takes a strided share of the common epoch order
    (:mod:`metaquant.data.sampling`), ``batch_size`` per rank; distributed training should use ``drop_last=True``
    so every rank has the same number of full batches.

    Raises:
        ValueError: ``batch_size < 1``, ``rank`` not in ``0..world_size-1``, or images that are not
            ``[info.in_channels, info.image_size, info.image_size]``.
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
