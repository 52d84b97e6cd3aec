"""File integrity: a content digest written into each checkpoint and exported model, and a check before any use.

``torch.load`` does not check the CRC-32s of the zip archive ``torch.save`` writes, so flipped bytes inside a
tensor load silently. ``with_digest`` appends an entry ``<archive>/.metaquant-digest`` with the SHA-256 of every
other entry (name and bytes, in archive order), which ``torch.load`` ignores; ``verify_checkpoint_bytes`` reads
every entry (checking each CRC) and compares the digest. Archives without a digest are checked by their CRCs
alone; files that are not zip archives (torch's legacy format) are left to ``torch.load``.

Exported models carry their digest in their own metadata: the exporter writes ``DIGEST_PLACEHOLDER``, ``seal``
replaces it by the SHA-256 of the file as written (same length: nothing moves), ``verify_seal`` puts it back and
compares.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

__all__ = [
    "CheckpointDamagedError",
    "DIGEST_ENTRY",
    "with_digest",
    "verify_checkpoint_bytes",
    "read_verified",
    "DIGEST_PLACEHOLDER",
    "seal",
    "verify_seal",
]

#: Name of the digest entry, inside the archive's top folder (``archive/.metaquant-digest``).
DIGEST_ENTRY = ".metaquant-digest"
_PREFIX = b"sha256:"
#: What an exporter writes where the file's digest goes; ``seal`` replaces it.
DIGEST_PLACEHOLDER = "sha256:" + "0" * 64


class CheckpointDamagedError(ValueError):
    """A checkpoint's bytes are not those written: a CRC or the digest disagrees, or the archive is cut short
    (``truncated``). A ``ValueError`` whose message names the file.
    """

    def __init__(self, message: str, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def _digest(archive: zipfile.ZipFile, skip: str | None) -> str:
    h = hashlib.sha256()
    for info in archive.infolist():
        if info.filename == skip:
            continue
        data = archive.read(info)  # zipfile checks the entry's CRC-32 here
        h.update(info.filename.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _digest_name(archive: zipfile.ZipFile) -> str:
    first = archive.namelist()[0]
    top = first.split("/", 1)[0] if "/" in first else ""
    return f"{top}/{DIGEST_ENTRY}" if top else DIGEST_ENTRY


def with_digest(data: bytes) -> bytes:
    """``data`` (a ``torch.save`` archive) with the digest entry appended; bytes that are no zip archive as they are.

    The existing entries do not move (torch's alignment of tensor data is kept): it loads exactly as ``data``.
    """
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        name = _digest_name(archive)
        digest = _digest(archive, skip=name)
        archive.writestr(name, _PREFIX + digest.encode())
    return buffer.getvalue()


def verify_checkpoint_bytes(data: bytes, name: str | Path) -> str:
    """Check a checkpoint's CRC-32s and, when present, its digest; what was checked: ``"digest"``, ``"crc"`` (no
    digest) or ``"unchecked"`` (not a zip archive; ``torch.load`` decides).

    Raises:
        CheckpointDamagedError: a CRC or the digest disagrees, or the archive is cut short.
    """
    stream = io.BytesIO(data)
    if not data.startswith(b"PK") and not zipfile.is_zipfile(stream):
        return "unchecked"
    try:
        with zipfile.ZipFile(stream) as archive:
            names = archive.namelist()
            if not names:
                raise CheckpointDamagedError(f"checkpoint {name} is damaged: an empty archive")
            digest_name = _digest_name(archive)
            actual = _digest(archive, skip=digest_name)
            if digest_name not in names:
                return "crc"
            stored = archive.read(digest_name)
    except CheckpointDamagedError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError, OSError) as err:
        # zipfile reports a bad CRC as "Bad CRC-32 for file ..." and a cut archive in several ways
        if "CRC" in str(err):
            raise CheckpointDamagedError(f"checkpoint {name} is damaged: {err}") from None
        raise CheckpointDamagedError(
            f"checkpoint {name} is corrupt or truncated (not a complete zip archive: {type(err).__name__}: {err})",
            truncated=True,
        ) from None
    if stored != _PREFIX + actual.encode():
        raise CheckpointDamagedError(f"checkpoint {name} is damaged: its content digest does not match its data")
    return "digest"


def read_verified(path: str | Path) -> bytes:
    """The bytes of the checkpoint file ``path``, after ``verify_checkpoint_bytes``: load from them
    (``torch.load(io.BytesIO(...))``) so that the bytes checked are the bytes used.

    Raises:
        CheckpointDamagedError: as ``verify_checkpoint_bytes``.
    """
    data = Path(path).read_bytes()
    verify_checkpoint_bytes(data, path)
    return data


def seal(data: bytes) -> bytes:
    """``data`` with its one ``DIGEST_PLACEHOLDER`` replaced by ``sha256:`` and the SHA-256 of ``data`` (same length).

    Raises:
        ValueError: ``data`` does not hold the placeholder exactly once.
    """
    placeholder = DIGEST_PLACEHOLDER.encode()
    if data.count(placeholder) != 1:
        raise ValueError(f"seal needs the digest placeholder exactly once in the data, found {data.count(placeholder)}")
    return data.replace(placeholder, _PREFIX + hashlib.sha256(data).hexdigest().encode())


def verify_seal(data: bytes, digest: str, name: str | Path) -> None:
    """Check bytes written by ``seal``: ``digest`` (from the file's metadata) is the SHA-256 of ``data`` with the
    placeholder in its place.

    Raises:
        ValueError: the digest does not match, or is not one (the message names the file).
    """
    value = digest.encode()
    if not (value.startswith(_PREFIX) and len(value) == len(DIGEST_PLACEHOLDER)) or data.count(value) != 1:
        raise ValueError(f"{name} is damaged: its content digest {digest[:80]!r} is not one this file holds")
    restored = data.replace(value, DIGEST_PLACEHOLDER.encode())
    if _PREFIX + hashlib.sha256(restored).hexdigest().encode() != value:
        raise ValueError(
            f"{name} is damaged: its content digest does not match its data (the file changed after it was written)"
        )
