"""One training step with a classical gradient estimator (or none, for full-precision training).

``Trainer.step(closure)`` is the interface every training algorithm of the library offers; ``MetaQuant`` has
the same one, so a comparison between STE and a meta quantizer differs only in the object doing the step::

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3), estimator=STE())
    for x, y in loader:
        loss = trainer.step(lambda: F.cross_entropy(model(x), y))

The closure computes the loss (a forward pass); the trainer zeroes gradients, back-propagates and lets the
optimizer update every parameter, exactly as a ``torch.optim`` training loop would.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .direct_uses import direct_uses, warn_direct_uses, watched_weights
from .distributed import any_process, unwrap
from .estimators import STE, ClassicalEstimator, fake_quantize_many
from .guards import (
    BufferSnapshot,
    check_closure,
    check_loss,
    check_optimizer,
    check_policy,
    check_trainer_inputs,
    first_nonfinite,
    reject_step,
)
from .layers import QuantLayer, check_weight_hooks, forward_tensors, quantized_layers
from .layers.convert import check_optimizer_trains_quantizers
from .quantizers import ForwardQuantizer

__all__ = ["Trainer"]

Closure = Callable[[], Tensor]


def closures_of(closure: Closure | Sequence[Closure]) -> list[Closure]:
    """``step``'s argument as a list of closures: one, or one per micro-batch (gradient accumulation).

    Raises:
        TypeError: not a callable nor a non-empty sequence of callables (the message says what ``step`` needs).
    """
    closures = list(closure) if isinstance(closure, (list, tuple)) else [closure]
    if not closures:
        raise TypeError(
            "step(closure) needs a closure, or a non-empty list of closures (one per micro-batch); got an empty list"
        )
    return [check_closure(c) for c in closures]


def check_learning_rates(optimizer: Any, name: str = "optimizer") -> None:
    """Raise unless each param group's ``lr`` is a finite number >= 0 (0 is allowed: a schedule may stop a group).

    ``torch.optim`` lets a NaN rate through (``nan < 0`` is False) and never sees one set on a group later; a
    negative rate would ascend the loss. A tensor rate is read only on the CPU (elsewhere reading it would wait
    for the device).

    Raises:
        ValueError: names ``name``, the group's index and its rate.
    """
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            if lr.device.type != "cpu" or lr.numel() != 1:
                continue
            lr = lr.item()
        if lr is not None and not (_is_real(lr) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"{name} param group {i} has lr={lr!r}; a learning rate must be a finite number >= 0")


def _is_real(value: Any) -> bool:
    """A real number as ``torch.optim`` takes one (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


GradMarks = list[tuple[int, int] | None]


def grad_marks(tensors: Iterable[Tensor]) -> GradMarks:
    """Which ``.grad`` each tensor holds now, and its version (an in-place accumulation changes it)."""
    return [None if t.grad is None else (id(t.grad), t.grad._version) for t in tensors]


def check_no_backward(before: GradMarks, tensors: Iterable[Tensor]) -> None:
    """Raise if a gradient appeared or changed since ``before``: the closure back-propagated by itself.

    Raises:
        RuntimeError: says that the closure must return the loss and leave ``backward`` to ``step``.
    """
    # a gradient that appeared or was accumulated into; one the closure cleared (zero_grad) is no backward pass
    if any(after is not None and after != was for was, after in zip(before, grad_marks(tensors))):
        raise RuntimeError(
            "the closure called backward() itself; it must only run the forward pass and return the loss: step() "
            "back-propagates (and scales, accumulates and checks the gradients) — remove loss.backward() from the "
            "closure; for gradient accumulation pass a list of closures, one per micro-batch"
        )


class Trainer:
    """Plain back-propagation; quantized layers use ``estimator`` for the gradient through the quantizer.

    Args:
        model: the model; its quantized layers (if any) were installed by ``quantize_``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        estimator: the classical estimator for quantized layers (default: clipped STE, the paper's baseline).
        on_nonfinite: ``"raise"`` (default) stops with ``NonFiniteError`` before any update when the loss or a
            gradient is not finite; ``"skip"`` undoes the forward pass's BatchNorm statistics and skips the step.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: the loss is scaled before the backward
            pass, the gradients unscaled before the update, and a step whose scaled gradients overflowed is
            skipped, its BatchNorm statistics undone, while the scaler lowers its scale (not an error, not counted
            in ``skipped_steps`` but in ``overflow_steps``, the number of such steps since the trainer was made).

    The first step warns once about each quantized weight the loss reads directly (``metaquant.direct_uses``).

    Raises:
        TypeError: ``estimator`` is not a ``ClassicalEstimator``, ``model`` not a module, ``optimizer`` not an
            optimizer, ``grad_scaler`` not a gradient scaler; a quantized weight that a forward pre-hook
            recomputes (pruning, the older ``weight_norm``/``spectral_norm``).
        ValueError: ``on_nonfinite`` is not one of ``NONFINITE_POLICIES``; ``optimizer`` lacks an input quantizer's
            Parameter (build it after ``quantize_``); a param group's ``lr`` is not a finite number >= 0.

    Example:
        Three STE steps of a 1-bit linear layer; with ``"skip"`` a NaN loss leaves the weights as they were:

        >>> import torch.nn.functional as F
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="skip")
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> losses = [trainer.step(lambda: F.cross_entropy(model(x), y)).item() for _ in range(3)]
        >>> w = model[1].weight.detach().clone()
        >>> _ = trainer.step(lambda: F.cross_entropy(model(x), y) * float("nan"))
        >>> torch.equal(model[1].weight, w), trainer.skipped_steps
        (True, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        estimator: ClassicalEstimator | None = None,
        *,
        on_nonfinite: str = "raise",
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        estimator = STE() if estimator is None else estimator
        if not isinstance(estimator, ClassicalEstimator):
            raise TypeError(f"estimator must be a ClassicalEstimator (STE, Identity, EWGS), got {estimator!r}")
        check_policy(on_nonfinite)
        check_optimizer(optimizer)
        check_learning_rates(optimizer)
        check_trainer_inputs(model, grad_scaler)
        check_weight_hooks(model)
        check_optimizer_trains_quantizers(unwrap(model), optimizer)
        self.model = model
        self.optimizer = optimizer
        self.estimator = estimator
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.overflow_steps = 0
        self.grad_scaler = grad_scaler
        self._forward_weights: list[Tensor] = []  # the latent weights of this step's Ŵ
        self._uses_checked = False  # the first step looks for direct uses of quantized weights
        self._uses_warned: set[str] = set()
        # the layers' quantizer configurations the optimizer was last checked against (a user may change them)
        self._configurations: list[ForwardQuantizer] = []

    def _quantized_forward(self) -> contextlib.AbstractContextManager[Any]:
        """A scope in which every quantized layer computes with this step's ``Ŵ``, made for all layers at once.

        ``fake_quantize_many`` quantizes the weights that share a quantizer in one pass (``Ŵ`` and the
        estimator's gradient equal each layer's own ``fake_quantize`` to the bit), instead of one pass per
        layer inside the forward pass. A weight tied between layers is quantized once; a layer that already
        has its forward tensors or function from the caller keeps them.
        """
        # keyed by id, the tensor kept alive beside it: a weight computed on access (a parametrization) is a
        # new tensor each time, and a freed one's id could be reused by the next layer's
        by_weight: dict[tuple[int, ForwardQuantizer], tuple[Tensor, list[QuantLayer]]] = {}
        layers = quantized_layers(unwrap(self.model)).values()
        configurations = [layer.configured_quantizer for layer in layers]
        if configurations != self._configurations:  # a new learned step must be trained: refuse one the
            check_optimizer_trains_quantizers(unwrap(self.model), self.optimizer)  # optimizer lacks
            self._configurations = configurations
        for layer in layers:
            if layer.param_fn is None and layer.param_override is None:
                w = layer.weight
                by_weight.setdefault((id(w), layer.quantizer), (w, []))[1].append(layer)
        owners = list(by_weight.values())
        self._forward_weights = [w for w, _ in owners]
        if not by_weight:
            return contextlib.nullcontext()
        quantized = fake_quantize_many([w for w, _ in owners], [ls[0].quantizer for _, ls in owners], self.estimator)
        return forward_tensors(
            {
                layer: (w_hat, cast("Tensor | None", layer.bias))
                for (_, ls), (w_hat, _) in zip(owners, quantized)
                for layer in ls
            }
        )

    def _say_direct_uses(self, loss: Tensor) -> None:
        """Warn once per quantized weight that ``loss`` reads other than through its ``Ŵ`` (see ``direct_uses``)."""
        watched = watched_weights(unwrap(self.model))
        weights = [w for w in self._forward_weights if id(w) in watched]
        if not weights:
            return
        found = [watched[id(weights[i])] for i in direct_uses(loss, weights)]
        warn_direct_uses(found, self._uses_warned, "Trainer back-propagates through that use as written.")

    def step(
        self, closure: Closure | Sequence[Closure], *, before_update: Callable[[Trainer], None] | None = None
    ) -> Tensor:
        """Zero the gradients, compute ``closure()``, back-propagate, update. Returns the loss (detached).

        Args:
            closure: runs the forward pass on a batch and returns the scalar loss (without calling ``backward``);
                or a list of such closures, one per micro-batch, for gradient accumulation: each is called and
                back-propagated in turn (one micro-batch's activations in memory at a time) with its loss divided
                by their number, so for equal micro-batches, mean-reduced losses and no BatchNorm in training
                mode (its batch statistics are per micro-batch) the update equals one step on their union.
            before_update: called with the trainer after the backward pass (gradients unscaled, checked finite)
                and before the optimizer's step, e.g. to clip ``p.grad`` of ``trainer.model.parameters()``
                in place; the step uses the gradients as the hook leaves them.

        Returns:
            The loss, detached (the mean over micro-batches); with ``on_nonfinite="skip"``, a skipped step's
            non-finite loss.

        Raises:
            NonFiniteError: the loss or a gradient is not finite (``on_nonfinite="raise"``); nothing was updated.
            RuntimeError: a closure called ``backward`` itself.
            TypeError: ``closure`` is not callable nor a non-empty list of callables; ``before_update`` not callable.
            ValueError: a param group's ``lr`` is not a finite number >= 0 (e.g. set by hand since the last step).

        Example:
            Clipping the gradients between the backward pass and the update, over two micro-batches:

            >>> import torch.nn.functional as F
            >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
            >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
            >>> clip = lambda t: torch.nn.utils.clip_grad_norm_(t.model.parameters(), max_norm=0.5)
            >>> halves = [lambda: F.cross_entropy(model(x[:3]), y[:3]), lambda: F.cross_entropy(model(x[3:]), y[3:])]
            >>> loss = trainer.step(halves, before_update=clip)
            >>> loss.shape
            torch.Size([])
        """
        closures = closures_of(closure)
        if before_update is not None:
            check_trainer_inputs(self.model, before_update=before_update)
        check_learning_rates(self.optimizer)  # a rate set on a group since the last step
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        # a skipped step (non-finite with "skip", or an fp16 overflow) undoes the forward pass's BatchNorm statistics
        snapshot = BufferSnapshot(self.model) if self.on_nonfinite == "skip" or scaler is not None else None
        params = list(self.model.parameters())
        bad: str | None = None
        total: Tensor | None = None
        for part in closures:
            marks = grad_marks(params)
            with self._quantized_forward():  # a fresh Ŵ per micro-batch: each backward frees its own graph
                loss = check_loss(part())
            check_no_backward(marks, params)
            if not self._uses_checked:
                self._say_direct_uses(loss)
            # under data parallelism every process must take the same branch (backward runs collectives)
            if any_process(first_nonfinite({"loss": [loss]}) is not None):
                bad = "loss"
                break
            # k = 1 back-propagates the loss itself, so that a single closure's gradients are unchanged to the bit
            scaled = loss if len(closures) == 1 else loss / len(closures)
            (scaled if scaler is None else scaler.scale(scaled)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self._uses_checked = True
        if bad is None:
            assert total is not None  # closures is not empty, and every one was back-propagated
            loss = total if len(closures) == 1 else total / len(closures)
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            bad = first_nonfinite({"gradients": (p.grad for p in self.model.parameters())})
        if bad == "gradients" and scaler is not None:
            # The fp16 loss scale overflowed: as scaler.step does, skip the update and let the scaler back off.
            scaler.step(self.optimizer)
            scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.overflow_steps += 1
            assert snapshot is not None  # taken whenever there is a scaler
            snapshot.restore()
            return loss.detach()
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            kept = snapshot if self.on_nonfinite == "skip" else None  # None: reject_step raises
            self.skipped_steps = reject_step(bad, kept, self.skipped_steps)
            return loss.detach()
        if before_update is not None:
            before_update(self)
        self.optimizer.step()
        if scaler is not None:
            scaler.update()
        return loss.detach()

    def set_epoch(self, epoch: int) -> None:
        """Called by ``fit`` at the start of each epoch (nothing to do for classical estimators)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model and the base optimizer (nothing for classical estimators)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept what ``state_dict`` saved (an empty dict).

        Raises:
            ValueError: ``state`` is not empty (e.g. a MetaQuant trainer's state).
        """
        if state:
            raise ValueError(f"unexpected trainer state for a classical estimator: keys {sorted(state)}")
