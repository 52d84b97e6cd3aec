"""Run directories: the configuration, per-epoch metrics, per-iteration loss and checkpoints of one run.

Layout of a run directory::

    config.json       the RunConfig that produced it: what makes the directory a run
    metrics.jsonl     one JSON object per finished epoch (epoch, lr, train_loss, train_acc, test_acc, ...)
    loss.csv          "iteration,loss", one line per training iteration (the loss the trainer minimised)
    checkpoint.pt     the latest checkpoint: model, optimizer(s), epoch, best accuracy, RNG states, config
    checkpoint.prev.pt  a distinct, complete copy of the checkpoint before it
    done              written last, when the run has finished

Every file is written so that a crash leaves either the old or the new version, never half of one: checkpoints
and JSON go to a temporary file in the same directory, are flushed to disk, then renamed over the target. A
checkpoint carries a content digest (``integrity.with_digest``) and is verified before it is used.

A directory is a run only if it holds ``config.json``; a new run is created only in a directory that is missing
or empty, so no file of anything else is ever replaced. One process at a time works in a run directory: it
holds an OS lock on the directory (``RunLock``, ``flock``) that the system releases when the process ends,
however it ends.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .config import RunConfig

try:  # POSIX; elsewhere run directories are not locked
    import fcntl

    _LOCK_EXCLUSIVE: int | None = fcntl.LOCK_EX | fcntl.LOCK_NB
except ImportError:  # pragma: no cover
    _LOCK_EXCLUSIVE = None

__all__ = ["RunDir", "RunLock", "RunExistsError", "RunLockedError"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
#: Where a damaged ``checkpoint.pt`` is kept when a run continues from its previous checkpoint.
DAMAGED_CHECKPOINT = "checkpoint.damaged.pt"
#: The files a run writes; nothing else may overwrite them (``export --out`` refuses these names).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "loss.csv",
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    DAMAGED_CHECKPOINT,
    "done",
    "meta.pt",
    "trace.pt",
)
# Numeric fields of a metrics record: a number, or null where there was nothing to measure.
_METRIC_NUMBERS = (
    "lr",
    "train_loss",
    "train_objective",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_top5",
    "best_acc",
    "train_seconds",
)

logger = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run directory is taken: it already holds a run, or files that are not a run.

    Raised by ``RunDir.create`` (and so by ``lifecycle.execute``) before anything is written: a run, or anything
    else in the way, is never overwritten. It is a ``FileExistsError``, so code that knows only the builtin
    types handles it too.

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.runs import RunDir, RunExistsError
        >>> _ = RunDir.create("runs/taken", RunConfig())
        >>> try:
        ...     RunDir.create("runs/taken", RunConfig(epochs=3))
        ... except RunExistsError as err:
        ...     print(isinstance(err, FileExistsError), RunDir("runs/taken").config().epochs)
        True 10
    """


class RunLockedError(RuntimeError):
    """Another process is working in the run directory (it holds the directory's ``RunLock``).

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.runs import RunLock, RunLockedError
        >>> pathlib.Path("busy").mkdir()
        >>> with RunLock("busy"):
        ...     try:
        ...         RunLock("busy")  # a second holder, as another process would be
        ...     except RunLockedError as err:
        ...         print(str(err).startswith("run directory busy is in use by another process"))
        True
    """


