"""``fit``, the training loop of every run (full precision, STE, MetaQuant), and ``restore_fit``, which continues a
run from its checkpoint.

``fit`` runs ``metaquant.loop.FitLoop``; the features around it (schedules, weight averages, ...) are callbacks
(``metaquant.callbacks``), made from ``fit``'s keywords or given as ``callbacks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .callbacks import (
    CheckpointExtras,
    EpochEndHook,
    ExtraMetrics,
    LearningRateSchedule,
    MidEpochCheckpoints,
    PreciseBatchNorm,
    SkipLimit,
    WeightAverage,
)
from .distributed import unwrap
from .evaluation import evaluate, precise_bn_metrics
from .guards import StopFlag
from .loop import Callback, FitLoop, FitState, RunLog, StepTrainer
from .rng import rng_state, seed_everything, set_rng_state
from .schedules import lr_factor

__all__ = [
    "evaluate",
    "fit",
    "restore_fit",
    "precise_bn_metrics",
    "FitState",
    "rng_state",
    "set_rng_state",
    "seed_everything",
]


def fit(
    model: nn.Module,
    trainer: StepTrainer,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    test_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    schedule: Callable[[int], float] | None,
    run: RunLog | None = None,
    state: FitState | None = None,
    extra_checkpoint: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
    stop: StopFlag | None = None,
    checkpoint_every: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
    max_skipped: int | None = None,
    amp: str = "none",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scheduler_interval: str = "epoch",
    criterion: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    precise_bn_batches: int = 0,
    averaged: AveragedModel | None = None,
    extra_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitState:
    """Train ``model`` with ``trainer`` from ``state`` to the end of epoch ``epochs``; the final ``FitState``.

    Each epoch runs ``trainer.step`` over ``train_loader`` (its ``set_epoch`` is called when it has one, its
    ``len`` sizes the progress bar), evaluates on ``test_loader``, records the epoch to ``run`` and writes a
    checkpoint there (``run=None`` keeps nothing). An update that makes the weights non-finite raises
    ``NonFiniteError`` or, with the trainer's ``on_nonfinite="skip"``, is undone and counted in the record's
    ``skipped_steps``.

    Args:
        schedule: ``epoch -> factor`` of the base optimizer's learning rate, applied at each epoch's start on top
            of the initial rate or of ``scheduler``'s current rate (they compose). None: the rate is left to
            ``scheduler``, or constant.
        scheduler: a ``torch.optim.lr_scheduler`` of the trainer's optimizer, stepped after each epoch's
            evaluation (``ReduceLROnPlateau`` gets the test loss) or each step (``scheduler_interval="step"``);
            checkpointed as ``"scheduler"``.
        state: where to start (from ``restore_fit``, possibly mid-epoch); default the beginning.
        extra_checkpoint: more entries for each checkpoint.
        stop: when it becomes true (SIGINT/SIGTERM), stop after the current step with a checkpoint.
        checkpoint_every: also checkpoint every N steps within an epoch (0: at epoch ends only).
        on_epoch_end: called with the number of epochs done after each epoch's checkpoint (and with 0 first when
            the run starts from the beginning).
        max_skipped: raise ``SkipLimitError`` once more steps than this were skipped in the run (None: no limit).
        amp: one of ``metaquant.precision.AMP_MODES``: the forward pass's autocast; the loss is taken in float32.
        criterion: the training loss ``(logits, targets, inputs) -> scalar``, e.g. a ``Distillation``; the record's
            ``train_loss`` stays the labels' cross-entropy and the criterion's mean is ``train_objective``.
        precise_bn_batches: recompute the BatchNorm statistics from N training batches before each evaluation
            (``recompute_batchnorm_stats``; the global generators are restored after, so training is unchanged);
            needs a ``train_loader`` that can be iterated again.
        averaged: a weight average to deliver (``ema_model``), updated after every step that changed the weights;
            its accuracy is the record's ``test_acc``, the trained model's ``trained_test_acc``; checkpointed as
            ``"averaged"``. Give ``precise_bn_batches`` too, else it is evaluated with the trained model's
            BatchNorm statistics (a warning says so).
        extra_metrics: ``network -> {name: value}`` measurements of each epoch's delivered model for its record
            (e.g. ``precise_bn_metrics``), with the global generators restored after.
        callbacks: more ``Callback`` objects, called after the built-in ones that the keywords stand for.

    Raises:
        TrainingInterrupted: ``stop`` was set; with ``run``, a checkpoint of the exact position was written.
        NonFiniteError: a non-finite loss or weights; the message names the step and the last good checkpoint,
            which is never overwritten with non-finite weights.
        SkipLimitError: more than ``max_skipped`` steps were skipped.
        ValueError: an empty ``test_loader``; ``scheduler_interval`` not ``"epoch"``/``"step"``, or ``"step"``
            with ``ReduceLROnPlateau``; ``precise_bn_batches`` not an integer >= 0, or with a one-shot iterator.

    Example:
        One epoch of STE training on 8 random 4×4 images, in two batches:

        >>> images, labels = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 3, (8,))
        >>> info = mq.data.DatasetInfo("toy", 3, 1, 4, (0.5,), (0.5,), "none")
        >>> train = mq.data.TensorLoader(mq.data.ImageTensors(images, labels), info, batch_size=4, train=True)
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)))
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state = mq.fit(model, trainer, train, list(train), epochs=1, schedule=lambda e: 1.0, progress=False)
        >>> state.epoch, state.iteration, 0.0 <= state.best_acc <= 100.0
        (1, 2, True)
    """
    loop = FitLoop(
        model,
        trainer,
        train_loader,
        test_loader,
        epochs=epochs,
        run=run,
        state=state,
        callbacks=[
            *keyword_callbacks(
                schedule=schedule,
                scheduler=scheduler,
                scheduler_interval=scheduler_interval,
                precise_bn_batches=precise_bn_batches,
                averaged=averaged,
                extra_metrics=extra_metrics,
                max_skipped=max_skipped,
                checkpoint_every=checkpoint_every,
                extra_checkpoint=extra_checkpoint,
                on_epoch_end=on_epoch_end,
            ),
            *callbacks,
        ],
        progress=progress,
        stop=stop,
        amp=amp,
        criterion=criterion,
    )
    return loop.fit()


def keyword_callbacks(
    *,
    schedule: Callable[[int], float] | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scheduler_interval: str = "epoch",
    precise_bn_batches: int = 0,
    averaged: AveragedModel | None = None,
    extra_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    max_skipped: int | None = None,
    checkpoint_every: int = 0,
    extra_checkpoint: Callable[[], dict[str, Any]] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[Callback]:
    """The built-in callbacks that ``fit``'s keywords stand for, in the order they act; a keyword left at its
    default adds none."""
    rates = LearningRateSchedule(schedule, scheduler, scheduler_interval)  # checks scheduler_interval even unused
    precise_bn = PreciseBatchNorm(precise_bn_batches)
    chosen: list[Callback | None] = [
        SkipLimit(max_skipped) if max_skipped is not None else None,
        precise_bn if precise_bn_batches else None,
        ExtraMetrics(extra_metrics) if extra_metrics is not None else None,
        rates if schedule is not None or scheduler is not None else None,
        WeightAverage(averaged) if averaged is not None else None,
        MidEpochCheckpoints(checkpoint_every) if checkpoint_every else None,
        CheckpointExtras(extra_checkpoint) if extra_checkpoint is not None else None,
        EpochEndHook(on_epoch_end) if on_epoch_end is not None else None,
    ]
    return [callback for callback in chosen if callback is not None]


def restore_fit(
    checkpoint: dict[str, Any],
    trainer: StepTrainer,
    *,
    model: nn.Module | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    averaged: AveragedModel | None = None,
) -> FitState:
    """Put back what a checkpoint of ``fit`` holds; the ``FitState`` to pass to ``fit`` to continue exactly.

    Restores the optimizer, the trainer's state (MetaQuant: meta quantizer, its optimizer, records), the random
    generators and, when given, the model's weights. ``scheduler`` and ``averaged``, built anew, must be given
    exactly when the checkpoint holds their state (else ValueError).

    Example:
        Two epochs, stopped after the first and continued, equal two epochs in one go:

        >>> import pathlib
        >>> from metaquant.files import load_checkpoint
        >>> class Run:  # a metaquant.loop.RunLog: the checkpoint file and the epochs' records
        ...     checkpoint_path = pathlib.Path("checkpoint.pt")
        ...     def record_epoch(self, record, losses): pass
        >>> def setup():
        ...     torch.manual_seed(0)
        ...     model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     return model, mq.Trainer(model, opt), torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        >>> batches = [(torch.randn(4, 1, 4), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
        >>> model, trainer, sched = setup()
        >>> _ = mq.fit(model, trainer, batches, batches, epochs=2, schedule=None, scheduler=sched, progress=False)
        >>> model2, trainer2, sched2 = setup()
        >>> _ = mq.fit(model2, trainer2, batches, batches, epochs=1, schedule=None, scheduler=sched2, run=Run(),
        ...            progress=False)
        >>> model2, trainer2, sched2 = setup()
        >>> checkpoint = load_checkpoint(Run.checkpoint_path)
        >>> state = mq.restore_fit(checkpoint, trainer2, model=model2, scheduler=sched2)
        >>> _ = mq.fit(model2, trainer2, batches, batches, epochs=2, schedule=None, scheduler=sched2, state=state,
        ...            progress=False)
        >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
        True
    """
    if (scheduler is None) != ("scheduler" not in checkpoint):
        if scheduler is None:
            raise ValueError("the checkpoint holds a scheduler's state: pass the scheduler to restore it")
        raise ValueError("a scheduler was given, but the checkpoint holds no scheduler state")
    if (averaged is None) != ("averaged" not in checkpoint):
        if averaged is None:
            raise ValueError("the checkpoint holds a weight average: pass the averaged model to restore it")
        raise ValueError("an averaged model was given, but the checkpoint holds no weight average")
    if model is not None:
        unwrap(model).load_state_dict(checkpoint["model"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.load_state_dict(checkpoint["trainer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if averaged is not None:
        averaged.load_state_dict(checkpoint["averaged"])
    set_rng_state(checkpoint["rng"])
    if "fit" not in checkpoint:  # written at an epoch's end by a version without mid-epoch positions
        return FitState(epoch=checkpoint["epoch"], iteration=checkpoint["iteration"], best_acc=checkpoint["best_acc"])
    state = FitState(**checkpoint["fit"])
    # as tuples, whatever sequence the checkpoint held; fit writes (iteration, loss) pairs
    state.epoch_losses = [cast("tuple[int, float]", tuple(x)) for x in state.epoch_losses]
    return state


def step_schedule(kind: str, epochs: int, step_size: int, gamma: float) -> Callable[[int], float]:
    """``epoch -> factor`` for ``fit`` from a schedule name (see ``schedules.lr_factor``)."""
    return lambda epoch: lr_factor(kind, epoch, epochs, step_size, gamma)
