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
    """The run directory already exists and holds a run."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, nothing between."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` with ``torch.save`` and write it atomically.

    The previous file at ``path``, if any, becomes ``<name>.prev.pt`` only once the new one is complete, so at
    every instant at least one complete checkpoint exists.
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

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, another format).
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
    """One run's directory. Create it with ``RunDir.create`` (refuses an existing run) or open ``RunDir(path)``."""

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
        if run.config_path.exists():
            raise RunExistsError(
                f"run directory {run.path} already holds a run; choose another --name or --run-dir "
                "(or resume it with --resume)"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.config_path, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
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
        return RunConfig.load(self.config_path)

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records, in order."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def is_done(self) -> bool:
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
        atomic_write_bytes(self.done_path, b"")
