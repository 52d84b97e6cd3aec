"""Learning-rate schedules as pure functions of the epoch.

The paper divides the learning rate by 10 every 30 epochs (``step``); ``cosine`` anneals to zero over the run;
``constant`` keeps it. Being pure functions of the epoch, they need no state to save or restore: a resumed run
recomputes the same value. The same factor scales the base optimizer and the meta quantizer's optimizer.
Beside a ``torch.optim.lr_scheduler`` (``fit(..., schedule=..., scheduler=...)``) the factor multiplies the
scheduler's own rates (``set_scaled_rates``) instead of the initial ones, so neither undoes the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SCHEDULES", "lr_factor", "scale_lr", "set_scaled_rates"]

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

    Returns:
        The factor; ``1.0`` at epoch 0 for every schedule.

    Raises:
        ValueError: unknown schedule (the message lists them) or non-positive ``step_size`` (``step`` only).

    Example:
        The paper's schedule over 100 epochs, and the cosine one half-way:

        >>> [round(mq.schedules.lr_factor("step", epoch, 100), 6) for epoch in (0, 29, 30, 60, 99)]
        [1.0, 1.0, 0.1, 0.01, 0.001]
        >>> mq.schedules.lr_factor("cosine", 50, 100)
        0.5
        >>> mq.schedules.lr_factor("linear", 0, 100)
        Traceback (most recent call last):
        ...
        ValueError: unknown lr schedule 'linear'; allowed: step, cosine, constant
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

    Args:
        optimizer: any ``torch.optim`` optimizer; its groups' ``lr`` are set in place.
        factor: the multiplier, e.g. from ``lr_factor``.

    Example:
        >>> opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 1.0}])
        >>> mq.schedules.scale_lr(opt, 0.5)
        >>> [(g["lr"], g["initial_lr"]) for g in opt.param_groups]
        [(0.05, 0.1), (0.5, 1.0)]
        >>> mq.schedules.scale_lr(opt, 1.0); [g["lr"] for g in opt.param_groups]  # not compounded
        [0.1, 1.0]
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def set_scaled_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float | torch.Tensor], factor: float) -> None:
    """Set group ``i``'s learning rate to ``rates[i] * factor``: a schedule's factor on top of other rates.

    ``fit`` uses it with a scheduler's own rates (``scheduler.get_last_lr()``): the optimizer trains at their
    product, and the scheduler, which is stepped from its own rates, never sees the factor.

    Args:
        optimizer: its groups' ``lr`` are set in place.
        rates: one rate per parameter group (a number, or a tensor as ``torch.optim`` allows).
        factor: the multiplier.

    Raises:
        ValueError: ``rates`` does not have one entry per parameter group.

    Example:
        >>> opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 1.0}])
        >>> mq.schedules.set_scaled_rates(opt, [0.2, 0.4], 0.5)
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.2]
    """
    if len(rates) != len(optimizer.param_groups):
        raise ValueError(f"{len(rates)} rate(s) for {len(optimizer.param_groups)} parameter group(s)")
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate * factor
