"""Crash-safe files: atomic writes, and checkpoints that carry a digest and keep their predecessor.

A crash leaves either the old or the new version of a file, never half of one: the bytes go to a temporary
file in the same directory, are flushed to disk, then renamed over the target. A checkpoint carries a content
digest (``integrity.with_digest``), verified before use; the one it replaces is kept as ``<name>.prev<suffix>``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import secrets
from collections.abc import Mapping
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch

from .integrity import CheckpointDamagedError, read_verified, with_digest

__all__ = [
    "atomic_write_bytes",
    "atomic_write_files",
    "temporary_files",
    "previous_checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)


#: What marks the temporary files this module writes: ``.<name>.<random>`` + this suffix, beside ``<name>``.
TEMPORARY_SUFFIX = ".metaquant.tmp"


def temporary_files(path: str | Path) -> list[Path]:
    """The temporary files that writes of ``path`` left behind (a write that a kill interrupted); never a
    complete file, so safe to remove. Other files, a user's ``.*.tmp`` included, are not listed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*{TEMPORARY_SUFFIX}"))


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, created with mode 0o666 less the umask, as ``open`` creates files
    (``tempfile.mkstemp`` makes them 0o600, and the rename would keep that mode)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))  # pragma: no cover


def atomic_write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (whose directory must exist) so that readers see the old file or the new one.

    On failure the temporary file is removed and ``path`` is as it was. The mode follows the umask. With
    ``exclusive``, ``path`` is created only if absent, atomically: of two processes, exactly one succeeds.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (it is left as it was).
        OSError: the directory is missing or cannot be written (e.g. a full disk); its ``filename`` is ``path``.
    """
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        if exclusive:
            os.link(tmp, path)  # fails if path exists, unlike a rename
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_files(contents: Mapping[Path, bytes]) -> None:
    """Write several files that belong together (a table as Markdown and CSV): every new version is complete on
    disk before the first one replaces its old file, so a failure (a full disk) leaves all the old ones.

    Raises:
        OSError: a file cannot be written; none was replaced.
    """
    written: list[tuple[str, Path]] = []
    try:
        for path, data in contents.items():
            written.append((_write_temporary(Path(path), data), Path(path)))
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in written:  # renames need no space: once the data is on disk, these do not fail for it
        os.replace(tmp, path)


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, flushed to disk; its name. Nothing is left on failure."""
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            # fsync and write report a full disk without a file name: say which file could not be written
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
        raise
    return tmp


def previous_checkpoint_path(path: str | Path) -> Path:
    """Where ``save_checkpoint`` keeps the checkpoint before ``path``: ``<stem>.prev<suffix>``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` with a content digest, atomically; the current checkpoint becomes ``<name>.prev.pt``.

    The previous checkpoint is a verified copy, not a link, so at every instant both files are complete. A
    current checkpoint that fails verification is replaced without being copied, with a warning. ``state`` holds
    at least ``model``, ``optimizer``, ``trainer``, ``rng`` and ``epoch``.

    Raises:
        OSError: a file cannot be written (the checkpoints already there are kept as they were).

    Example:
        >>> import pathlib
        >>> from metaquant.files import load_checkpoint, save_checkpoint
        >>> state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 1}
        >>> save_checkpoint(pathlib.Path("checkpoint.pt"), state)
        >>> save_checkpoint(pathlib.Path("checkpoint.pt"), {**state, "epoch": 2})
        >>> load_checkpoint("checkpoint.pt")["epoch"], load_checkpoint("checkpoint.prev.pt")["epoch"]
        (2, 1)
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = with_digest(buffer.getvalue())
    if path.exists():
        try:
            current = read_verified(path)
        except CheckpointDamagedError as err:
            logger.warning(
                "%s; replacing it with the new checkpoint and keeping %s", err, previous_checkpoint_path(path).name
            )
        else:
            # A copy, not a hard link: a kill between the two writes must leave two complete checkpoints.
            atomic_write_bytes(previous_checkpoint_path(path), current)
    atomic_write_bytes(path, data)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify (CRCs and digest) and load a checkpoint of ``save_checkpoint`` on the CPU, with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointDamagedError: (a ``ValueError``) the bytes changed since they were written.
        ValueError: not a readable checkpoint, or a dict without ``model``, ``optimizer``, ``trainer``, ``rng``,
            ``epoch``.

    Example:
        >>> from metaquant.files import load_checkpoint
        >>> torch.save({"model": {}, "epoch": 3}, "partial.pt")
        >>> load_checkpoint("partial.pt")
        Traceback (most recent call last):
        ValueError: partial.pt is not a metaquant checkpoint (missing optimizer, rng, trainer)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = read_verified(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # tensors and plain values
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    missing = {"model", "optimizer", "trainer", "rng", "epoch"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise ValueError(f"{path} is not a metaquant checkpoint (missing {', '.join(sorted(missing))})")
    return state
