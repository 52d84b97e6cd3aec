"""In-memory image splits (:class:`ImageTensors`) and seeded subsets of them.

A split of a small data set fits in memory as one uint8 tensor, which lets ``TensorLoader`` batch, augment
and normalise on the training device without a worker pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import is_int

__all__ = ["ImageTensors", "subset", "subset_indices"]


@dataclass(frozen=True)
class ImageTensors:
    """One split held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``; ``len()`` is ``N``.

    What the readers return and ``TensorLoader`` serves; ValueError at construction for other dtypes, shapes or
    counts.
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
    """Sorted indices of a random subset of ``size`` (None: all) of ``n`` examples, a function of ``(n, size, seed)``.

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
    """A seeded random subset of ``size`` examples of ``data`` in their own order (``size=None``: ``data`` itself).

    Raises:
        ValueError: ``size`` is not an integer in ``1..len(data)`` (nor None).
    """
    if size is None:
        return data
    index = subset_indices(len(data), size, seed)
    return ImageTensors(images=data.images[index], labels=data.labels[index])
