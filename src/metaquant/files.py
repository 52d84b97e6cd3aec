"""Crash-safe files: atomic writes, and checkpoints that carry a digest and keep their predecessor.

Every file is written so that a crash leaves either the old or the new version, never half of one: the bytes go
to a temporary file in the same directory, are flushed to disk, then renamed over the target. A checkpoint
carries a content digest (``integrity.with_digest``) and is verified before it is used; before a new one
replaces it, the current one is copied to ``<name>.prev<suffix>``.
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
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, nothing between.

    The bytes go to a temporary file in the same directory (``temporary_files`` finds what a kill left), are
    flushed to disk, then renamed over ``path``; if anything fails, the temporary file is removed and ``path`` is
    as it was. The file's mode follows the umask, as for any file a program creates.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new contents.
        exclusive: create ``path`` only if no file of that name exists, atomically: of two processes writing
            the same new path at once, exactly one succeeds.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (it is left as it was).
        OSError: the directory does not exist or cannot be written (permissions, full disk); the error's
            ``filename`` is ``path``.

    Example:
        >>> import pathlib
        >>> from metaquant.files import atomic_write_bytes
        >>> folder = pathlib.Path("atomic"); folder.mkdir()
        >>> atomic_write_bytes(folder / "notes.txt", b"first")
        >>> atomic_write_bytes(folder / "notes.txt", b"second")
        >>> (folder / "notes.txt").read_bytes(), [p.name for p in folder.iterdir()]  # no temporary file is left
        (b'second', ['notes.txt'])
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
    """Where ``save_checkpoint`` keeps the checkpoint before ``path``: ``<stem>.prev<suffix>``.

    Args:
        path: the checkpoint file.

    Returns:
        The path of its previous checkpoint.

    Example:
        >>> from metaquant.files import previous_checkpoint_path
        >>> previous_checkpoint_path("runs/r/checkpoint.pt").name
        'checkpoint.prev.pt'
    """
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` with ``torch.save``, add a content digest, and write it atomically.

    Before the new checkpoint replaces ``path``, a distinct copy of the current one (verified first) is written
    to ``<name>.prev.pt``: at every instant ``path`` is a complete checkpoint and ``<name>.prev.pt``, once
    there is one, a complete earlier one, in another file. A current checkpoint that fails verification is not
    copied (the previous one stays) and is replaced by the new one, with a warning.

    Args:
        path: the checkpoint file (e.g. ``RunDir.checkpoint_path``); its directory must exist.
        state: what to save; ``load_checkpoint`` expects the keys ``model``, ``optimizer``, ``trainer``,
            ``rng`` and ``epoch``.

    Raises:
        OSError: a file cannot be written (the checkpoints already there are kept as they were).

    Example:
        >>> import os, pathlib
        >>> from metaquant.files import load_checkpoint, save_checkpoint
        >>> path = pathlib.Path("checkpoint.pt")
        >>> state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 1}
        >>> save_checkpoint(path, state)
        >>> save_checkpoint(path, {**state, "epoch": 2})
        >>> load_checkpoint(path)["epoch"], load_checkpoint(pathlib.Path("checkpoint.prev.pt"))["epoch"]
        (2, 1)
        >>> os.path.samefile("checkpoint.pt", "checkpoint.prev.pt")  # two files, not two names of one
        False
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
    """Verify and load a checkpoint written by ``save_checkpoint``, on the CPU.

    The file's CRCs and content digest are checked first (``integrity.verify_checkpoint_bytes``); only tensors
    and plain values are unpickled (``torch.load(weights_only=True)``).

    Args:
        path: the checkpoint file.

    Returns:
        The saved dict, with at least the keys ``model``, ``optimizer``, ``trainer``, ``rng`` and ``epoch``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointDamagedError: (a ``ValueError``) a CRC or the digest disagrees: the bytes changed since they
            were written.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, another format), or a dict that
            lacks one of the keys above (the message names them).

    Example:
        >>> import pathlib
        >>> from metaquant.files import load_checkpoint
        >>> _ = pathlib.Path("broken.pt").write_bytes(b"half a checkpoint")
        >>> torch.save({"model": {}, "epoch": 3}, "partial.pt")
        >>> for name in ("broken.pt", "partial.pt"):
        ...     try:
        ...         load_checkpoint(name)
        ...     except ValueError as err:
        ...         print(err)
        checkpoint broken.pt is corrupt or truncated (...)
        partial.pt is not a metaquant checkpoint (missing optimizer, rng, trainer)
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
