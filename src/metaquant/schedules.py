"""Learning-rate schedules as pure functions of the epoch: ``step`` (the paper's ÷10 every 30 epochs), ``cosine``
and ``constant``.

Pure functions need no state in a checkpoint: a resumed run recomputes the same value. The factor scales the
base optimizer and the meta quantizer's optimizer; beside a ``torch.optim.lr_scheduler`` it multiplies the
scheduler's own rates (``set_scaled_rates``), so neither undoes the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SCHEDULES", "lr_factor", "scale_lr", "set_scaled_rates"]

SCHEDULES = ("step", "cosine", "constant")


def lr_factor(schedule: str, epoch: int, epochs: int, step_size: int = 30, gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based) of ``epochs``; 1.0 at epoch 0.

    ``step``: ``gamma ** (epoch // step_size)``; ``cosine``: ``(1 + cos(π·epoch/epochs)) / 2``; ``constant``: 1.

    Raises:
        ValueError: an unknown schedule, or ``step_size`` < 1 for ``step``.
    """
    if schedule == "step":
        if step_size < 1:
            raise ValueError(f"lr step size must be >= 1 epoch, got {step_size}")
        return gamma ** (epoch // step_size)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown lr schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set each parameter group's rate to ``factor`` times its initial one (kept as ``initial_lr``, the key
    ``torch.optim.lr_scheduler`` uses, so it travels with the ``state_dict``); factors do not compound."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def set_scaled_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float | torch.Tensor], factor: float) -> None:
    """Set group ``i``'s learning rate to ``rates[i] * factor``: a schedule's factor on top of a scheduler's
    ``get_last_lr()``, which never sees the factor.

    Raises:
        ValueError: ``rates`` does not have one entry per parameter group.
    """
    if len(rates) != len(optimizer.param_groups):
        raise ValueError(f"{len(rates)} rate(s) for {len(optimizer.param_groups)} parameter group(s)")
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate * factor
