"""Shared fixtures: the Debian Fashion-MNIST files, one briefly pre-trained ResNet20 on a Fashion-MNIST subset
that the real-data tests start from, and a checkpoint in the layout of the original code's pre-trained ResNet20."""

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_LAYOUT = REPO / "tests" / "fixtures" / "original-resnet20-cifar10-layout.txt"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _fashion_available() -> bool:
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="session")
def original_resnet20_path(tmp_path_factory) -> Path:
    """A ``ResNet20-CIFAR10-pretrain.pth`` as the original MetaQuant code saved it: its 128 state_dict entries,
    in its order, names, shapes and dtypes (``tests/fixtures/original-resnet20-cifar10-layout.txt``, read from
    the released file), in torch's legacy non-zip format with its storages tagged as on "cuda:0"; the values
    are random (conv and linear weights with He scaling, BatchNorm statistics with positive variances), so
    that a forward pass is not degenerate."""
    generator = torch.Generator().manual_seed(20)
    state = OrderedDict()
    for line in ORIGINAL_LAYOUT.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, dims, dtype = line.split()
        shape = () if dims == "-" else tuple(int(d) for d in dims.split(","))
        if dtype == "int64":  # num_batches_tracked
            state[name] = torch.tensor(38_318)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) > 1:  # conv [out, in, k, k] or linear [out, in]
            state[name] = torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:]))
        else:  # BatchNorm weight, bias, running mean; linear bias
            base = 1.0 if name.endswith(".weight") else 0.0  # a 1-d weight is a BatchNorm scale
            state[name] = base + 0.1 * torch.randn(shape, generator=generator)
    path = tmp_path_factory.mktemp("original") / "ResNet20-CIFAR10-pretrain.pth"
    save_as_from_a_gpu(state, path)  # the released file was saved from a GPU
    return path


def save_as_from_a_gpu(obj, path: Path) -> None:
    """``torch.save(obj, path)`` as a machine with a GPU writes ``obj`` with its tensors there: in torch's legacy
    non-zip format, with every storage tagged "cuda:0", so that on a CPU-only machine it loads only with a
    ``map_location``. The legacy format pickles (protocol 2, no framing) the tag once as a length-prefixed
    string and refers back to it; this retags it."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    assert data.count(cpu) == 1, "the legacy format's storage tag was not found once"
    path.write_bytes(data.replace(cpu, cuda))


@pytest.fixture
def fashion_mnist_available():
    if not _fashion_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fashion_subset():
    """Loaders over a fixed 6400/1000 subset of the real Fashion-MNIST, batch 64 (100 steps per epoch)."""
    if not _fashion_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from metaquant.data import make_loaders

    return make_loaders("fashion-mnist", batch_size=64, train_size=6400, test_size=1000, seed=0)


@pytest.fixture(scope="session")
def pretrained_resnet20(fashion_subset):
    """A full-precision ResNet20 after 200 SGD steps on the subset: ``(state_dict, final test accuracy)``."""
    import metaquant as mq

    train, test, info = fashion_subset
    torch.manual_seed(0)
    model = mq.models.resnet20(num_classes=info.num_classes, in_channels=info.in_channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    state = mq.fit(model, mq.Trainer(model, opt), train, test, epochs=2, schedule=lambda e: 1.0, progress=False)
    assert state.iteration == 200
    return {k: v.clone() for k, v in model.state_dict().items()}, state.last_acc


@pytest.fixture
def tiny_mnist(tmp_path_factory):
    """A 64-image training and 40-image test set in the real MNIST IDX format: CLI options that use it."""
    import numpy as np

    from tests.data.formats import write_idx

    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 40)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # images that depend on the label, so that there is something to learn
        images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    return ["--dataset", "mnist", "--data-dir", str(root), "--no-download"]
