"""Download a file and verify its md5 before it appears under its final name.

The bytes go to a temporary file in the destination directory, which is
renamed onto the destination (``os.replace``, atomic on one file system) only
once the checksum matches. A failed, interrupted or corrupted download
therefore never leaves a file that looks complete; the temporary file is
removed on every error path.
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
    """Hex md5 digest of the file at ``path``.

    Reads the file in 1 MiB chunks, so large archives need little memory.

    Raises:
        FileNotFoundError: there is no file at ``path`` (from :func:`open`).

    Example:
        The well-known digest of no bytes at all:

        >>> from pathlib import Path
        >>> _ = Path("empty.bin").write_bytes(b"")
        >>> mq.data.md5_file("empty.bin")
        'd41d8cd98f00b204e9800998ecf8427e'
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_url(url: str, dest: str | Path, md5: str | None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, verifying the md5 digest when ``md5`` is given.

    ``dest``'s directory is created if needed. An existing ``dest`` is replaced
    only by a download that passed verification.

    Args:
        url: any URL :func:`urllib.request.urlopen` opens (``https://``,
            ``http://``, ``file://``, ...).
        dest: final path of the file.
        md5: expected hex digest (either case), or None to skip the check.
        timeout: seconds to wait for the server before giving up.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ChecksumError: the downloaded bytes have another md5 (nothing is left on disk).
        DownloadError: the transfer failed, including a URL with an unknown scheme
            or none (nothing is left on disk).

    Example:
        A ``file://`` URL stands in for a server here:

        >>> from pathlib import Path
        >>> source = Path("published.bin"); _ = source.write_bytes(b"metaquant")
        >>> out = mq.data.download_url(source.resolve().as_uri(), "cache/copy.bin", md5=mq.data.md5_file(source))
        >>> str(out), out.read_bytes()
        ('cache/copy.bin', b'metaquant')
        >>> try:
        ...     mq.data.download_url("ftp//typo/file.gz", "cache/file.gz", md5=None)
        ... except mq.data.DownloadError as err:
        ...     print(err, sorted(p.name for p in Path("cache").iterdir()))
        download of ftp//typo/file.gz to cache/file.gz failed: unknown url type: 'ftp//typo/file.gz' ['copy.bin']
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
