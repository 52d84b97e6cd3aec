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
from .layers import QuantLayer, forward_params_fn

__all__ = ["Trainer"]

Closure = Callable[[], Tensor]


class Trainer:
    """Plain back-propagation; quantized layers use ``estimator`` for the gradient through the quantizer.

    Args:
        model: the model; its quantized layers (if any) were installed by ``quantize_``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        estimator: the classical estimator for quantized layers (default: clipped STE, the paper's baseline).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, estimator: ClassicalEstimator = STE()):
        if not isinstance(estimator, ClassicalEstimator):
            raise TypeError(f"estimator must be a ClassicalEstimator (STE, Identity, EWGS), got {estimator!r}")
        self.model = model
        self.optimizer = optimizer
        self.estimator = estimator

    def _forward_params(self, layer: QuantLayer) -> tuple[Tensor, Tensor | None]:
        return fake_quantize(layer.weight, layer.quantizer, self.estimator), layer.bias

    def step(self, closure: Closure) -> Tensor:
        """Zero the gradients, compute ``closure()``, back-propagate, update. Returns the loss (detached)."""
        self.optimizer.zero_grad(set_to_none=True)
        # The layers' default is the clipped STE; another estimator is installed for this forward pass only.
        scope = (
            contextlib.nullcontext() if self.estimator == STE() else forward_params_fn(self.model, self._forward_params)
        )
        with scope:
            loss = closure()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def set_epoch(self, epoch: int) -> None:
        """Called by ``fit`` at the start of each epoch (nothing to do for classical estimators)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model and the base optimizer (nothing for classical estimators)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"unexpected trainer state for a classical estimator: keys {sorted(state)}")
