"""Reader (and writer) for the IDX files of MNIST and Fashion-MNIST.

IDX is a tiny big-endian format: a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one uint32 per dimension, then the payload in C order. Gzip compression is detected from the
content, not the file name, so a decompressed file that kept its ``.gz`` name still reads.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetFormatError
from .tensors import ImageTensors

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_idx_pair",
    "write_idx",
]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# Type code 0x08 is "unsigned byte", the only type MNIST-style data sets use.
_UBYTE = 0x08
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N)


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (gzip or raw)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return f.read()
            with gzip.GzipFile(fileobj=f) as gz:
                return gz.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetFormatError(
            f"{path}: corrupt or truncated gzip stream ({exc}); delete the file and download it again"
        ) from exc


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file whose magic number must equal ``magic``, as a read-only uint8 array.

    Raises:
        DatasetFormatError: wrong magic number, type code or dimension count, or a payload whose length differs
            from the one the header announces.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetFormatError(f"{path}: {len(data)} bytes, too short to be an IDX file")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        zero, type_code, ndim = found >> 16, (found >> 8) & 0xFF, found & 0xFF
        detail = []
        if zero != 0:
            detail.append("the first two bytes are not zero, so this is not an IDX file")
        if type_code != _UBYTE:
            detail.append(f"type code 0x{type_code:02x} instead of 0x{_UBYTE:02x} (unsigned byte)")
        if ndim != magic & 0xFF:
            detail.append(f"{ndim} dimensions instead of {magic & 0xFF}")
        raise DatasetFormatError(
            f"{path}: IDX magic number 0x{found:08x}, expected 0x{magic:08x} ({'; '.join(detail)})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{path}: truncated header: expected {header} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        shape = "x".join(map(str, dims))
        raise DatasetFormatError(
            f"{path}: {'truncated' if len(data) < expected else 'trailing bytes'}: the header "
            f"announces a {shape} array, i.e. {expected} bytes in all, but the (decompressed) "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> torch.Tensor:
    """Images of an ``idx3-ubyte`` file as uint8 ``[N, 1, H, W]``."""
    array = read_idx(path, IDX_IMAGES_MAGIC)
    # copy(): the array views an immutable bytes object, and torch wants writable memory.
    return torch.from_numpy(array.copy()).unsqueeze(1)


def read_idx_labels(path: str | Path) -> torch.Tensor:
    """Labels of an ``idx1-ubyte`` file as int64 ``[N]``."""
    return torch.from_numpy(read_idx(path, IDX_LABELS_MAGIC).astype(np.int64))


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> ImageTensors:
    """One split from its image (``idx3-ubyte``) and label (``idx1-ubyte``) files, gzip-compressed or not.

    Returns images uint8 ``[N, 1, H, W]`` and labels int64 ``[N]``.

    Raises:
        DatasetFormatError: a malformed file (magic number, gzip stream, payload length), or different counts.
        FileNotFoundError: either file does not exist.

    Example:
        Two tiny files in the real format, the images gzip-compressed:

        >>> import gzip, struct
        >>> pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
        >>> with gzip.open("images-idx3-ubyte.gz", "wb") as f:
        ...     _ = f.write(struct.pack(">4I", 0x803, 3, 28, 28) + pixels.numpy().tobytes())
        >>> with open("labels-idx1-ubyte", "wb") as f:
        ...     _ = f.write(struct.pack(">2I", 0x801, 3) + bytes([7, 2, 1]))
        >>> data = mq.data.read_idx_pair("images-idx3-ubyte.gz", "labels-idx1-ubyte")
        >>> data.images.shape, data.labels.tolist(), torch.equal(data.images[:, 0], pixels)
        (torch.Size([3, 1, 28, 28]), [7, 2, 1], True)
    """
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same split"
        )
    logger.debug("read %d images %s from %s", images.shape[0], tuple(images.shape[1:]), images_path)
    return ImageTensors(images=images, labels=labels)


def write_idx(path: str | Path, values: torch.Tensor | np.ndarray) -> Path:
    """Write uint8 ``values`` (images ``[N, H, W]``, labels ``[N]``) as an IDX file, gzip-compressed for ``.gz``.

    A data set of your own (or a stand-in for a test) then reads with ``load_split`` like MNIST. Missing parent
    directories are created; ``path`` is replaced if it exists.

    Raises:
        TypeError: ``values`` is not uint8.
        ValueError: ``values`` has no dimension or more than 255.

    Example:
        >>> images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
        >>> _ = mq.data.write_idx("digits/t10k-images-idx3-ubyte.gz", images)
        >>> _ = mq.data.write_idx("digits/t10k-labels-idx1-ubyte", torch.tensor([7, 2, 1], dtype=torch.uint8))
        >>> data = mq.data.read_idx_pair("digits/t10k-images-idx3-ubyte.gz", "digits/t10k-labels-idx1-ubyte")
        >>> torch.equal(data.images[:, 0], images), data.labels.tolist()
        (True, [7, 2, 1])
    """
    array = values.numpy(force=True) if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.dtype != np.uint8:
        raise TypeError(f"IDX files here hold unsigned bytes: values have dtype {array.dtype}, expected uint8")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"values have {array.ndim} dimensions; an IDX file holds 1 to 255")
    path = Path(path)
    payload = (
        struct.pack(">I", (_UBYTE << 8) | array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + np.ascontiguousarray(array).tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path
