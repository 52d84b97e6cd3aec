"""The built-in callbacks of the training loop: what ``fit``'s keywords turn into.

Each is a ``metaquant.loop.Callback`` and takes the keyword of ``fit`` it stands for, under its name:
``fit(..., scheduler=s, averaged=a)`` equals ``fit(..., callbacks=[LearningRateSchedule(scheduler=s),
WeightAverage(a)])``. ``fit`` puts its keywords' callbacks in the
order below, which is the order they act in (and in which their fields join a record and their entries a
checkpoint): ``SkipLimit``, ``PreciseBatchNorm``, ``ExtraMetrics``, ``LearningRateSchedule``, ``WeightAverage``,
``MidEpochCheckpoints``, ``CheckpointExtras``, ``EpochEndHook``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .batchnorm import batches_to_read, batchnorm_layers, recompute_batchnorm_stats
from .distributed import unwrap
from .guards import SkipLimitError
from .loop import Callback, FitLoop, StepResult
from .rng import rng_state, set_rng_state
from .schedules import scale_lr, set_scaled_rates
from .validation import check_int

__all__ = [
    "SkipLimit",
    "PreciseBatchNorm",
    "ExtraMetrics",
    "LearningRateSchedule",
    "WeightAverage",
    "MidEpochCheckpoints",
    "CheckpointExtras",
    "EpochEndHook",
]

# fit's messages have always come from this logger; users filter on its name
logger = logging.getLogger("metaquant.training")


class SkipLimit(Callback):
    """Stops the run with ``SkipLimitError`` once more than ``max_skipped`` of its steps were skipped for
    non-finite values (``fit``'s ``max_skipped``)."""

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped = max_skipped

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        if step.skipped and loop.state.skipped > self.max_skipped:
            raise SkipLimitError(
                f"{loop.state.skipped} steps skipped for non-finite values, more than the limit of "
                f"{self.max_skipped}, at {loop.position()}; the run is failing (a lower learning rate?); last good "
                f"checkpoint: {loop.last_good()}"
            )


class PreciseBatchNorm(Callback):
    """Before each evaluation, recomputes the network's BatchNorm statistics from the epoch's first
    ``precise_bn_batches`` training batches (0: none), leaving the global random generators as they were.

    Raises:
        ValueError: ``precise_bn_batches`` not an integer >= 0; at the start, a one-shot iterator as the training
            loader.
    """

    def __init__(self, precise_bn_batches: int) -> None:
        self.precise_bn_batches = check_int("precise_bn_batches", precise_bn_batches, minimum=0)
        self._told: set[int] = set()  # the short lengths of train_loader already reported

    def on_fit_start(self, loop: FitLoop) -> None:
        if self.precise_bn_batches and isinstance(loop.train_loader, Iterator):
            raise ValueError(
                f"precise_bn_batches {self.precise_bn_batches} iterates train_loader again after each epoch's "
                f"training; a one-shot {type(loop.train_loader).__name__} cannot be: pass a loader or a list"
            )

    def before_evaluation(self, loop: FitLoop, network: nn.Module) -> None:
        if self.precise_bn_batches:
            generators = rng_state()  # a DataLoader draws from them: the training that follows must not change
            num_batches = batches_to_read(loop.train_loader, self.precise_bn_batches, self._told, "precise_bn_batches")
            recompute_batchnorm_stats(network, loop.train_loader, num_batches)
            set_rng_state(generators)


class ExtraMetrics(Callback):
    """Adds ``extra_metrics(network)``'s fields to each epoch's record, measured on the delivered network
    between a save and a restore of the global random generators."""

    def __init__(self, extra_metrics: Callable[[nn.Module], dict[str, float]]) -> None:
        self.extra_metrics = extra_metrics

    def on_evaluate(self, loop: FitLoop, test: dict[str, float]) -> dict[str, float]:
        generators = rng_state()
        extras = self.extra_metrics(loop.delivered)
        set_rng_state(generators)
        return extras


class LearningRateSchedule(Callback):
    """The base optimizer's learning rate (see ``fit``): ``schedule``'s factor set at each epoch's start, and
    ``scheduler`` stepped from its own rates after each evaluation or each step, its state in each checkpoint.

    Raises:
        ValueError: ``scheduler_interval`` not ``"epoch"`` or ``"step"``, or ``"step"`` with ``ReduceLROnPlateau``.
    """

    def __init__(
        self,
        schedule: Callable[[int], float] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler_interval == "step":
            raise ValueError("ReduceLROnPlateau steps on the epoch's test loss: use scheduler_interval='epoch'")
        self.schedule, self.scheduler, self.scheduler_interval = schedule, scheduler, scheduler_interval

    def on_epoch_start(self, loop: FitLoop) -> None:
        self._set_rates(loop)

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        if self.scheduler_interval == "step":
            self._step_scheduler(loop, None)

    def on_evaluate(self, loop: FitLoop, test: dict[str, float]) -> dict[str, float]:
        if self.scheduler_interval == "epoch":
            self._step_scheduler(loop, test["loss"])
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        return {} if self.scheduler is None else {"scheduler": self.scheduler.state_dict()}

    def load_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])

    def _set_rates(self, loop: FitLoop) -> None:
        if self.schedule is None:
            return
        factor = self.schedule(loop.state.epoch)
        if self.scheduler is None:
            scale_lr(loop.trainer.optimizer, factor)
        else:
            set_scaled_rates(loop.trainer.optimizer, self.scheduler.get_last_lr(), factor)

    def _step_scheduler(self, loop: FitLoop, test_loss: float | None) -> None:
        if self.scheduler is None:
            return
        if self.schedule is not None:  # the scheduler steps from its own rates, without the schedule's factor
            set_scaled_rates(loop.trainer.optimizer, self.scheduler.get_last_lr(), 1.0)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(test_loss if test_loss is not None else math.inf)
        else:
            self.scheduler.step()
        self._set_rates(loop)


