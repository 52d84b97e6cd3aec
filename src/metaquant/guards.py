"""Guards of a training step: non-finite values and requests to stop.

A step that produced a non-finite loss, gradient or meta-quantizer output must not reach the weights. The
trainers check before they update anything and either raise ``NonFiniteError`` (the default: the run stops
with the last good checkpoint intact) or, with ``on_nonfinite="skip"``, undo what the forward pass changed
(BatchNorm's running statistics) and skip the step.

``StopFlag`` turns SIGINT/SIGTERM into a request that the training loop honours at the next clean point
(after a step), where it writes a checkpoint before it stops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "NonFiniteError", "NONFINITE_POLICIES", "all_finite", "first_nonfinite", "reject_step", "check_policy", "BufferSnapshot",
    "StopFlag", "TrainingInterrupted",
]

NONFINITE_POLICIES = ("raise", "skip")

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite value; nothing was updated."""


class TrainingInterrupted(Exception):
    """Training stopped at a clean point on request; a checkpoint was written."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (one reduction, one device sync)."""
    sums = [t.detach().float().sum() for t in tensors if t is not None]
    if not sums:
        return True
    # A NaN or ±inf anywhere makes its tensor's sum, and so the total, non-finite.
    return bool(torch.isfinite(torch.stack(sums).sum()))


class BufferSnapshot:
    """Copies of a model's buffers (BatchNorm statistics and counters), to undo a skipped step's forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self._saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, value in self._saved:
                buffer.copy_(value)


def reject_step(what: str, snapshot: BufferSnapshot | None, skipped: int) -> int:
    """The end of a step that produced a non-finite ``what`` (its gradients already zeroed).

    Raises ``NonFiniteError`` when there is no snapshot (policy ``"raise"``); otherwise restores the buffers the
    forward pass changed, logs a warning and returns the new number of skipped steps.
    """
    if snapshot is None:
        raise NonFiniteError(f"non-finite {what}")
    snapshot.restore()
    logger.warning("skipped a step with non-finite %s (%d skipped so far)", what, skipped + 1)
    return skipped + 1


def first_nonfinite(groups: dict[str, Iterable[Tensor | None]]) -> str | None:
    """The name of the first group holding a non-finite value, or None when all are finite."""
    for name, tensors in groups.items():
        if not all_finite(tensors):
            return name
    return None


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of ``NONFINITE_POLICIES``."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite {policy!r} is not supported; allowed: {', '.join(NONFINITE_POLICIES)}")


class StopFlag:
    """Set by SIGINT/SIGTERM inside ``StopFlag.installed()``; read by the training loop after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM to this flag for the duration (main thread only; elsewhere a no-op)."""
        signums = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {s: signal.signal(s, lambda signum, frame: self.request(signum)) for s in signums}
        except ValueError:  # not the main thread
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
