"""Writers for the real on-disk formats, implemented independently of metaquant.data.

The tests use these to produce small files in the exact official formats (IDX,
pickled CIFAR batches, tar.gz archives) and check the readers against them.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, *, gz: bool, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the header's magic number."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def cifar_row(image: np.ndarray) -> np.ndarray:
    """The 3072-byte row of one [3, 32, 32] image: all red pixels row by row, then green, then blue."""
    row = np.empty(3072, dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            for x in range(32):
                row[c * 1024 + y * 32 + x] = image[c, y, x]
    return row


def cifar_batch_bytes(rows: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """A pickled batch dict as in the official python version (protocol 2, bytes keys)."""
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        label_key: list(labels),
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    return pickle.dumps(batch, protocol=2)


CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def make_cifar(variant: str, n_per_batch: int, seed: int) -> dict[str, tuple[np.ndarray, list[int], bytes]]:
    """Random batches for every file of ``variant``: name -> (rows [n, 3072], labels, pickled bytes)."""
    _, train, test, key, classes = CIFAR_FILES[variant]
    rng = np.random.default_rng(seed)
    out = {}
    for name in train + test:
        rows = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n_per_batch).tolist()
        out[name] = (rows, labels, cifar_batch_bytes(rows, labels, key))
    return out


def write_cifar_folder(root: Path, variant: str, batches: dict) -> Path:
    folder = root / CIFAR_FILES[variant][0]
    folder.mkdir(parents=True)
    for name, (_, _, raw) in batches.items():
        (folder / name).write_bytes(raw)
    return folder


def write_cifar_archive(path: Path, variant: str, batches: dict) -> Path:
    folder = CIFAR_FILES[variant][0]
    with tarfile.open(path, "w:gz") as tar:
        for name, (_, _, raw) in batches.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path