class WeightAverage(Callback):
    """Delivers ``averaged``, an average of the model's weights, instead of the last ones (see ``fit``): updated
    after every step that changed the weights, evaluated for the record's ``test_acc``, kept in each checkpoint.

    Raises:
        TypeError: ``averaged`` is not a ``torch.optim.swa_utils.AveragedModel``.
    """

    def __init__(self, averaged: AveragedModel) -> None:
        if not isinstance(averaged, AveragedModel):
            raise TypeError(f"averaged must be a torch.optim.swa_utils.AveragedModel, got {type(averaged).__name__}")
        self.averaged = averaged

    def on_fit_start(self, loop: FitLoop) -> None:
        loop.delivered = self.averaged.module
        precise = any(isinstance(c, PreciseBatchNorm) and c.precise_bn_batches for c in loop.callbacks)
        if not precise and batchnorm_layers(self.averaged.module):
            logger.warning(
                "the weight average is evaluated with the trained model's BatchNorm statistics, gathered for other "
                "weights; give `precise_bn_batches` to recompute them for the average"
            )

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        # a step the fp16 loss scaler skipped made no update: the average must not count the weights twice
        if step.updated:
            self.averaged.update_parameters(unwrap(loop.model))

    def checkpoint_state(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict()}

    def load_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        self.averaged.load_state_dict(checkpoint["averaged"])


class MidEpochCheckpoints(Callback):
    """Also writes a checkpoint every ``checkpoint_every`` steps within an epoch; the epoch's last step is left
    to the epoch's own checkpoint.

    Raises:
        ValueError: ``checkpoint_every`` not an integer >= 1.
    """

    def __init__(self, checkpoint_every: int) -> None:
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        done = loop.state.batch
        if done % self.checkpoint_every == 0 and (loop.batches is None or done < loop.batches):
            loop.request_checkpoint()


class CheckpointExtras(Callback):
    """Adds ``extra_checkpoint()``'s entries to each checkpoint (e.g. the run's configuration)."""

    def __init__(self, extra_checkpoint: Callable[[], dict[str, Any]]) -> None:
        self.extra_checkpoint = extra_checkpoint

    def checkpoint_state(self) -> dict[str, Any]:
        return self.extra_checkpoint()


class EpochEndHook(Callback):
    """Calls ``on_epoch_end`` with the number of epochs done after each epoch's checkpoint, and with 0 before the
    first epoch of a run that starts from the beginning."""

    def __init__(self, on_epoch_end: Callable[[int], None]) -> None:
        self.hook = on_epoch_end

    def on_fit_start(self, loop: FitLoop) -> None:
        if loop.state.epoch == 0 and loop.state.batch == 0:
            self.hook(0)

    def on_epoch_end(self, loop: FitLoop, record: dict[str, Any]) -> None:
        self.hook(loop.state.epoch)
