"""TensorLoader: normalisation, augmentation, determinism, coverage and sharding."""

from __future__ import annotations

import itertools

import pytest
import torch

from metaquant.data.loader import BatchLoader, TensorLoader
from metaquant.data.registry import dataset_info
from metaquant.data.tensors import ImageTensors

MNIST = dataset_info("mnist")
CIFAR = dataset_info("cifar10")


def make_data(n: int, channels: int, size: int, seed: int = 0) -> ImageTensors:
    # Labels are the example ids, so every yielded y says which image it is.
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageTensors(images=images, labels=torch.arange(n))


def normalise(images: torch.Tensor, info) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_protocol():
    assert isinstance(TensorLoader(make_data(4, 1, 28), MNIST, 2, train=True), BatchLoader)


@pytest.mark.parametrize("train", [False, True])
def test_normalisation_without_augmentation(train):
    data = make_data(23, 1, 28)
    loader = TensorLoader(data, MNIST, 5, train=train, seed=3)
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, normalise(data.images[y], MNIST), rtol=0, atol=1e-6)


def test_test_loader_is_unshuffled_and_deterministic():
    data = make_data(23, 3, 32)
    loader = TensorLoader(data, CIFAR, 5, train=False, seed=3)
    first = collect(loader)
    assert torch.cat([y for _, y in first]).tolist() == list(range(23))
    assert [len(y) for _, y in first] == [5, 5, 5, 5, 3] and len(loader) == 5
    # No augmentation even though CIFAR's policy is crop_flip, and epochs do not matter.
    torch.testing.assert_close(torch.cat([x for x, _ in first]), normalise(data.images, CIFAR), rtol=0, atol=1e-6)
    loader.set_epoch(4)
    for (xa, ya), (xb, yb) in zip(first, collect(loader)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _all_crops_flips(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Every padded crop of one [C, H, W] image, plain and mirrored: [2 * (2p+1)^2, C, H, W]."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding)
    padded[:, padding : padding + h, padding : padding + w] = image
    crops = [padded[:, t : t + h, s : s + w] for t in range(2 * padding + 1) for s in range(2 * padding + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_train_augmentation_is_a_crop_and_flip_of_the_image():
    data = make_data(30, 3, 32)
    loader = TensorLoader(data, CIFAR, 8, train=True, seed=1)
    changed = 0
    for x, y in loader:
        # Undo the normalisation, then find each image among all its crops/flips.
        pixels = x * torch.tensor(CIFAR.std).view(1, -1, 1, 1) + torch.tensor(CIFAR.mean).view(1, -1, 1, 1)
        for xi, yi in zip(pixels, y):
            candidates = _all_crops_flips(data.images[yi].float() / 255)
            distance = (candidates - xi).abs().flatten(1).amax(1)
            assert distance.min() < 1e-5, f"example {int(yi)} is not a padded crop/flip of its image"
            changed += not torch.allclose(xi, data.images[yi].float() / 255, atol=1e-5)
    assert changed > 20  # augmentation is really applied


def test_same_seed_and_epoch_give_identical_batches():
    data = make_data(37, 3, 32)
    a = TensorLoader(data, CIFAR, 8, train=True, seed=11)
    b = TensorLoader(data, CIFAR, 8, train=True, seed=11)
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(collect(a), collect(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epoch_replay_and_change():
    data = make_data(37, 3, 32)
    loader = TensorLoader(data, CIFAR, 8, train=True, seed=11)
    epoch0 = collect(loader)
    loader.set_epoch(1)
    epoch1 = collect(loader)
    loader.set_epoch(0)
    replay = collect(loader)
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()  # noqa: E731
    assert order(epoch0) != order(epoch1)
    assert order(epoch0) == order(replay)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, replay))
    other_seed = TensorLoader(data, CIFAR, 8, train=True, seed=12)
    assert order(collect(other_seed)) != order(epoch0)


@pytest.mark.parametrize("n, batch", [(37, 8), (40, 8), (5, 8)])
def test_every_example_once_per_epoch(n, batch):
    loader = TensorLoader(make_data(n, 1, 28), MNIST, batch, train=True, seed=2)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = collect(loader)
        assert len(batches) == len(loader) == -(-n // batch)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(n))


def test_drop_last():
    loader = TensorLoader(make_data(37, 1, 28), MNIST, 8, train=True, drop_last=True)
    batches = collect(loader)
    assert len(batches) == len(loader) == 4
    assert all(len(y) == 8 for _, y in batches)
    assert len(set(torch.cat([y for _, y in batches]).tolist())) == 32


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_cover_the_epoch_once(train):
    data = make_data(53, 3, 32)
    ranks = [TensorLoader(data, CIFAR, 5, train=train, seed=4, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.set_epoch(2)
    seen = [torch.cat([y for _, y in collect(loader)]).tolist() for loader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(53))
    assert [len(loader) for loader in ranks] == [6, 6]  # 27 and 26 examples in batches of 5


def test_ranks_together_form_the_single_process_global_batch():
    data = make_data(53, 1, 28)
    single = TensorLoader(data, MNIST, 10, train=True, seed=4)
    ranks = [TensorLoader(data, MNIST, 5, train=True, seed=4, rank=r, world_size=2) for r in range(2)]
    for step, ((_, y), (_, y0), (_, y1)) in enumerate(zip(single, *ranks)):
        assert sorted(y.tolist()) == sorted(y0.tolist() + y1.tolist()), f"step {step}"


def test_distributed_drop_last_gives_equal_step_counts():
    data = make_data(51, 1, 28)
    ranks = [TensorLoader(data, MNIST, 5, train=True, drop_last=True, rank=r, world_size=2) for r in range(2)]
    counts = [len(collect(loader)) for loader in ranks]
    assert counts == [len(loader) for loader in ranks] == [5, 5]


def test_ranks_draw_different_augmentations():
    # Same images on both ranks would otherwise get the same crops.
    data = ImageTensors(
        images=make_data(1, 3, 32).images.expand(20, -1, -1, -1).clone(), labels=torch.zeros(20, dtype=torch.long)
    )
    x0 = torch.cat([x for x, _ in TensorLoader(data, CIFAR, 10, train=True, rank=0, world_size=2)])
    x1 = torch.cat([x for x, _ in TensorLoader(data, CIFAR, 10, train=True, rank=1, world_size=2)])
    assert not torch.equal(x0, x1)


def test_data_stays_on_device_and_outputs_there():
    loader = TensorLoader(make_data(6, 1, 28), MNIST, 4, train=True, device="cpu")
    x, y = next(iter(loader))
    assert x.device.type == y.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    data = make_data(40, 3, 32)
    cpu = collect(TensorLoader(data, CIFAR, 16, train=True, seed=9))
    gpu = collect(TensorLoader(data, CIFAR, 16, train=True, seed=9, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(rank=-1), "rank"),
        (dict(world_size=0), "world_size"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(batch_size=4, train=True) | kwargs
    with pytest.raises(ValueError, match=message):
        TensorLoader(make_data(4, 1, 28), MNIST, **args)


def test_shape_mismatch_with_info():
    with pytest.raises(ValueError, match=r"\[1, 28, 28\].*'cifar10'.*\[3, 32, 32\]"):
        TensorLoader(make_data(4, 1, 28), CIFAR, 2, train=True)


def test_bad_epoch():
    loader = TensorLoader(make_data(4, 1, 28), MNIST, 2, train=True)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


def test_iterating_twice_without_set_epoch_repeats():
    loader = TensorLoader(make_data(12, 3, 32), CIFAR, 4, train=True, seed=5)
    for (xa, ya), (xb, yb) in itertools.zip_longest(collect(loader), collect(loader)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_epoch_order_of_a_seed_stays_the_same_and_only_loaders_are_batch_loaders():
    # runs resumed or repeated with the same seed must see the same batches as before
    white = ImageTensors(images=torch.full((5, 1, 28, 28), 255, dtype=torch.uint8), labels=torch.arange(5))
    loader = TensorLoader(white, MNIST, batch_size=2, train=True, seed=0)
    assert len(loader) == 3 and [y.tolist() for _, y in loader] == [[2, 0], [1, 3], [4]]
    loader.set_epoch(1)
    assert [y.tolist() for _, y in loader] == [[3, 4], [1, 2], [0]]
    x, _ = next(iter(loader))
    assert torch.allclose(x, torch.full_like(x, (1 - MNIST.mean[0]) / MNIST.std[0]))  # white, normalised
    assert not isinstance([(0, 1)], BatchLoader)
