"""Learning-rate schedules as pure functions of the epoch.

The paper divides the learning rate by 10 every 30 epochs (``step``); ``cosine`` anneals to zero over the run;
``constant`` keeps it. Being pure functions of the epoch, they need no state to save or restore: a resumed run
recomputes the same value. The same factor scales the base optimizer and the meta quantizer's optimizer.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "lr_factor", "scale_lr"]

SCHEDULES = ("step", "cosine", "constant")


def lr_factor(schedule: str, epoch: int, epochs: int, step_size: int = 30, gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based) of a run of ``epochs`` epochs.

    Args:
        schedule: ``step`` (``gamma ** (epoch // step_size)``), ``cosine`` (``(1 + cos(π·epoch/epochs)) / 2``)
            or ``constant``.
        epoch: the current epoch, ``0 <= epoch < epochs``.
        epochs: the run's length.
        step_size: epochs between two divisions (``step`` only).
        gamma: the factor applied at each division (``step`` only).

    Raises:
        ValueError: unknown schedule (the message lists them) or non-positive ``step_size``.
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
    """Set each parameter group's learning rate to ``factor`` times its initial one.

    The initial rate is kept in the group as ``initial_lr`` (the key ``torch.optim.lr_scheduler`` uses), so it
    travels with the optimizer's ``state_dict`` and per-group rates are preserved.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
