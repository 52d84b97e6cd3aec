"""``fit``: the training loop shared by ``metaquant pretrain`` and ``metaquant quantize``, and ``restore_fit``, which
continues a run from its checkpoint.

``fit`` runs epochs of ``trainer.step`` over a loader, evaluates after each epoch, appends the metrics to the
run directory and writes a checkpoint. It knows nothing about which algorithm the trainer runs (full-precision
training, STE, or MetaQuant): they all offer ``step(closure)``, ``set_epoch`` and ``state_dict``. The loop itself
is ``metaquant.loop.FitLoop``; the features around it (schedules, weight averages, ...) are callbacks
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
    """Train ``model`` with ``trainer`` from ``state`` to the end of epoch ``epochs``.

    Args:
        model: the model (quantized or not).
        trainer: does one optimization step per batch.
        train_loader: any re-iterable of ``(x, y)`` batches: a ``TensorLoader``, a ``torch.utils.data.DataLoader``,
            a list. Its ``set_epoch`` is called at each epoch's start when it has one (a loader whose data order
            depends on the epoch only lets a resumed run see the same batches); its ``len``, when it has one,
            sizes the progress bar.
        test_loader: the evaluation batches, iterated once per epoch by ``evaluate`` (``fit`` calls no
            ``set_epoch`` on it).
        epochs: total number of epochs.
        schedule: ``epoch -> learning-rate factor`` of the base optimizer, set at each epoch's start (MetaQuant's
            meta optimizer follows the base optimizer's rate by itself): the rate is the initial rate times the
            factor or, with a ``scheduler``, the scheduler's current rate times the factor. None: ``fit`` leaves
            the rate to ``scheduler``, or constant.
        scheduler: a ``torch.optim.lr_scheduler`` of the trainer's optimizer, stepped by ``fit`` after every
            epoch (after the evaluation; ``ReduceLROnPlateau`` gets the epoch's test loss) or every step
            (``scheduler_interval``). It is stepped from its own rates, so ``schedule``'s factor and the
            scheduler compose and neither undoes the other. Its ``state_dict`` goes into each checkpoint as
            ``"scheduler"``; ``restore_fit`` gives it back.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler is stepped.
        run: where metrics and checkpoints go (None: keep nothing, e.g. in tests and notebooks).
        state: where to start (a resumed run's saved state, possibly mid-epoch); default the beginning.
        extra_checkpoint: more entries for each checkpoint (e.g. the configuration).
        progress: show a tqdm bar per epoch.
        stop: when it becomes true (SIGINT/SIGTERM), stop after the current step with a checkpoint.
        checkpoint_every: also write a checkpoint every N steps within an epoch (0: at epoch ends only).
        on_epoch_end: called with the number of epochs done, after each epoch's checkpoint (and with 0 before
            the first epoch of a run that starts from the beginning).
        max_skipped: stop with ``SkipLimitError`` once more steps than this were skipped for non-finite values
            in the whole run (None: no limit). Skipping is the trainer's ``on_nonfinite="skip"``.
        amp: mixed precision of the forward pass, one of ``metaquant.precision.AMP_MODES`` (``"bf16"``: under
            ``torch.autocast`` in bfloat16; the loss is taken in float32).
        criterion: the training loss, ``(logits, targets, inputs) -> scalar``, e.g. a
            ``metaquant.distill.Distillation`` (default: the cross-entropy of the logits and the targets). Each
            epoch's ``train_loss`` stays the labels' cross-entropy, comparable with runs without a criterion;
            the criterion's mean is recorded beside it as ``train_objective`` and per step in ``loss.csv``.
        precise_bn_batches: before each evaluation, recompute the BatchNorm statistics from the epoch's first
            ``N`` batches of ``train_loader``, iterated again (``metaquant.batchnorm.recompute_batchnorm_stats``;
            the checkpoint keeps them); 0 evaluates with the running averages. A ``TensorLoader`` repeats the
            epoch's batches; a shuffling ``DataLoader`` gives other training batches, as good for the statistics.
            The global random generators are restored after the pass, so the training that follows is the same
            with or without it. Needs a ``train_loader`` that can be iterated again (not a generator).
        averaged: an average of the model's weights to deliver instead of the last ones, e.g.
            ``metaquant.averaging.ema_model(model, 0.999)`` (a ``torch.optim.swa_utils.AveragedModel`` of the
            unwrapped model), updated after every step except those skipped for non-finite values or by the fp16
            loss scaler (which leave the weights as they were). Each epoch evaluates it (with
            ``precise_bn_batches``, after recomputing its statistics: give both, as the average takes the
            trained model's) and the trained model: the average's accuracy is the epoch's ``test_acc`` (and
            ``best_acc``, ``last_acc``; ``ReduceLROnPlateau`` steps on its loss), the trained model's
            ``trained_test_acc``. Its ``state_dict`` goes into each checkpoint as ``"averaged"``; ``restore_fit``
            gives it back. Without ``precise_bn_batches`` the average is evaluated with the trained model's
            BatchNorm statistics, made for other weights: a warning says so.
        extra_metrics: more measurements of each epoch's delivered model (the average, if any) for its record,
            ``network -> {name: value}``, e.g. ``precise_bn_metrics``; called after the evaluation, between a
            save and a restore of the global random generators, so that the training that follows is the same.
        callbacks: more ``metaquant.loop.Callback`` objects, called after the built-in ones that the keywords
            from ``schedule`` on stand for (``keyword_callbacks``; they are in ``metaquant.callbacks``).

    After every step the model's parameters and buffers are checked: an update that made them non-finite
    stops the run (``NonFiniteError``) or, when the trainer skips non-finite steps, is undone from a
    ``StepSnapshot`` taken before the step and counted as a skipped step. Each epoch's record holds its
    number of skipped steps (``skipped_steps``); its training loss and accuracy are None when every step was
    skipped.

    Returns:
        The final ``FitState``.

    Raises:
        TrainingInterrupted: ``stop`` was set; with ``run``, a checkpoint of the exact position was written.
        NonFiniteError: a step produced a non-finite value, or its update made the weights non-finite; the
            message names the epoch, the step and the last good checkpoint, which is left as it was. Also
            raised, instead of writing, when ``run`` is set and the weights of a checkpoint about to be saved
            are not finite.
        SkipLimitError: more than ``max_skipped`` steps were skipped (a ``NonFiniteError``).
        ValueError: ``test_loader`` yielded no examples (from ``evaluate``); ``scheduler_interval`` not
            ``"epoch"`` or ``"step"``, or ``"step"`` with ``ReduceLROnPlateau`` (it needs the epoch's test loss);
            ``precise_bn_batches`` not an integer >= 0, or given with a one-shot iterator as ``train_loader``.

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
    """The built-in callbacks that ``fit``'s keywords stand for, in the order they act (see
    ``metaquant.callbacks``); each keyword left at its default adds none."""
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

    Restores the base optimizer, the trainer's state (MetaQuant: meta quantizer, its optimizer, the records),
    the random number generators, and, when given, the model's weights and the scheduler's state.

    Args:
        checkpoint: a checkpoint written by ``fit`` (``metaquant.files.load_checkpoint(run.checkpoint_path)``).
        trainer: the trainer, built as for the interrupted run (same model, optimizer and settings).
        model: the model whose weights to load (None: the caller has loaded them).
        scheduler: the scheduler ``fit`` was given, built anew on ``trainer.optimizer``; it must be given
            exactly when the checkpoint holds a scheduler's state.
        averaged: the weight average ``fit`` was given, built anew on the model; it must be given exactly when
            the checkpoint holds one.

    Returns:
        Where the run stands: pass it to ``fit`` as ``state``.

    Raises:
        ValueError: the checkpoint holds a scheduler's state and no scheduler was given, or the reverse; the
            same for a weight average.
        KeyError, RuntimeError, ValueError: from ``load_state_dict`` when the checkpoint belongs to another
            model, optimizer or trainer.

    Example:
        Two epochs, stopped after the first and continued, equal two epochs in one go:

        >>> import pathlib, tempfile
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.runs import RunDir
        >>> from metaquant.files import load_checkpoint
        >>> def setup():
        ...     torch.manual_seed(0)
        ...     model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     return model, mq.Trainer(model, opt), torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        >>> batches = [(torch.randn(4, 1, 4), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
        >>> model, trainer, sched = setup()
        >>> _ = mq.fit(model, trainer, batches, batches, epochs=2, schedule=None, scheduler=sched, progress=False)
        >>> run = RunDir.create(pathlib.Path(tempfile.mkdtemp()) / "run", RunConfig())
        >>> model2, trainer2, sched2 = setup()
        >>> _ = mq.fit(model2, trainer2, batches, batches, epochs=1, schedule=None, scheduler=sched2, run=run,
        ...            progress=False)
        >>> model2, trainer2, sched2 = setup()
        >>> state = mq.restore_fit(load_checkpoint(run.checkpoint_path), trainer2, model=model2, scheduler=sched2)
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
