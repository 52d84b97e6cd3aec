"""Epoch order and strided sharding."""

from __future__ import annotations

import pytest
import torch

from metaquant.data.sampling import batches_per_rank, check_batching, epoch_seed, num_batches, shard_indices


def test_epoch_seed_depends_on_each_part():
    seeds = {epoch_seed(s, e, st) for s in (0, 1) for e in (0, 1) for st in ("order", "augment")}
    assert len(seeds) == 8
    assert epoch_seed(0, 1, "order") != epoch_seed(1, 0, "order")
    assert epoch_seed(3, 5, "order") == epoch_seed(3, 5, "order")
    assert 0 <= epoch_seed(2**40, 7, "x") < 2**63


def test_unshuffled_is_identity():
    assert shard_indices(7, seed=3, epoch=9, shuffle=False).tolist() == list(range(7))


def test_shuffled_is_permutation_fixed_by_seed_and_epoch():
    a = shard_indices(100, seed=0, epoch=0, shuffle=True)
    assert sorted(a.tolist()) == list(range(100)) and a.tolist() != list(range(100))
    assert torch.equal(a, shard_indices(100, seed=0, epoch=0, shuffle=True))
    assert not torch.equal(a, shard_indices(100, seed=0, epoch=1, shuffle=True))
    assert not torch.equal(a, shard_indices(100, seed=1, epoch=0, shuffle=True))


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (13, 4), (3, 4)])
def test_strided_shards_partition_the_epoch(n, world):
    full = shard_indices(n, seed=5, epoch=2, shuffle=True)
    shards = [shard_indices(n, seed=5, epoch=2, shuffle=True, rank=r, world_size=world) for r in range(world)]
    for r, shard in enumerate(shards):
        assert shard.tolist() == full[r::world].tolist()
    assert sorted(torch.cat(shards).tolist()) == list(range(n))


def test_drop_last_equalises_shares():
    shards = [shard_indices(11, seed=0, epoch=0, shuffle=True, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(torch.cat(shards).tolist())) == 9


def test_num_batches():
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(10, 3, drop_last=True) == 3
    assert num_batches(0, 3, drop_last=False) == 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_per_rank_counts_the_batches_of_each_shard(drop_last):
    for n in (0, 1, 7, 10, 33):
        for world_size in (1, 2, 3, 4):
            for rank in range(world_size):
                share = shard_indices(
                    n, seed=0, epoch=0, shuffle=True, rank=rank, world_size=world_size, drop_last=drop_last
                )
                batches = [share[i : i + 4] for i in range(0, len(share), 4)]
                expected = sum(len(b) == 4 or not drop_last for b in batches)
                assert batches_per_rank(n, 4, rank=rank, world_size=world_size, drop_last=drop_last) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 1), "batch_size"),
        ((1.5, 0, 1), "batch_size"),
        ((4, 2, 2), r"rank .* 0\.\.1"),
        ((4, -1, 2), "rank"),
        ((4, 0, 0), "world_size"),
    ],
)
def test_check_batching(args, message):
    with pytest.raises(ValueError, match=message):
        check_batching(*args)
