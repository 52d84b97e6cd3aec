"""Reader for the "python version" of CIFAR-10 and CIFAR-100.

The official distribution is a tar.gz archive of pickled batches; each batch is a dict with bytes keys:
``b"data"`` (uint8 ``[N, 3072]``, each row the red, green and blue 32x32 planes in turn, i.e. CHW row-major)
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). Either the archive (read as a stream, nothing
extracted) or the folder that extracting it produces is read. The pickles are loaded with an unpickler that
resolves only the globals a numpy array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetFormatError, DatasetNotFoundError
from .tensors import ImageTensors

__all__ = ["CIFAR_LAYOUTS", "CifarLayout", "read_cifar"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps its batches inside the archive / folder."""

    archive: str  # official archive file name
    folder: str  # top-level folder inside the archive
    train: tuple[str, ...]  # batch files of the training split
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR_LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

_IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only what a pickled numpy array refers to."""

    # (module, name) pairs; numpy 1.x pickles say numpy.core, numpy 2.x numpy._core,
    # and pickles written by Python 3 with protocol < 3 encode bytes via _codecs.
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        # protocol 5 (Python's default): an array is rebuilt from its bytes by _frombuffer
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch only holds numpy arrays and lists"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # Resolve the numpy 1.x name without touching the deprecated numpy.core alias.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        # encoding="bytes": the official batches were pickled by Python 2, whose str
        # keys and raw array buffers must stay bytes.
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on garbage input
        raise DatasetFormatError(f"{where}: not a readable CIFAR batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _parse_batch(raw: bytes, where: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,3,32,32], labels int64 [N]) of one pickled batch."""
    batch = _unpickle(raw, where)
    if b"data" not in batch or layout.label_key not in batch:
        found = ", ".join(sorted(repr(k) for k in batch))
        raise DatasetFormatError(f"{where}: expected keys b'data' and {layout.label_key!r}, found {found}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetFormatError(f"{where}: b'data' must be uint8 [N, {_ROW}], found {data.dtype} {list(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{where}: {layout.label_key!r} must be {data.shape[0]} integers (one per image), "
            f"found {labels.dtype} {list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetFormatError(
            f"{where}: labels must lie in 0..{layout.num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    # Each row is the R, G, B planes in turn, so a C-order reshape gives CHW directly.
    return data.reshape(-1, *_IMAGE_SHAPE), labels.astype(np.int64)


def _read_members_from_archive(archive: Path, names: list[str]) -> dict[str, bytes]:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = {m.name: m for m in tar.getmembers()}
            missing = [n for n in names if n not in members]
            if missing:
                raise DatasetFormatError(
                    f"{archive}: archive lacks {', '.join(missing)}; expected the official "
                    "archive of the CIFAR python version"
                )
            out = {}
            # Read in archive order: backwards seeks in a gzip stream restart decompression.
            for name in sorted(names, key=lambda n: members[n].offset_data):
                f = tar.extractfile(members[name])
                if f is None:
                    raise DatasetFormatError(f"{archive}: member {name} is not a regular file")
                out[name] = f.read()
            return out
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetFormatError(
            f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc}); delete it and download it again"
        ) from exc


def read_cifar(source: str | Path, variant: str, split: str) -> ImageTensors:
    """Read one split of CIFAR-10 / CIFAR-100 from the official archive or its extracted top-level folder.

    Returns images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]`` (CIFAR-100: the fine labels); the training
    split concatenates the five CIFAR-10 batches in order.

    Raises:
        ValueError: unknown ``variant`` or ``split``.
        DatasetNotFoundError: ``source`` or a batch file inside the folder is missing.
        DatasetFormatError: a corrupt archive or batch, wrong keys, shape or labels, or a pickle that refers to a
            global a numpy array does not need (refused without running it).

    Example:
        A folder with one tiny ``test_batch`` in the official format (a protocol-2 pickle of a dict with bytes
        keys) whose rows are the R, G, B planes in turn:

        >>> import pickle
        >>> from pathlib import Path
        >>> folder = Path("cifar-10-batches-py"); folder.mkdir()
        >>> rows = (torch.arange(2 * 3072) // 1024 % 3).to(torch.uint8).reshape(2, 3072)
        >>> batch = {b"batch_label": b"testing batch 1 of 1", b"data": rows.numpy(), b"labels": [3, 8]}
        >>> _ = (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
        >>> data = mq.data.read_cifar(folder, "cifar10", "test")
        >>> data.images.shape, data.labels.tolist(), data.images[0, :, 5, 7].tolist()
        (torch.Size([2, 3, 32, 32]), [3, 8], [0, 1, 2])
    """
    if variant not in CIFAR_LAYOUTS:
        raise ValueError(f"unknown CIFAR variant {variant!r}; expected one of {', '.join(CIFAR_LAYOUTS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    layout = CIFAR_LAYOUTS[variant]
    files = layout.train if split == "train" else layout.test
    source = Path(source)

    if source.is_dir():
        raws = {}
        for name in files:
            path = source / name
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{path} is missing; {source} should hold {', '.join(layout.train + layout.test)} "
                    f"as extracted from {layout.archive}"
                )
            raws[name] = path.read_bytes()
        wheres = {name: str(source / name) for name in files}
    elif source.is_file():
        members = [f"{layout.folder}/{name}" for name in files]
        by_member = _read_members_from_archive(source, members)
        raws = {name: by_member[m] for name, m in zip(files, members)}
        wheres = {name: f"{source}:{m}" for name, m in zip(files, members)}
    else:
        raise DatasetNotFoundError(
            f"{source} does not exist (expected {layout.archive} or its folder {layout.folder}/)"
        )

    parts = [_parse_batch(raws[name], wheres[name], layout) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    logger.debug("read %s %s: %d images from %s", variant, split, len(labels), source)
    return ImageTensors(images=torch.from_numpy(images), labels=torch.from_numpy(labels))