def _locker_pid(path: Path) -> int | None:
    """The process holding an ``flock`` on ``path``, from ``/proc/locks`` (Linux), or None."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4]) if fields[4].isdigit() else None
    return None


class RunLock:
    """An exclusive OS lock (``flock``) on a run directory, held from construction until ``release``.

    The lock is on the directory itself, so it adds no file to it; the system releases it when the process
    ends, however it ends (a SIGKILL included), so a killed run never leaves a stale lock behind. Locking
    needs a POSIX system; elsewhere it is a no-op.

    Args:
        path: an existing directory.
        what: how messages name the directory (e.g. ``"sweep folder"``).

    Raises:
        RunLockedError: another process (or another ``RunLock`` of this process) holds the lock; the message
            names its process id when the system tells it.
        OSError: ``path`` is not an existing directory.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.runs import RunLock
        >>> pathlib.Path("run").mkdir()
        >>> with RunLock("run") as lock:
        ...     lock.held
        True
        >>> lock.held, RunLock("run").release()  # released on leaving the block: free for the next one
        (False, None)
    """

    def __init__(self, path: str | Path, what: str = "run directory") -> None:
        self.path = Path(path)
        self._fd: int | None = None
        if _LOCK_EXCLUSIVE is None:  # pragma: no cover
            return
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, _LOCK_EXCLUSIVE)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without flock on directories (some network file systems): work unlocked
                # rather than not at all, and say so.
                logger.warning(
                    "cannot lock the %s %s (%s): a second process on it would not be refused",
                    what,
                    self.path,
                    err.strerror,
                )
                return
            pid = _locker_pid(self.path)
            who = f" (pid {pid})" if pid is not None and pid != os.getpid() else ""
            raise RunLockedError(
                f"{what} {self.path} is in use by another process{who}; wait until it ends, or stop it first"
            ) from None
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closing the descriptor releases it); a second call does nothing."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity: a value that could not be measured is null
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8)") from None


class RunDir:
    """One run's directory. Create it with ``RunDir.create`` (refuses anything in the way) or open ``RunDir(path)``.

    The layout is in the module docstring; ``lifecycle.execute`` writes it, ``lifecycle.resume`` and ``report``
    read it. Opening a directory checks nothing: the accessors raise when a file is missing or malformed,
    with a message naming the file.

    Args:
        path: the run directory.

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.runs import RunDir
        >>> run = RunDir.create("runs/demo", RunConfig(epochs=2))
        >>> run.record_epoch({"epoch": 0, "test_acc": 71.5}, [(1, 2.3), (2, 2.1)])
        >>> run.record_epoch({"epoch": 1, "test_acc": 80.0}, [(3, 1.9)])
        >>> run.record_epoch({"epoch": 1, "test_acc": 80.5}, [(3, 1.8)])  # a resumed run redoes epoch 1
        >>> [m["test_acc"] for m in run.metrics()], run.loss_path.read_text().splitlines()
        ([71.5, 80.5], ['iteration,loss', '1,2.30000000', '2,2.10000000', '3,1.80000000'])
        >>> run.mark_done()
        >>> RunDir("runs/demo").is_done(), RunDir("runs/demo").config().epochs
        (True, 2)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def check_free(cls, path: str | Path) -> None:
        """Raise unless a new run may be created at ``path``: a missing or empty directory (temporary files
        of an interrupted creation aside). Nothing is written.

        Args:
            path: the would-be run directory.

        Raises:
            RunExistsError: ``path`` holds a run (``config.json``), or other files (it is not a run).
            NotADirectoryError: ``path`` or one of its parents is a file.

        Example:
            >>> import pathlib
            >>> from metaquant.experiments.runs import RunDir, RunExistsError
            >>> RunDir.check_free("runs/new")  # missing: free
            >>> pathlib.Path("runs/mine").mkdir(parents=True)
            >>> _ = pathlib.Path("runs/mine/metrics.jsonl").write_text("my own notes")
            >>> try:
            ...     RunDir.check_free("runs/mine")
            ... except RunExistsError as err:
            ...     print(err)
            runs/mine is not empty and is not a run (no config.json; it holds metrics.jsonl); choose another ...
        """
        path = Path(path)
        for folder in (path, *path.parents):
            if folder.exists() or folder.is_symlink():
                if not folder.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
                break
        if not path.is_dir():
            return
        run = cls(path)
        if run.config_path.exists():
            raise RunExistsError(
                f"run directory {path} already holds a run; choose another `run_dir` (or resume it with `resume`)"
            )
        # What an interrupted creation leaves (a temporary config) is ours; anything else is not.
        others = sorted(
            p.name for p in path.iterdir() if not (p.name.startswith(".config.json.") and p.name.endswith(".tmp"))
        )
        if others:
            shown = ", ".join(others[:5]) + (f", ... ({len(others)} entries)" if len(others) > 5 else "")
            raise RunExistsError(
                f"{path} is not empty and is not a run (no config.json; it holds {shown}); choose another `run_dir`"
            )

    @classmethod
    def create(cls, path: str | Path, config: RunConfig) -> RunDir:
        """Make a new run directory holding ``config.json``, in a missing or empty directory.

        Args:
            path: the run directory (created with its parents if needed).
            config: the run's configuration.

        Returns:
            The new ``RunDir``.

        Raises:
            RunExistsError: ``path`` already holds a run, or files that are not a run; nothing is changed.
            OSError: the directory cannot be created or written (permissions, full disk, a file in the way).
        """
        cls.check_free(path)
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            # Exclusive: of two runs started at once with the same directory, one gets it, the other stops here.
            atomic_write_bytes(
                run.config_path, (json.dumps(config.to_dict(), indent=2) + "\n").encode(), exclusive=True
            )
        except FileExistsError:
            raise RunExistsError(
                f"run directory {run.path} already holds a run; choose another `run_dir` (or resume it with `resume`)"
            ) from None
        return run

    # --- paths --------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_path(self) -> Path:
        return self.path / "loss.csv"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.path / PREVIOUS_CHECKPOINT

    @property
    def done_path(self) -> Path:
        return self.path / "done"

    # --- contents -----------------------------------------------------------------------------------------
    def config(self) -> RunConfig:
        """The run's ``RunConfig``, read from ``config.json`` (``RunConfig.load``'s errors, naming the file)."""
        return RunConfig.load(self.config_path)

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records, in order.

        Raises:
            ValueError: a line is not a JSON object with an integer ``epoch`` and numbers (or null) for the
                numeric fields; the message names the file and the line.
        """
        if not self.metrics_path.exists():
            return []
        records = []
        for n, line in enumerate(_read_text(self.metrics_path).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.metrics_path}, line {n}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where} is not JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object of one epoch's metrics, got {line[:40]!r}")
            if type(record.get("epoch")) is not int:
                raise ValueError(f"{where}: 'epoch' must be an integer, got {record.get('epoch')!r}")
            for key in _METRIC_NUMBERS:
                value = record.get(key)
                if key in record and value is not None and (type(value) not in (int, float)):
                    raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
            records.append(record)
        return records

    def check_files(self) -> None:
        """Read ``config.json``, ``metrics.jsonl`` and ``loss.csv`` through, so that a malformed one stops a
        resumed run before it trains, with a message naming the file.

        Raises:
            FileNotFoundError: no ``config.json``.
            ValueError: a file that cannot be parsed (the message names it and the line).
        """
        self.config()
        self.metrics()
        self._loss_lines(before=None)

    def is_done(self) -> bool:
        """Whether the run has finished (its ``done`` file exists)."""
        return self.done_path.exists()

    def record_epoch(self, record: dict[str, Any], losses: list[tuple[int, float]]) -> None:
        """Append one epoch's metrics and its per-iteration losses.

        The whole files are rewritten atomically (they are small: one line per epoch, one per iteration), so
        an interrupted write never leaves a partial line; records of this epoch or later, left by a run that
        was interrupted and is being resumed, are replaced. A non-finite number is written as null (JSON
        has no NaN).
        """
        record = {k: _finite_or_none(v) for k, v in record.items()}
        epochs = [m for m in self.metrics() if m["epoch"] < record["epoch"]] + [record]
        text = "".join(json.dumps(m, allow_nan=False) + "\n" for m in epochs)
        atomic_write_bytes(self.metrics_path, text.encode())
        first_iteration = losses[0][0] if losses else None
        kept = self._loss_lines(before=first_iteration)
        kept += [f"{i},{loss:.8f}\n" for i, loss in losses]
        atomic_write_bytes(self.loss_path, ("iteration,loss\n" + "".join(kept)).encode())

    def _loss_lines(self, before: int | None) -> list[str]:
        if not self.loss_path.exists():
            return []
        lines = _read_text(self.loss_path).splitlines(keepends=True)
        if lines and lines[0].strip() != "iteration,loss":
            raise ValueError(f"{self.loss_path}: the first line must be 'iteration,loss', got {lines[0][:40]!r}")
        kept = []
        for n, line in enumerate(lines[1:], 2):
            try:
                iteration, loss = line.split(",")
                iteration_number = int(iteration)
                float(loss)
            except ValueError:
                got = line.strip()[:40]
                raise ValueError(f"{self.loss_path}, line {n}: expected 'iteration,loss', got {got!r}") from None
            if before is None or iteration_number < before:
                kept.append(line)
        return kept

    def mark_done(self) -> None:
        """Write the ``done`` file: the run has finished, every other file is complete."""
        atomic_write_bytes(self.done_path, b"")
