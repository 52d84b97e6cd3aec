"""load_split: lookup order, missing-data errors, downloads, and the real Fashion-MNIST."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metaquant.data import splits
from metaquant.data.errors import DatasetFormatError, DatasetNotFoundError
from metaquant.data.splits import load_split

from .formats import make_cifar, write_cifar_archive, write_cifar_folder, write_idx

TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx_split(directory: Path, stems, n: int, fill: int, *, gz: bool = True, label: int = 3) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{stems[0]}{suffix}", np.full((n, 28, 28), fill, np.uint8), gz=gz)
    write_idx(directory / f"{stems[1]}{suffix}", np.full(n, label, np.uint8), gz=gz)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Never touch the real cache or system folder unless a test asks for it."""
    monkeypatch.setattr(splits, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(splits, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")


@pytest.mark.parametrize("where", ["direct", "subfolder"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_found_in_data_dir(tmp_path, where, gz):
    data_dir = tmp_path / "data"
    write_idx_split(data_dir if where == "direct" else data_dir / "mnist", TRAIN, 4, fill=9, gz=gz)
    data = load_split("mnist", "train", data_dir, download=False)
    assert tuple(data.images.shape) == (4, 1, 28, 28)
    assert int(data.images.min()) == int(data.images.max()) == 9 and data.labels.tolist() == [3] * 4


def test_data_dir_before_system_dir(tmp_path):
    write_idx_split(tmp_path / "data", TEST, 2, fill=1)
    write_idx_split(tmp_path / "system", TEST, 3, fill=2)
    assert len(load_split("fashion-mnist", "test", tmp_path / "data", download=False)) == 2
    # Without data_dir the Debian folder is used ...
    assert len(load_split("fashion-mnist", "test", None, download=False)) == 3
    # ... and only for Fashion-MNIST.
    with pytest.raises(DatasetNotFoundError):
        load_split("mnist", "test", None, download=False)


@pytest.mark.parametrize("data_dir", ["missing", "empty", "a-file"])
def test_a_data_dir_without_the_files_never_falls_back_to_another_copy(tmp_path, data_dir):
    write_idx_split(tmp_path / "system", TEST, 3, fill=2)
    write_idx_split(tmp_path / "cache" / "fashion-mnist", TEST, 3, fill=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    message = "is not a directory" if data_dir == "a-file" else f"looked for .* in {tmp_path / data_dir}"
    with pytest.raises(DatasetNotFoundError, match=message):
        load_split("fashion-mnist", "test", tmp_path / data_dir, download=False)


def test_both_splits_come_from_the_data_dir_or_not_at_all(tmp_path):
    write_idx_split(tmp_path / "data", TRAIN, 2, fill=1)
    write_idx_split(tmp_path / "data" / "fashion-mnist", TEST, 3, fill=1)  # a second copy below: not used
    write_idx_split(tmp_path / "system", TEST, 3, fill=2)
    assert len(load_split("fashion-mnist", "train", tmp_path / "data", download=False)) == 2
    with pytest.raises(DatasetNotFoundError, match=f"test split not found: .* in {tmp_path / 'data'}\\."):
        load_split("fashion-mnist", "test", tmp_path / "data", download=False)


def test_cache_dir_when_no_data_dir(tmp_path):
    write_idx_split(tmp_path / "cache" / "mnist", TEST, 5, fill=0)
    assert len(load_split("mnist", "test", None, download=False)) == 5


def test_images_and_labels_must_come_from_one_folder(tmp_path):
    # Images in data_dir and labels in the system folder are not combined (nor is the system copy used).
    data_dir = tmp_path / "data"
    write_idx_split(data_dir, TRAIN, 2, fill=1)
    (data_dir / f"{TRAIN[1]}.gz").unlink()
    write_idx_split(tmp_path / "system", TRAIN, 3, fill=2)
    with pytest.raises(DatasetNotFoundError, match="train split not found"):
        load_split("fashion-mnist", "train", data_dir, download=False)
    write_idx_split(tmp_path / "cache" / "fashion-mnist", TRAIN, 3, fill=2)
    (tmp_path / "cache" / "fashion-mnist" / f"{TRAIN[1]}.gz").unlink()
    assert len(load_split("fashion-mnist", "train", None, download=False)) == 3


def test_missing_fashion_mnist_message(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as err:
        load_split("fashion-mnist", "train", data_dir, download=False)
    assert isinstance(err.value, DatasetNotFoundError)
    msg = str(err.value)
    for needle in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        str(data_dir),
        str(data_dir / "fashion-mnist"),
        str(tmp_path / "system"),
        "apt-get install dataset-fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        "`data_dir`",
    ):
        assert needle in msg, needle


def test_missing_cifar_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("cifar100", "test", tmp_path / "d", download=False)
    msg = str(err.value)
    assert "cifar-100-python.tar.gz" in msg and str(tmp_path / "d") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("where", ["direct", "subfolder"])
def test_cifar_found_in_data_dir(tmp_path, packed, where):
    base = tmp_path / "data" if where == "direct" else tmp_path / "data" / "cifar10"
    base.mkdir(parents=True)
    batches = make_cifar("cifar10", 2, seed=0)
    if packed:
        write_cifar_archive(base / "cifar-10-python.tar.gz", "cifar10", batches)
    else:
        write_cifar_folder(base, "cifar10", batches)
    data = load_split("cifar10", "train", tmp_path / "data", download=False)
    assert tuple(data.images.shape) == (10, 3, 32, 32)
    assert data.images.reshape(10, -1)[:2].tolist() == batches["data_batch_1"][0].tolist()


def test_cifar_prefers_extracted_folder(tmp_path):
    write_cifar_folder(tmp_path, "cifar100", make_cifar("cifar100", 2, seed=0))
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"garbage that would fail to read")
    assert len(load_split("cifar100", "test", tmp_path, download=False)) == 2


def _serve(monkeypatch, tmp_path, name: str, files: dict[str, bytes], bad_md5: bool = False) -> None:
    """Point the canonical IDX source of ``name`` at a file:// folder holding ``files``."""
    remote = tmp_path / "remote"
    remote.mkdir()
    md5s = {}
    for stem, blob in files.items():
        (remote / f"{stem}.gz").write_bytes(blob)
        md5s[stem] = "f" * 32 if bad_md5 else hashlib.md5(blob).hexdigest()
    monkeypatch.setitem(splits._IDX_SOURCES, name, (remote.as_uri() + "/", md5s))


def _idx_blobs(tmp_path, stems, n):
    scratch = tmp_path / "scratch"
    write_idx_split(scratch, stems, n, fill=7)
    return {s: (scratch / f"{s}.gz").read_bytes() for s in stems}


def test_download_into_data_dir(tmp_path, monkeypatch):
    _serve(monkeypatch, tmp_path, "mnist", _idx_blobs(tmp_path, TEST, 6))
    data_dir = tmp_path / "data"
    data = load_split("mnist", "test", data_dir, download=True)
    assert len(data) == 6
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(f"{s}.gz" for s in TEST)
    # Second call finds the files without downloading.
    shutil.rmtree(tmp_path / "remote")
    assert len(load_split("mnist", "test", data_dir, download=True)) == 6


def test_download_into_cache_without_data_dir(tmp_path, monkeypatch):
    _serve(monkeypatch, tmp_path, "fashion-mnist", _idx_blobs(tmp_path, TRAIN, 2))
    assert len(load_split("fashion-mnist", "train", None, download=True)) == 2
    assert (tmp_path / "cache" / "fashion-mnist" / f"{TRAIN[0]}.gz").is_file()


def test_failed_download_is_not_found_error_and_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, tmp_path, "mnist", _idx_blobs(tmp_path, TEST, 2), bad_md5=True)
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("mnist", "test", data_dir, download=True)
    msg = str(err.value)
    assert "checksum mismatch" in msg and "download failed" in msg and "`data_dir`" in msg
    assert list(data_dir.iterdir()) == []


def test_cifar_download(tmp_path, monkeypatch):
    archive = write_cifar_archive(tmp_path / "remote.tar.gz", "cifar10", make_cifar("cifar10", 2, seed=1))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(splits._CIFAR_SOURCES, "cifar10", (archive.as_uri(), md5))
    assert len(load_split("cifar10", "test", tmp_path / "data")) == 2
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()


def test_label_out_of_range(tmp_path):
    write_idx_split(tmp_path, TEST, 2, fill=0, label=10)
    with pytest.raises(DatasetFormatError, match=r"0\.\.9.*10"):
        load_split("mnist", "test", tmp_path, download=False)


def test_bad_names():
    with pytest.raises(ValueError, match="make_loaders"):
        load_split("imagenet", "train")
    with pytest.raises(ValueError, match="'val'.*train, test"):
        load_split("mnist", "val")
    with pytest.raises(ValueError, match="'svhn'.*mnist, fashion-mnist"):
        load_split("svhn", "train")


REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(splits, "FASHION_MNIST_SYSTEM_DIR", REAL_FASHION_MNIST)
    for split, n in (("train", 60000), ("test", 10000)):
        data = load_split("fashion-mnist", split, None, download=False)
        assert tuple(data.images.shape) == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64
        # Fashion-MNIST is balanced: every class appears n/10 times.
        assert torch.bincount(data.labels, minlength=10).tolist() == [n // 10] * 10
        # Real images, not blank: mean intensity near the registry's 0.2860 * 255.
        assert abs(data.images.float().mean().item() / 255 - 0.2860) < 0.01
