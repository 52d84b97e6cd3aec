"""Download a file and verify its md5 before it appears under its final name.

The bytes go to a temporary file in the destination directory, renamed onto the destination (atomic on one
file system) only once the checksum matches; every error path removes it, so a failed, interrupted or
corrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from urllib.request import urlopen

from .errors import ChecksumError, DownloadError

__all__ = ["download_url", "md5_file"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def md5_file(path: str | Path) -> str:
    """Hex md5 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_url(url: str, dest: str | Path, md5: str | None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` (anything ``urlopen`` opens) to ``dest``, verifying the md5 when ``md5`` is given.

    ``dest``'s directory is created if needed; an existing ``dest`` is replaced only by a verified download.

    Raises:
        ChecksumError: the downloaded bytes have another md5 (nothing is left on disk).
        DownloadError: the transfer failed, or the URL has an unknown scheme or none (nothing is left on disk).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError) as exc:
            # OSError: URLError, HTTPError, timeouts and disk errors; ValueError: a URL without a scheme.
            raise DownloadError(f"download of {url} to {dest} failed: {exc}") from exc
        actual = digest.hexdigest()
        if md5 is not None and actual != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {actual}; the "
                "download was discarded (a proxy error page or a changed file upstream?)"
            )
        # mkstemp creates the file private (0600); a data file should be readable by others.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-transfer must not leave the partial file.
        tmp.unlink(missing_ok=True)
        raise
    return dest
