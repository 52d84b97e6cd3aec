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
    """A step produced a non-finite value; nothing was updated.

    Raised by ``Trainer.step`` and ``MetaQuant.step`` with ``on_nonfinite="raise"`` (through ``reject_step``)
    before any parameter or optimizer state changes; ``fit`` re-raises it with the epoch, the step and the last
    good checkpoint in the message. A subclass of ``FloatingPointError``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> try:
        ...     trainer.step(lambda: model(torch.randn(4, 2)).sum() * float("nan"))
        ... except mq.guards.NonFiniteError as err:
        ...     print(err)
        non-finite loss
    """


class TrainingInterrupted(Exception):
    """Training stopped at a clean point on request; a checkpoint was written.

    Raised by ``fit`` after the step during which its ``StopFlag`` became true (a SIGINT or SIGTERM); the
    checkpoint (when ``fit`` has a run directory) holds the exact position, so the run resumes from it.

    Args:
        message: says where the run stopped and where the checkpoint is.
        signum: the signal that asked for the stop, kept as ``self.signum``.

    Example:
        >>> import signal
        >>> data = mq.data.ImageTensors(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
        >>> loader = mq.data.TensorLoader(data, mq.data.DatasetInfo("toy", 2, 1, 2, (0.5,), (0.5,), "none"), 2,
        ...                               train=True)
        >>> model, stop = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), mq.guards.StopFlag()
        >>> stop.request(signal.SIGTERM)
        >>> try:
        ...     mq.fit(model, mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)), loader, loader,
        ...            epochs=1, schedule=lambda e: 1.0, progress=False, stop=stop)
        ... except mq.guards.TrainingInterrupted as err:
        ...     print(err.signum == signal.SIGTERM, err)
        True stopped by signal ... at epoch 1, step 1
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (one reduction, one device sync).

    Args:
        tensors: tensors of any shapes and devices (summed in float32 first); ``None`` entries are skipped.

    Returns:
        True when no tensor holds a NaN or ±inf (also for no tensors at all).

    Example:
        >>> mq.guards.all_finite([torch.ones(2), None]), mq.guards.all_finite([torch.tensor([1.0, float("inf")])])
        (True, False)
        >>> mq.guards.all_finite([])
        True
    """
    sums = [t.detach().float().sum() for t in tensors if t is not None]
    if not sums:
        return True
    # A NaN or ±inf anywhere makes its tensor's sum, and so the total, non-finite.
    return bool(torch.isfinite(torch.stack(sums).sum()))


class BufferSnapshot:
    """Copies of a model's buffers (BatchNorm statistics and counters), to undo a skipped step's forward pass.

    Args:
        model: the module whose ``buffers()`` are copied now and written back by ``restore``.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> snapshot = mq.guards.BufferSnapshot(bn)
        >>> _ = bn(torch.randn(4, 2))  # a training-mode forward pass moves the running statistics
        >>> snapshot.restore()
        >>> bn.running_mean.tolist(), bn.num_batches_tracked.item()
        ([0.0, 0.0], 0)
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        """Write the saved values back into the same buffers, in place."""
        with torch.no_grad():
            for buffer, value in self._saved:
                buffer.copy_(value)


def reject_step(what: str, snapshot: BufferSnapshot | None, skipped: int) -> int:
    """The end of a step that produced a non-finite ``what`` (its gradients already zeroed).

    Raises ``NonFiniteError`` when there is no snapshot (policy ``"raise"``); otherwise restores the buffers the
    forward pass changed, logs a warning and returns the new number of skipped steps.

    Args:
        what: what was not finite (``"loss"``, ``"gradients"``, ...), for the message.
        snapshot: the buffers taken before the forward pass (policy ``"skip"``), or None (policy ``"raise"``).
        skipped: the number of steps skipped so far.

    Returns:
        ``skipped + 1``.

    Raises:
        NonFiniteError: ``snapshot`` is None; the message is ``"non-finite <what>"``.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> snapshot = mq.guards.BufferSnapshot(bn)
        >>> _ = bn(torch.randn(4, 2))
        >>> mq.guards.reject_step("loss", snapshot, skipped=0), bn.running_mean.tolist()
        (1, [0.0, 0.0])
        >>> mq.guards.reject_step("loss", None, skipped=1)
        Traceback (most recent call last):
        ...
        metaquant.guards.NonFiniteError: non-finite loss
    """
    if snapshot is None:
        raise NonFiniteError(f"non-finite {what}")
    snapshot.restore()
    logger.warning("skipped a step with non-finite %s (%d skipped so far)", what, skipped + 1)
    return skipped + 1


def first_nonfinite(groups: dict[str, Iterable[Tensor | None]]) -> str | None:
    """The name of the first group holding a non-finite value, or None when all are finite.

    Args:
        groups: ``name -> tensors`` (``None`` entries skipped), checked in the dict's order.

    Returns:
        The name of the first group for which ``all_finite`` is False, or None.

    Example:
        >>> nan = torch.tensor([float("nan")])
        >>> mq.guards.first_nonfinite({"loss": [torch.tensor(1.0)], "gradients": [None, nan], "meta": [nan]})
        'gradients'
        >>> print(mq.guards.first_nonfinite({"loss": [torch.tensor(1.0)]}))
        None
    """
    for name, tensors in groups.items():
        if not all_finite(tensors):
            return name
    return None


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of ``NONFINITE_POLICIES``.

    Args:
        policy: the ``on_nonfinite`` value to check.

    Raises:
        ValueError: ``policy`` is neither ``"raise"`` nor ``"skip"``; the message lists the allowed values.

    Example:
        >>> mq.guards.check_policy("skip")
        >>> mq.guards.check_policy("ignore")
        Traceback (most recent call last):
        ...
        ValueError: on_nonfinite 'ignore' is not supported; allowed: raise, skip
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite {policy!r} is not supported; allowed: {', '.join(NONFINITE_POLICIES)}")


class StopFlag:
    """Set by SIGINT/SIGTERM inside ``StopFlag.installed()``; read by the training loop after each step.

    The flag is false until ``request`` is called (by the installed signal handlers, or directly); it then
    holds the signal's number in ``signum``. ``fit(..., stop=flag)`` checks it after every step.

    Example:
        >>> import signal
        >>> stop, before = mq.guards.StopFlag(), signal.getsignal(signal.SIGINT)
        >>> with stop.installed():
        ...     signal.raise_signal(signal.SIGINT)  # Ctrl-C: recorded, no KeyboardInterrupt
        >>> bool(stop), stop.signum == signal.SIGINT, signal.getsignal(signal.SIGINT) == before
        (True, True, True)
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Ask the training loop to stop, on behalf of signal ``signum``."""
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
