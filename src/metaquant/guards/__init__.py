"""Guards of a training step: non-finite values and requests to stop.

A step that produced a non-finite loss, gradient or meta-quantizer output must not reach the weights. The
trainers check before they update anything and either raise ``NonFiniteError`` (the default: the run stops
with the last good checkpoint intact) or, with ``on_nonfinite="skip"``, undo what the forward pass changed
(BatchNorm's running statistics) and skip the step. An update that is finite but overflows the weights is
found by the training loop after the step; with ``"skip"`` it restores what a ``StepSnapshot`` took before the
step and skips it too, and past ``max_skipped`` skipped steps the run stops (``SkipLimitError``).

The ``check_*`` functions turn a wrong argument of the training API (a string for an optimizer, no closure, a
loss that is not a scalar tensor, a saved state for layers of other shapes) into one clear error at the call,
instead of a failure deep inside a later step.

``StopFlag`` turns SIGINT/SIGTERM into a request that the training loop honours at the next clean point
(after a step), where it writes a checkpoint before it stops.
"""

from .checks import (
    NONFINITE_POLICIES,
    check_closure,
    check_input_requantization,
    check_loss,
    check_optimizer,
    check_policy,
    check_requantization,
    check_state_shapes,
    check_trainer_inputs,
)
from .errors import NonFiniteError, SkipLimitError, TrainingInterrupted
from .finite import all_finite, first_nonfinite
from .signals import StopFlag
from .snapshots import BufferSnapshot, StepSnapshot, reject_step

__all__ = [
    "NonFiniteError",
    "SkipLimitError",
    "NONFINITE_POLICIES",
    "all_finite",
    "first_nonfinite",
    "reject_step",
    "check_policy",
    "BufferSnapshot",
    "StepSnapshot",
    "StopFlag",
    "TrainingInterrupted",
    "check_optimizer",
    "check_trainer_inputs",
    "check_closure",
    "check_loss",
    "check_state_shapes",
    "check_requantization",
    "check_input_requantization",
]

# Tracebacks and pickles (an error sent from a worker process) name these classes by this path.
for _cls in (NonFiniteError, SkipLimitError, TrainingInterrupted, BufferSnapshot, StepSnapshot, StopFlag):
    _cls.__module__ = __name__
del _cls
