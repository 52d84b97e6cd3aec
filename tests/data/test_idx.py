"""IDX reader against files written by an independent writer."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from metaquant.data import idx as idx_module
from metaquant.data.errors import DatasetFormatError
from metaquant.data.idx import read_idx, read_idx_images, read_idx_labels, read_idx_pair

from .formats import write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_exact(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6), dtype=np.uint8)  # H != W catches a transposition
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ip = write_idx(tmp_path / f"img{suffix}", images, gz=gz)
    lp = write_idx(tmp_path / f"lab{suffix}", labels, gz=gz)

    data = read_idx_pair(ip, lp)

    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert tuple(data.images.shape) == (7, 1, 5, 6)
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(data.labels.numpy(), labels.astype(np.int64))


def test_compression_detected_from_content_not_name(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw_named_gz = write_idx(tmp_path / "raw.gz", images, gz=False)
    gz_named_raw = write_idx(tmp_path / "packed", images, gz=True)
    np.testing.assert_array_equal(read_idx_images(raw_named_gz)[:, 0].numpy(), images)
    np.testing.assert_array_equal(read_idx_images(gz_named_raw)[:, 0].numpy(), images)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_payload_names_file_and_sizes(tmp_path, gz):
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    payload = (write_idx(tmp_path / "full", images, gz=False)).read_bytes()
    cut = payload[:-5]  # 16-byte header + 36 bytes expected, 31 present
    path = tmp_path / "cut"
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DatasetFormatError) as err:
        read_idx_images(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg
    assert str(16 + 36) in msg and str(len(cut)) in msg


def test_trailing_bytes_rejected(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint8), gz=False)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DatasetFormatError, match="trailing bytes"):
        read_idx_labels(path)


def test_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(bytes(range(256)) * 50)
    path = tmp_path / "broken.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError, match="broken.gz"):
        read_idx_images(path)


def test_wrong_magic(tmp_path):
    # A label file where an image file is expected: magic 0x801, not 0x803.
    path = write_idx(tmp_path / "labels-as-images", np.zeros(3, dtype=np.uint8), gz=True)
    with pytest.raises(DatasetFormatError) as err:
        read_idx_images(path)
    msg = str(err.value)
    assert "labels-as-images" in msg and "0x00000801" in msg and "0x00000803" in msg


def test_wrong_dtype_code(tmp_path):
    path = write_idx(tmp_path / "ints", np.zeros((1, 2, 2), dtype=np.uint8), gz=False, magic=0x00000C03)
    with pytest.raises(DatasetFormatError, match="type code 0x0c"):
        read_idx_images(path)


def test_not_idx_at_all(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(b"hello world, not an idx file")
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx_images(path)


def test_count_mismatch_names_both_files(tmp_path):
    ip = write_idx(tmp_path / "imgs", np.zeros((5, 2, 2), dtype=np.uint8), gz=False)
    lp = write_idx(tmp_path / "labs", np.zeros(4, dtype=np.uint8), gz=False)
    with pytest.raises(DatasetFormatError) as err:
        read_idx_pair(ip, lp)
    msg = str(err.value)
    assert "imgs" in msg and "labs" in msg and "5 images" in msg and "4 labels" in msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(5,), (4, 28, 28), (2, 3, 4, 5)])
def test_write_idx_matches_the_independent_writer_and_round_trips(tmp_path, shape, gz):
    values = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ours = idx_module.write_idx(tmp_path / "sub" / f"ours{suffix}", torch.from_numpy(values))
    theirs = write_idx(tmp_path / f"theirs{suffix}", values, gz=gz)
    # gzip headers carry a timestamp, so compare the decompressed payloads.
    read = gzip.decompress if gz else (lambda b: b)
    assert read(ours.read_bytes()) == read(theirs.read_bytes())
    assert np.array_equal(read_idx(ours, 0x0800 | len(shape)), values)


def test_write_idx_refuses_values_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="dtype float32, expected uint8"):
        idx_module.write_idx(tmp_path / "x", torch.zeros(3))
    with pytest.raises(ValueError, match="0 dimensions"):
        idx_module.write_idx(tmp_path / "x", np.uint8(3))
