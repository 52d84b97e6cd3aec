"""In-memory image splits (:class:`ImageTensors`) and seeded subsets of them.

A split of a small data set (MNIST, CIFAR) fits comfortably in memory as one
uint8 tensor, which is what lets :class:`~metaquant.data.loader.TensorLoader`
batch, augment and normalise on the training device without a worker pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import is_int

__all__ = ["ImageTensors", "subset", "subset_indices"]


@dataclass(frozen=True)
class ImageTensors:
    """One split held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    What the readers (:func:`~metaquant.data.splits.load_split`, ``read_idx_pair``,
    ``read_cifar``) return and :class:`~metaquant.data.loader.TensorLoader` serves.
    ``len()`` is the number of examples. The fields are checked at construction.

    Args:
        images: uint8 pixels ``[N, C, H, W]``.
        labels: int64 class indices ``[N]``.

    Raises:
        ValueError: ``images`` is not a 4-d uint8 tensor, ``labels`` not a 1-d
            int64 tensor, or their first dimensions differ.

    Example:
        >>> data = mq.data.ImageTensors(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([5, 0, 4]))
        >>> len(data), data.labels.tolist()
        (3, [5, 0, 4])
        >>> try:
        ...     mq.data.ImageTensors(torch.zeros(3, 1, 28, 28), torch.tensor([5, 0, 4]))
        ... except ValueError as err:
        ...     print(err)
        ImageTensors.images must be a uint8 tensor [N, C, H, W]; got dtype torch.float32 with shape (3, 1, 28, 28)
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # Validate at construction so a bad reader fails where the bug is, not
        # at the first training step.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "ImageTensors.images must be a uint8 tensor [N, C, H, W]; got "
                f"dtype {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                "ImageTensors.labels must be an int64 tensor [N]; got "
                f"dtype {self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"ImageTensors has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def subset_indices(n: int, size: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of ``size`` out of ``n`` examples.

    ``size=None`` selects all ``n``. The result depends only on ``(n, size, seed)``.

    Raises:
        ValueError: ``size`` is not in ``1..n``.
    """
    if size is None:
        return torch.arange(n)
    if not (is_int(size) and 0 < size <= n):
        raise ValueError(
            f"subset size must be an integer in 1..{n} (the number of examples available) or None for all; got {size!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    # Sorting keeps the subset in the data set's own order; the loader shuffles anyway.
    return torch.randperm(n, generator=generator)[:size].sort().values


def subset(data: ImageTensors, size: int | None, seed: int) -> ImageTensors:
    """A fixed, seeded random subset of ``size`` examples of ``data`` (``None`` → all of it).

    Used to train or evaluate on part of a data set. The chosen examples depend
    only on ``(len(data), size, seed)`` and keep the data set's own order.

    Args:
        data: the split to cut.
        size: number of examples to keep, or ``None`` to keep all of them.
        seed: seed of the random choice.

    Returns:
        A new :class:`ImageTensors` (``data`` itself when ``size`` is ``None``).

    Raises:
        ValueError: ``size`` is not an integer in ``1..len(data)`` (nor ``None``).

    Example:
        >>> data = mq.data.ImageTensors(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
        >>> mq.data.subset(data, 4, seed=0).labels.tolist()
        [1, 4, 5, 7]
        >>> torch.equal(mq.data.subset(data, 4, seed=0).labels, mq.data.subset(data, 4, seed=0).labels)
        True
        >>> mq.data.subset(data, None, seed=0) is data
        True
    """
    if size is None:
        return data
    index = subset_indices(len(data), size, seed)
    return ImageTensors(images=data.images[index], labels=data.labels[index])
