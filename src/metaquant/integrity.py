"""File integrity: a content digest written into each checkpoint and exported model, and a check before any use.

``torch.save`` writes a zip archive whose entries carry CRC-32 checksums, but ``torch.load`` does not check
them: a checkpoint with flipped bytes inside a tensor loads without a word and silently changes the weights.
``with_digest`` appends one more entry to the archive, ``<archive>/.metaquant-digest``, holding the SHA-256 of
every other entry (name and bytes, in archive order); ``torch.load`` ignores it. ``verify_checkpoint_bytes``
reads every entry (``zipfile`` checks each CRC) and compares the digest, so damage anywhere in the file is
found before the checkpoint is used.

Checkpoints written without a digest (earlier versions, other programs) are checked by their CRCs alone; files
that are not zip archives (torch's legacy format) cannot be checked and are left to ``torch.load``.

Exported models (packed safetensors files, ONNX files) carry their digest in their own metadata: the exporter
writes ``DIGEST_PLACEHOLDER`` there, and ``seal`` replaces it by the SHA-256 of the whole file as written with
the placeholder (same length: nothing else moves). ``verify_seal`` puts the placeholder back and compares.
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
    """A checkpoint file's bytes are not those that were written: a CRC or the content digest disagrees, or the
    archive is cut short (then ``truncated`` is True). A ``ValueError``; the message names the file and what is
    wrong.

    Args:
        message: what is wrong, naming the file.
        truncated: the archive is incomplete, rather than complete with wrong bytes.

    Example:
        >>> from metaquant.integrity import CheckpointDamagedError, verify_checkpoint_bytes
        >>> try:
        ...     verify_checkpoint_bytes(b"PK\\x03\\x04 and then nothing", "half.pt")
        ... except CheckpointDamagedError as err:
        ...     print(isinstance(err, ValueError), err)
        True checkpoint half.pt is corrupt or truncated (not a complete zip archive: ...)
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
    """``data`` (a ``torch.save`` archive) with the digest entry appended; other bytes are returned as they are.

    The existing entries are not moved (torch's alignment of tensor data is kept), so the result loads with
    ``torch.load`` exactly as ``data`` does.

    Args:
        data: the bytes ``torch.save`` wrote to a buffer.

    Returns:
        The archive with its digest entry (or ``data`` itself when it is not a zip archive).

    Example:
        >>> import io
        >>> from metaquant.integrity import verify_checkpoint_bytes, with_digest
        >>> buffer = io.BytesIO(); torch.save({"w": torch.arange(4.0)}, buffer)
        >>> sealed = with_digest(buffer.getvalue())
        >>> verify_checkpoint_bytes(sealed, "sealed.pt"), torch.load(io.BytesIO(sealed))["w"].tolist()
        ('digest', [0.0, 1.0, 2.0, 3.0])
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
    """Check a checkpoint's bytes: every entry's CRC-32 and, when present, the content digest.

    Args:
        data: the whole file.
        name: the file's name, for messages.

    Returns:
        What was checked: ``"digest"`` (CRCs and digest), ``"crc"`` (an archive without digest: CRCs only) or
        ``"unchecked"`` (not a zip archive at all: torch's legacy format, or not a checkpoint; ``torch.load``
        decides).

    Raises:
        CheckpointDamagedError: a CRC or the digest disagrees, or the archive is cut short.

    Example:
        Flip one byte inside a tensor's data: the zip's CRC catches it (``torch.load`` alone would not):

        >>> import io, zipfile
        >>> from metaquant.integrity import CheckpointDamagedError, verify_checkpoint_bytes, with_digest
        >>> buffer = io.BytesIO(); torch.save({"w": torch.zeros(256)}, buffer)
        >>> good = with_digest(buffer.getvalue())
        >>> bad = bytearray(good); bad[good.index(bytes(64)) + 10] ^= 0xFF
        >>> torch.load(io.BytesIO(bytes(bad)))["w"].abs().max() > 0  # loads, with a changed weight
        tensor(True)
        >>> try:
        ...     verify_checkpoint_bytes(bytes(bad), "checkpoint.pt")
        ... except CheckpointDamagedError as err:
        ...     print(err)
        checkpoint checkpoint.pt is damaged: Bad CRC-32 for file 'archive/data/0'
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
    """The bytes of the checkpoint file ``path``, after ``verify_checkpoint_bytes``.

    Reading once and loading from the returned bytes (``torch.load(io.BytesIO(...))``) means the bytes checked
    are the bytes used.

    Args:
        path: the checkpoint file.

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: no such file.
        CheckpointDamagedError: as ``verify_checkpoint_bytes``.
        OSError: the file cannot be read.

    Example:
        >>> import io, pathlib
        >>> from metaquant.integrity import read_verified, with_digest
        >>> buffer = io.BytesIO(); torch.save({"epoch": 3}, buffer)
        >>> _ = pathlib.Path("ok.pt").write_bytes(with_digest(buffer.getvalue()))
        >>> torch.load(io.BytesIO(read_verified("ok.pt")), weights_only=True)
        {'epoch': 3}
    """
    data = Path(path).read_bytes()
    verify_checkpoint_bytes(data, path)
    return data


def seal(data: bytes) -> bytes:
    """``data``, holding ``DIGEST_PLACEHOLDER`` once, with the placeholder replaced by ``sha256:`` and the SHA-256
    of ``data`` (in hex, the same length).

    Args:
        data: a file's bytes, with the placeholder where its digest goes.

    Returns:
        The bytes to write.

    Raises:
        ValueError: ``data`` does not hold the placeholder exactly once.

    Example:
        >>> from metaquant.integrity import DIGEST_PLACEHOLDER, seal, verify_seal
        >>> sealed = seal(b'{"digest": "' + DIGEST_PLACEHOLDER.encode() + b'", "weights": [1, 0, 1]}')
        >>> digest = sealed[12:83].decode()
        >>> verify_seal(sealed, digest, "file"), digest[:15]
        (None, 'sha256:bf98d31a')
        >>> verify_seal(sealed.replace(b"[1, 0, 1]", b"[1, 1, 1]"), digest, "file")
        Traceback (most recent call last):
        ...
        ValueError: file is damaged: its content digest does not match its data (the file changed after it was written)
    """
    placeholder = DIGEST_PLACEHOLDER.encode()
    if data.count(placeholder) != 1:
        raise ValueError(f"seal needs the digest placeholder exactly once in the data, found {data.count(placeholder)}")
    return data.replace(placeholder, _PREFIX + hashlib.sha256(data).hexdigest().encode())


def verify_seal(data: bytes, digest: str, name: str | Path) -> None:
    """Check bytes written by ``seal``: ``digest`` (read from the file's metadata) is the SHA-256 of ``data`` with
    the placeholder in its place.

    Args:
        data: the whole file.
        digest: the digest the file holds, ``sha256:`` and 64 hex digits.
        name: the file's name, for the message.

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
