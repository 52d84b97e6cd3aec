"""Exception types raised by :mod:`metaquant.data`.

Every data problem derives from :class:`DatasetError` so a caller (the CLI, a
training script) can catch "the data is not usable" in one place, while the
subclasses keep the standard-library meaning where one exists: missing data is
also a :class:`FileNotFoundError`, so code that only knows the builtin types
still handles it sensibly.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DownloadError",
]


class DatasetError(RuntimeError):
    """Base class: a data set could not be found, downloaded or parsed.

    Catch it to handle every data problem of :mod:`metaquant.data` in one place;
    the subclasses say which kind it was.

    Example:
        >>> try:
        ...     mq.data.load_split("mnist", "test", data_dir="no-such-dir", download=False)
        ... except mq.data.DatasetError as err:
        ...     print(type(err).__name__, "allow downloading" in str(err))
        DatasetNotFoundError True
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a data set are not where they were looked for.

    The message lists the locations searched and how to obtain the files. It is
    also a :class:`FileNotFoundError`, so code that knows only the builtin
    exceptions handles it too.

    Example:
        >>> try:
        ...     mq.data.read_cifar("missing.tar.gz", "cifar10", "test")
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__, err)
        DatasetNotFoundError missing.tar.gz does not exist (expected cifar-10-python.tar.gz or its folder ...)
    """


class DatasetFormatError(DatasetError):
    """A data file exists but is truncated, corrupt or not in the expected format.

    Example:
        An IDX file whose header announces 2x2x2 bytes but holds only 5:

        >>> import struct
        >>> from pathlib import Path
        >>> _ = Path("short-idx3-ubyte").write_bytes(struct.pack(">4I", 0x803, 2, 2, 2) + bytes(5))
        >>> try:
        ...     mq.data.read_idx_pair("short-idx3-ubyte", "labels-idx1-ubyte")
        ... except mq.data.DatasetFormatError as err:
        ...     print(err)
        short-idx3-ubyte: truncated: the header announces a 2x2x2 array, i.e. 24 bytes in all, but ... has 21 bytes
    """


class DownloadError(DatasetError):
    """A download failed (network error, interrupted transfer, bad checksum).

    Example:
        >>> try:
        ...     mq.data.download_url("nosuch://host/file.gz", "file.gz", md5=None)
        ... except mq.data.DownloadError as err:
        ...     print(err)
        download of nosuch://host/file.gz to file.gz failed: <urlopen error unknown url type: nosuch>
    """


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected md5 digest.

    Raised by :func:`~metaquant.data.download.download_url`, which then leaves
    nothing on disk; it is a :class:`DownloadError`, so one handler catches both.

    Example:
        >>> from pathlib import Path
        >>> _ = Path("payload.bin").write_bytes(b"some bytes")
        >>> try:
        ...     mq.data.download_url(Path("payload.bin").resolve().as_uri(), "copy.bin", md5="0" * 32)
        ... except mq.data.ChecksumError as err:
        ...     print(isinstance(err, mq.data.DownloadError), Path("copy.bin").exists())
        True False
    """
