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

from __future__ import annotations

import contextlib
import copy
import logging
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

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


class SkipLimitError(NonFiniteError):
    """More steps were skipped for non-finite values than the run allows (``RunConfig.max_skipped``).

    Raised by ``fit`` with ``max_skipped`` set: a run that skips step after step is failing, not finishing; it
    stops with its last good checkpoint intact, and the message names the epoch and the step. A
    ``NonFiniteError``.

    Example:
        >>> data = mq.data.ImageTensors(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1] * 4))
        >>> info = mq.data.DatasetInfo("toy", 2, 1, 2, (0.5,), (0.5,), "none")
        >>> loader = mq.data.TensorLoader(data, info, 2, train=True)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=float("inf")), on_nonfinite="skip")
        >>> try:
        ...     mq.fit(model, trainer, loader, loader, epochs=1, schedule=lambda e: 1.0, progress=False, max_skipped=1)
        ... except mq.guards.SkipLimitError as err:
        ...     print(err)
        2 steps skipped for non-finite values, more than the limit of 1, at epoch 1, step 2 (iteration 2); ...
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
        tensors: tensors of any shapes, dtypes and devices; ``None`` entries are skipped.

    Returns:
        True when no tensor holds a NaN or ±inf (also for no tensors at all).

    Example:
        >>> mq.guards.all_finite([torch.ones(2), None]), mq.guards.all_finite([torch.tensor([1.0, float("inf")])])
        (True, False)
        >>> mq.guards.all_finite([])
        True
    """
    present = [t.detach() for t in tensors if t is not None]
    floating = [t for t in present if t.is_floating_point() or t.is_complex()]
    if not floating:
        return True  # integer tensors are always finite
    # max|x| is finite exactly when every element is (a NaN propagates): one fused pass over all tensors, no
    # overflow of a sum of large finite values, and one device sync for the answer.
    peaks = torch._foreach_norm(floating, float("inf"))
    return bool(torch.isfinite(torch.stack([p.float().to(peaks[0].device) for p in peaks])).all())


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


def check_trainer_inputs(model: Any, grad_scaler: Any = None, **callables: Any) -> None:
    """Refuse, with what was given, a trainer's model that is not a module, a ``grad_scaler`` that is not a
    gradient scaler, and any of ``callables`` (e.g. ``meta_optimizer``, ``before_update``) that is neither None
    nor callable; checked when given, not at the first step that uses them.

    Raises:
        TypeError: one of them; the message names the argument, what is allowed and what was given.

    Example:
        >>> try:
        ...     mq.guards.check_trainer_inputs(torch.nn.Linear(2, 2), meta_optimizer="adam")
        ... except TypeError as err:
        ...     print(err)
        meta_optimizer must be None or a callable, got 'adam'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}")
    scaler_api = ("scale", "unscale_", "step", "update", "get_scale")
    if grad_scaler is not None and not all(callable(getattr(grad_scaler, a, None)) for a in scaler_api):
        raise TypeError(
            f"grad_scaler must be None or a torch.amp.GradScaler (e.g. torch.amp.GradScaler('cuda')), "
            f"got {grad_scaler!r:.80}"
        )
    for name, value in callables.items():
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be None or a callable, got {value!r:.80}")


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Return ``optimizer`` if it is a ``torch.optim.Optimizer`` (or wraps one), else raise a ``TypeError``.

    Args:
        optimizer: what a trainer was given as its optimizer.

    Returns:
        ``optimizer`` itself.

    Raises:
        TypeError: anything else (e.g. the name ``"sgd"``); the message shows what was given.

    Example:
        >>> try:
        ...     mq.guards.check_optimizer("sgd")
        ... except TypeError as err:
        ...     print(err)
        optimizer must be a torch.optim.Optimizer over the model's parameters (e.g. ...), got 'sgd'
    """
    # a wrapper (Accelerate's, Lightning's) exposes the optimizer's param_groups, state and step
    wrapped = all(hasattr(optimizer, a) for a in ("param_groups", "state")) and callable(
        getattr(optimizer, "step", None)
    )
    if not (isinstance(optimizer, torch.optim.Optimizer) or wrapped):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer over the model's parameters (e.g. "
            f"torch.optim.SGD(model.parameters(), lr=0.1)), got {optimizer!r}"
        )
    return optimizer


def check_closure(closure: Any) -> Callable[[], Tensor]:
    """Return ``closure`` if it can be called, else raise a ``TypeError`` that says what ``step`` needs.

    Args:
        closure: what ``step`` was given.

    Returns:
        ``closure`` itself.

    Raises:
        TypeError: ``closure`` is not callable (e.g. None, or a loss tensor computed beforehand).

    Example:
        >>> try:
        ...     mq.guards.check_closure(None)
        ... except TypeError as err:
        ...     print(err)
        step(closure) needs a function that runs the forward pass and returns the loss, e.g. ...; got None
    """
    if not callable(closure):
        raise TypeError(
            "step(closure) needs a function that runs the forward pass and returns the loss, e.g. "
            f"lambda: F.cross_entropy(model(x), y); got {_short(closure)}"
        )
    return closure


