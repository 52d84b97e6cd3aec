"""Run directories: the configuration, per-epoch metrics, per-iteration loss and checkpoints of one run.

Layout of a run directory::

    config.json       the RunConfig that produced it
    metrics.jsonl     one JSON object per finished epoch (epoch, lr, train_loss, train_acc, test_acc, ...)
    loss.csv          "iteration,loss", one line per training iteration
    checkpoint.pt     the latest checkpoint: model, optimizer(s), epoch, best accuracy, RNG states, config
    checkpoint.prev.pt  the checkpoint before it, kept until the new one is complete
    done              written last, when the run has finished

Every file is written so that a crash leaves either the old or the new version, never half of one: checkpoints
and JSON go to a temporary file in the same directory, are flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig

__all__ = ["RunDir", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "RunExistsError"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"


class RunExistsError(FileExistsError):
    """The run directory already exists and holds a run.

    Raised by ``RunDir.create`` (and so by ``pipeline.execute``) before anything is written: a run is never
    overwritten. It is a ``FileExistsError``, so code that knows only the builtin types handles it too.

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.runs import RunDir, RunExistsError
        >>> _ = RunDir.create("runs/taken", RunConfig())
        >>> try:
        ...     RunDir.create("runs/taken", RunConfig(epochs=3))
        ... except RunExistsError as err:
        ...     print(isinstance(err, FileExistsError), RunDir("runs/taken").config().epochs)
        True 10
    """


def atomic_write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, nothing between.

    The bytes go to a temporary file in the same directory, are flushed to disk, then renamed over ``path``;
    if anything fails, the temporary file is removed and ``path`` is as it was.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new contents.
        exclusive: create ``path`` only if no file of that name exists, atomically: of two processes writing
            the same new path at once, exactly one succeeds.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (it is left as it was).
        OSError: the directory does not exist or cannot be written (permissions, full disk).

    Example:
        >>> import pathlib
        >>> from metaquant.runs import atomic_write_bytes
        >>> folder = pathlib.Path("atomic"); folder.mkdir()
        >>> atomic_write_bytes(folder / "notes.txt", b"first")
        >>> atomic_write_bytes(folder / "notes.txt", b"second")
        >>> (folder / "notes.txt").read_bytes(), [p.name for p in folder.iterdir()]  # no temporary file is left
        (b'second', ['notes.txt'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists, unlike a rename
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` with ``torch.save`` and write it atomically.

    The previous file at ``path``, if any, becomes ``<name>.prev.pt`` only once the new one is complete, so at
    every instant at least one complete checkpoint exists.

    Args:
        path: the checkpoint file (e.g. ``RunDir.checkpoint_path``); its directory must exist.
        state: what to save; ``load_checkpoint`` expects the keys ``model``, ``optimizer``, ``trainer``,
            ``rng`` and ``epoch``.

    Raises:
        OSError: the file cannot be written (the previous checkpoint is then kept).

    Example:
        >>> import pathlib
        >>> from metaquant.runs import load_checkpoint, save_checkpoint
        >>> path = pathlib.Path("checkpoint.pt")
        >>> state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 1}
        >>> save_checkpoint(path, state)
        >>> save_checkpoint(path, {**state, "epoch": 2})
        >>> load_checkpoint(path)["epoch"], load_checkpoint(pathlib.Path("checkpoint.prev.pt"))["epoch"]
        (2, 1)
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    previous = path.with_name(path.stem + ".prev" + path.suffix)
    if path.exists():
        # A hard link keeps the old checkpoint reachable under the .prev name while the new one is written.
        previous.unlink(missing_ok=True)
        os.link(path, previous)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` on the CPU.

    Only tensors and plain values are unpickled (``torch.load(weights_only=True)``).

    Args:
        path: the checkpoint file.

    Returns:
        The saved dict, with at least the keys ``model``, ``optimizer``, ``trainer``, ``rng`` and ``epoch``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, another format), or a dict that
            lacks one of the keys above (the message names them).

    Example:
        >>> import pathlib
        >>> from metaquant.runs import load_checkpoint
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    missing = {"model", "optimizer", "trainer", "rng", "epoch"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise ValueError(f"{path} is not a metaquant checkpoint (missing {', '.join(sorted(missing))})")
    return state


class RunDir:
    """One run's directory. Create it with ``RunDir.create`` (refuses an existing run) or open ``RunDir(path)``.

    The layout is in the module docstring; ``pipeline.execute`` writes it, ``pipeline.resume`` and ``report``
    read it. Opening a directory checks nothing: the accessors raise when a file is missing.

    Args:
        path: the run directory.

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.runs import RunDir
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
    def create(cls, path: str | Path, config: RunConfig) -> RunDir:
        """Make a new run directory holding ``config.json``.

        Raises:
            RunExistsError: ``path`` already holds a run; it is never overwritten.
            OSError: the directory cannot be created or written (permissions, full disk).
        """
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            # Exclusive: of two runs started at once with the same directory, one gets it, the other stops here.
            atomic_write_bytes(run.config_path, (json.dumps(config.to_dict(), indent=2) + "\n").encode(),
                               exclusive=True)
        except FileExistsError:
            raise RunExistsError(
                f"run directory {run.path} already holds a run; choose another --name or --run-dir "
                "(or resume it with --resume)"
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
    def done_path(self) -> Path:
        return self.path / "done"

    # --- contents -----------------------------------------------------------------------------------------
    def config(self) -> RunConfig:
        """The run's ``RunConfig``, read from ``config.json`` (``RunConfig.load``'s errors)."""
        return RunConfig.load(self.config_path)

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records, in order."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def is_done(self) -> bool:
        """Whether the run has finished (its ``done`` file exists)."""
        return self.done_path.exists()

    def record_epoch(self, record: dict[str, Any], losses: list[tuple[int, float]]) -> None:
        """Append one epoch's metrics and its per-iteration losses.

        The whole files are rewritten atomically (they are small: one line per epoch, one per iteration), so
        an interrupted write never leaves a partial line; records of this epoch or later, left by a run that
        was interrupted and is being resumed, are replaced.
        """
        epochs = [m for m in self.metrics() if m["epoch"] < record["epoch"]] + [record]
        text = "".join(json.dumps(m) + "\n" for m in epochs)
        atomic_write_bytes(self.metrics_path, text.encode())
        first_iteration = losses[0][0] if losses else None
        kept = self._loss_lines(before=first_iteration)
        kept += [f"{i},{loss:.8f}\n" for i, loss in losses]
        atomic_write_bytes(self.loss_path, ("iteration,loss\n" + "".join(kept)).encode())

    def _loss_lines(self, before: int | None) -> list[str]:
        if not self.loss_path.exists():
            return []
        lines = self.loss_path.read_text().splitlines(keepends=True)[1:]
        if before is None:
            return lines
        return [line for line in lines if int(line.split(",", 1)[0]) < before]

    def mark_done(self) -> None:
        """Write the ``done`` file: the run has finished, every other file is complete."""
        atomic_write_bytes(self.done_path, b"")
