"""Which examples each rank sees in each epoch, as a pure function of (seed, epoch).

Both loaders take their epoch order from here, so shuffling and sharding behave the same for every data set
and a resumed run replays exactly the original batches. Sharding is strided: rank ``r`` of ``W`` takes
positions ``r, r + W, ...`` of the common permutation, so step ``k`` of ``W`` ranks with batch size ``B``
covers exactly step ``k`` of one process with batch size ``W·B`` and the same seed.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..validation import check_int, is_int

__all__ = ["batches_per_rank", "check_batching", "epoch_generator", "epoch_seed", "num_batches", "shard_indices"]


def epoch_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed hashed from ``(seed, epoch, stream)``, so that seed 0 epoch 1 is unrelated to seed 1 epoch 0."""
    key = f"{int(seed)}:{int(epoch)}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def epoch_generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`epoch_seed`."""
    return torch.Generator(device="cpu").manual_seed(epoch_seed(seed, epoch, stream))


def check_batching(batch_size: int, rank: int, world_size: int) -> None:
    """Raise ValueError unless ``batch_size >= 1`` and ``0 <= rank < world_size``."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("world_size", world_size, minimum=1)
    if not (is_int(rank) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an integer in 0..{world_size - 1} for world_size {world_size}, got {rank!r}")


def shard_indices(
    n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> torch.Tensor:
    """Indices (int64, CPU) of the examples rank ``rank`` visits in ``epoch``, in order (``0..n-1`` unshuffled).

    ``drop_last`` first cuts the epoch to a multiple of ``world_size``, so all ranks run the same number of steps;
    without it every example is used once over all ranks and shares differ by at most one.
    """
    order = torch.randperm(n, generator=epoch_generator(seed, epoch, "order")) if shuffle else torch.arange(n)
    if drop_last:
        order = order[: n - n % world_size]
    return order[rank::world_size]


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` that ``num_examples`` make, the last one partial unless ``drop_last``."""
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def batches_per_rank(n: int, batch_size: int, *, rank: int, world_size: int, drop_last: bool) -> int:
    """Batches that rank ``rank`` yields per epoch: ``num_batches`` of its ``shard_indices`` share, computed
    without drawing the permutation (the share's size does not depend on the order)."""
    used = n - n % world_size if drop_last else n
    return num_batches(len(range(rank, used, world_size)), batch_size, drop_last)
