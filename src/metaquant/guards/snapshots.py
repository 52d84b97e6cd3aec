"""Undoing a step: copies of what a training step may change, and the end of a step rejected as non-finite."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NonFiniteError

logger = logging.getLogger(__name__)


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


class StepSnapshot:
    """Copies of everything a training step may change: the model's parameters and buffers, the optimizer's
    state, and the trainer's own state (MetaQuant: ``φ``, its optimizer, the records). ``restore`` puts them back
    bit for bit, so a step whose update overflowed the weights can be skipped as if it had not run.

    Taken by ``fit`` before every step when the trainer's policy is ``on_nonfinite="skip"`` (the copies cost a
    step's worth of memory traffic, which only that policy pays).

    Args:
        model: the model (unwrapped from DDP).
        optimizer: the base optimizer.
        trainer: anything with ``state_dict`` and ``load_state_dict`` (``Trainer``, ``MetaQuant``), or None.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e38, momentum=0.9)
        >>> snapshot = mq.guards.StepSnapshot(model, opt, None)
        >>> before = model.weight.detach().clone()
        >>> model(torch.full((1, 2), 1e30)).sum().backward(); opt.step()  # overflows the weights
        >>> bool(torch.isfinite(model.weight).all())
        False
        >>> snapshot.restore()
        >>> torch.equal(model.weight, before), len(opt.state)  # the momentum buffers are gone again
        (True, 0)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: Any | None) -> None:
        self._model = model
        self._optimizer = optimizer
        self._trainer = trainer
        self._tensors = [(t, t.detach().clone()) for t in model.state_dict().values()]
        self._optimizer_state = {p: {k: _copied(v) for k, v in state.items()} for p, state in optimizer.state.items()}
        self._trainer_state = copy.deepcopy(trainer.state_dict()) if trainer is not None else None

    def restore(self) -> None:
        """Write the saved values back (the model's tensors in place); the snapshot is used up."""
        with torch.no_grad():
            for tensor, value in self._tensors:
                tensor.copy_(value)
        self._optimizer.state.clear()
        self._optimizer.state.update(self._optimizer_state)
        if self._trainer is not None:
            self._trainer.load_state_dict(self._trainer_state)


def _copied(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


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
