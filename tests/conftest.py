"""Shared fixtures: paths to the shared reference material, the Debian Fashion-MNIST files, and one briefly
pre-trained ResNet20 on a Fashion-MNIST subset that the real-data tests start from."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _fashion_available() -> bool:
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


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
