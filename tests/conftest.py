"""Shared fixtures: paths to the shared reference material and the Debian Fashion-MNIST files."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_mnist_available():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
