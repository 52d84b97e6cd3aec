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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .estimators import STE, ClassicalEstimator, fake_quantize
from .distributed import any_process
from .guards import BufferSnapshot, check_policy, first_nonfinite, reject_step
from .layers import QuantLayer, forward_params_fn

__all__ = ["Trainer"]

Closure = Callable[[], Tensor]


class Trainer:
    """Plain back-propagation; quantized layers use ``estimator`` for the gradient through the quantizer.

    Args:
        model: the model; its quantized layers (if any) were installed by ``quantize_``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        estimator: the classical estimator for quantized layers (default: clipped STE, the paper's baseline).
        on_nonfinite: ``"raise"`` (default) stops with ``NonFiniteError`` before any update when the loss or a
            gradient is not finite; ``"skip"`` undoes the forward pass's BatchNorm statistics and skips the step.

    Raises:
        TypeError: ``estimator`` is not a ``ClassicalEstimator``.
        ValueError: ``on_nonfinite`` is not one of ``NONFINITE_POLICIES``.

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
        estimator: ClassicalEstimator = STE(),
        *,
        on_nonfinite: str = "raise",
    ) -> None:
        if not isinstance(estimator, ClassicalEstimator):
            raise TypeError(f"estimator must be a ClassicalEstimator (STE, Identity, EWGS), got {estimator!r}")
        check_policy(on_nonfinite)
        self.model = model
        self.optimizer = optimizer
        self.estimator = estimator
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0

    def _forward_params(self, layer: QuantLayer) -> tuple[Tensor, Tensor | None]:
        return fake_quantize(layer.weight, layer.quantizer, self.estimator), layer.bias

    def step(self, closure: Closure) -> Tensor:
        """Zero the gradients, compute ``closure()``, back-propagate, update. Returns the loss (detached).

        Args:
            closure: runs the forward pass on a batch and returns the scalar loss (without calling ``backward``).

        Returns:
            The loss, detached; with ``on_nonfinite="skip"``, a skipped step's non-finite loss.

        Raises:
            NonFiniteError: the loss or a gradient is not finite (``on_nonfinite="raise"``); nothing was updated.
        """
        self.optimizer.zero_grad(set_to_none=True)
        snapshot = BufferSnapshot(self.model) if self.on_nonfinite == "skip" else None
        # The layers' default is the clipped STE; another estimator is installed for this forward pass only.
        scope = (
            contextlib.nullcontext() if self.estimator == STE() else forward_params_fn(self.model, self._forward_params)
        )
        with scope:
            loss = closure()
        # under data parallelism every process must take the same branch (backward runs collectives)
        bad = "loss" if any_process(first_nonfinite({"loss": [loss]}) is not None) else None
        if bad is None:
            loss.backward()
            bad = first_nonfinite({"gradients": (p.grad for p in self.model.parameters())})
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps = reject_step(bad, snapshot, self.skipped_steps)
            return loss.detach()
        self.optimizer.step()
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