def check_loss(loss: Any) -> Tensor:
    """Return ``loss`` if it is a scalar floating-point tensor that back-propagates, else raise.

    Args:
        loss: what the closure returned.

    Returns:
        ``loss`` itself.

    Raises:
        TypeError: not a tensor (e.g. a float from ``.item()``), or not floating point.
        ValueError: more than one element (a per-example loss: reduce it, e.g. with ``.mean()``), or it does not
            require grad (computed without autograd, e.g. under ``torch.no_grad()``).

    Example:
        >>> mq.guards.check_loss(torch.ones(3, requires_grad=True))
        Traceback (most recent call last):
        ...
        ValueError: the closure must return a scalar loss, got a tensor of shape (3,); reduce it (e.g. .mean())
        >>> mq.guards.check_loss(0.5)
        Traceback (most recent call last):
        ...
        TypeError: the closure must return the loss as a tensor, got float 0.5
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__} {_short(loss)}")
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
            "reduce it (e.g. .mean())"
        )
    if not loss.is_floating_point():
        raise TypeError(f"the closure must return a floating-point loss, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss returned by the closure does not require grad: compute it from the model's "
            "output, outside torch.no_grad()"
        )
    return loss


def check_state_shapes(records: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Tensor]) -> None:
    """Raise unless every tensor recorded per layer in a saved trainer state has its layer's weight's shape.

    ``MetaQuant.state_dict()["records"]`` holds, per quantized layer, the recorded ``g_Ŵ`` and ``W̃`` (shaped as
    the layer's weight); a state saved for another model must be refused when it is loaded, not at the next
    step.

    Args:
        records: ``{layer name: {"grad_w_hat": Tensor | None, "w_tilde": Tensor | None, ...}}``.
        weights: ``{layer name: the layer's weight}`` of the model the state is loaded into.

    Raises:
        ValueError: a layer of ``records`` is not in ``weights`` or the other way round, or a recorded tensor
            has another shape; the message names the layer and both shapes.

    Example:
        >>> weights = {"fc": torch.zeros(3, 4)}
        >>> mq.guards.check_state_shapes({"fc": {"grad_w_hat": torch.zeros(3, 4), "w_tilde": None}}, weights)
        >>> mq.guards.check_state_shapes({"fc": {"grad_w_hat": torch.zeros(5, 4), "w_tilde": None}}, weights)
        Traceback (most recent call last):
        ...
        ValueError: saved state does not fit layer fc: its grad_w_hat has shape (5, 4), the layer's weight (3, 4)
    """
    differ = sorted(set(records) ^ set(weights))
    if differ:
        raise ValueError(f"saved state does not match the model's quantized layers: {differ[:5]} differ")
    for name, record in records.items():
        for key, value in record.items():
            if key in ("grad_w_hat", "w_tilde") and isinstance(value, Tensor) and value.shape != weights[name].shape:
                raise ValueError(
                    f"saved state does not fit layer {name}: its {key} has shape {tuple(value.shape)}, "
                    f"the layer's weight {tuple(weights[name].shape)}"
                )


def check_requantization(name: str, current: Any, requested: Any) -> None:
    """Raise if a layer already quantized with ``current`` is asked to be quantized with another ``requested``.

    ``quantize_`` leaves quantized layers as they are; asking for another quantizer or bit width must not be
    silently ignored.

    Args:
        name: the layer's qualified name, for the message.
        current: the layer's ``ForwardQuantizer``.
        requested: the ``ForwardQuantizer`` asked for.

    Raises:
        ValueError: ``current != requested``; the message names the layer and both quantizers.

    Example:
        >>> mq.guards.check_requantization("fc", mq.get_quantizer("dorefa", 1), mq.get_quantizer("dorefa", 1))
        >>> try:
        ...     mq.guards.check_requantization("fc", mq.get_quantizer("dorefa", 1), mq.get_quantizer("bwn", 1))
        ... except ValueError as err:
        ...     print(err)
        layer fc is already quantized with DoReFa(bits=1), not BWN(bits=1); call dequantize_(model) first ...
    """
    if current != requested:
        raise ValueError(
            f"layer {name or '<root>'} is already quantized with {current!r}, not {requested!r}; "
            "call dequantize_(model) first to change it"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    def installed(self, *, exiting: bool = False) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM to this flag for the duration (main thread only; elsewhere a no-op).

        Args:
            exiting: for a process that ends once a stop was requested (the command line): on leaving the
                block after a stop, SIGINT and SIGTERM stay ignored instead of getting their previous handlers
                back, so that a second Ctrl-C during the shutdown cannot interrupt the last message or the
                interpreter's exit with a traceback. Without a stop, the previous handlers come back as usual.
        """
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
                signal.signal(s, signal.SIG_IGN if exiting and self else handler)
