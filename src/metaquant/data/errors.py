"""Exception types raised by :mod:`metaquant.data`.

Every data problem derives from :class:`DatasetError`, so a caller catches "the data is not usable" in one
place; the subclasses keep the standard-library meaning where one exists (missing data is also a
:class:`FileNotFoundError`).
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
    """Base class: a data set could not be found, downloaded or parsed."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a data set are not where they were looked for; the message lists the locations searched
    and how to obtain the files."""


class DatasetFormatError(DatasetError):
    """A data file exists but is truncated, corrupt or not in the expected format."""


class DownloadError(DatasetError):
    """A download failed (network error, interrupted transfer, bad checksum)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected md5 digest (nothing is left on disk)."""
