"""CIFAR-10 / CIFAR-100 reader against batches written in the official pickle format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from metaquant.data.cifar import read_cifar
from metaquant.data.errors import DatasetFormatError, DatasetNotFoundError

from .formats import CIFAR_FILES, cifar_batch_bytes, cifar_row, make_cifar, write_cifar_archive, write_cifar_folder


def expected(batches, names):
    """Oracle: pixel (c, y, x) of image i is byte c*1024 + y*32 + x of its row."""
    rows = np.concatenate([batches[n][0] for n in names])
    labels = np.concatenate([batches[n][1] for n in names]).astype(np.int64)
    images = np.empty((len(rows), 3, 32, 32), dtype=np.uint8)
    for i, row in enumerate(rows):
        for c in range(3):
            for y in range(32):
                images[i, c, y, :] = row[c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return images, labels


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_exact(tmp_path, variant, packed, split):
    batches = make_cifar(variant, n_per_batch=3, seed=len(variant) * 10 + len(split))
    if packed:
        source = write_cifar_archive(tmp_path / "cifar.tar.gz", variant, batches)
    else:
        source = write_cifar_folder(tmp_path, variant, batches)
    _, train, test, _, _ = CIFAR_FILES[variant]
    names = train if split == "train" else test

    data = read_cifar(source, variant, split)

    images, labels = expected(batches, names)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert tuple(data.images.shape) == (3 * len(names), 3, 32, 32)
    np.testing.assert_array_equal(data.images.numpy(), images)
    np.testing.assert_array_equal(data.labels.numpy(), labels)


def test_writer_oracle_agrees_with_channel_planes():
    # Guards the test's own oracle: a row built image-by-image with cifar_row
    # reads back as the same CHW image.
    image = np.random.default_rng(3).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    row = cifar_row(image)
    batches = {"b": (row[None], [0], b"")}
    np.testing.assert_array_equal(expected(batches, ["b"])[0][0], image)


def test_reads_image_built_from_known_planes(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    raw = cifar_batch_bytes(cifar_row(image)[None], [7], b"labels")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw)
    data = read_cifar(folder, "cifar10", "test")
    np.testing.assert_array_equal(data.images[0].numpy(), image)
    assert data.labels.tolist() == [7]


def test_missing_batch_in_folder(tmp_path):
    batches = make_cifar("cifar10", 2, seed=0)
    folder = write_cifar_folder(tmp_path, "cifar10", batches)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        read_cifar(folder, "cifar10", "train")
    # The test split does not need that file.
    assert len(read_cifar(folder, "cifar10", "test")) == 2


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        read_cifar(tmp_path / "nope", "cifar100", "train")


def test_truncated_archive(tmp_path):
    batches = make_cifar("cifar100", 200, seed=1)
    path = write_cifar_archive(tmp_path / "c100.tar.gz", "cifar100", batches)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DatasetFormatError) as err:
        read_cifar(path, "cifar100", "test")
    assert "c100.tar.gz" in str(err.value) and "truncated" in str(err.value)


def test_not_an_archive(tmp_path):
    path = tmp_path / "c10.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(100))
    with pytest.raises(DatasetFormatError, match="c10.tar.gz"):
        read_cifar(path, "cifar10", "train")


def test_archive_of_other_variant(tmp_path):
    path = write_cifar_archive(tmp_path / "c.tar.gz", "cifar10", make_cifar("cifar10", 1, seed=0))
    with pytest.raises(DatasetFormatError, match="cifar-100-python/train"):
        read_cifar(path, "cifar100", "train")


def test_corrupt_pickle(tmp_path):
    folder = write_cifar_folder(tmp_path, "cifar10", make_cifar("cifar10", 2, seed=0))
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetFormatError, match="test_batch"):
        read_cifar(folder, "cifar10", "test")


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "expected keys"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"uint8 \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}, r"uint8 \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "one per image"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"0\.\.9"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_bad_batch_content(tmp_path, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match=message):
        read_cifar(folder, "cifar10", "test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickle_with_foreign_global_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="refusing to load global"):
        read_cifar(folder, "cifar10", "test")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_batch_pickled_by_python3_at_any_protocol_reads(tmp_path, protocol):
    # A user's own CIFAR-format batch, written with pickle.dump (protocol 5 by default).
    rows = np.random.default_rng(protocol).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": [3, 9]}, protocol=protocol))
    data = read_cifar(folder, "cifar10", "test")
    assert data.images.reshape(2, -1).tolist() == rows.tolist() and data.labels.tolist() == [3, 9]


def test_numpy1_style_pickle(tmp_path):
    # Pickles written by numpy 1.x (like the official files) name numpy.core.multiarray.
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    raw = cifar_batch_bytes(rows, [1, 2], b"labels").replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw)
    data = read_cifar(folder, "cifar10", "test")
    assert data.images.reshape(2, -1).tolist() == rows.tolist()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'cifar1000'"):
        read_cifar(tmp_path, "cifar1000", "train")
    with pytest.raises(ValueError, match="'val'"):
        read_cifar(tmp_path, "cifar10", "val")
