"""The training loop shared by ``metaquant pretrain`` and ``metaquant quantize``.

``fit`` runs epochs of ``trainer.step`` over a loader, evaluates after each epoch, appends the metrics to the
run directory and writes a checkpoint. It knows nothing about which algorithm the trainer runs (full-precision
training, STE, or MetaQuant): they all offer ``step(closure)``, ``set_epoch`` and ``state_dict``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .batchnorm import batchnorm_layers, recompute_batchnorm_stats
from .distributed import all_reduce_sum, any_process, is_distributed, unwrap
from .files import save_checkpoint
from .guards import NonFiniteError, SkipLimitError, StepSnapshot, StopFlag, TrainingInterrupted, all_finite
from .precision import autocast
from .schedules import lr_factor, scale_lr, set_scaled_rates

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

logger = logging.getLogger(__name__)


class StepTrainer(Protocol):
    """What ``fit`` needs of a trainer (``Trainer``, ``MetaQuant``): one optimization step from a closure that
    returns the loss, the epoch, and a state to checkpoint."""

    optimizer: torch.optim.Optimizer

    def step(self, closure: Callable[[], Tensor]) -> Tensor: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RunLog(Protocol):
    """Where ``fit`` keeps a run (``metaquant.experiments.runs.RunDir`` is one): a checkpoint file, and a record
    of each epoch with the ``(iteration, loss)`` pairs of its steps."""

    @property
    def checkpoint_path(self) -> Path: ...
    def record_epoch(self, record: dict[str, Any], losses: list[tuple[int, float]]) -> None: ...


class EpochLoader(Protocol):
    """A loader that ``fit`` can reshuffle per epoch (``set_epoch``) and resume mid-epoch (``len``)."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self): ...


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: the seed of all three generators.

    Example:
        >>> import random, numpy as np
        >>> mq.training.seed_everything(1); first = (random.random(), np.random.rand(), torch.rand(1).item())
        >>> mq.training.seed_everything(1); first == (random.random(), np.random.rand(), torch.rand(1).item())
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run depends on, for a checkpoint, as tensors and plain Python values only (so the
    checkpoint loads with ``torch.load(weights_only=True)``).

    Returns:
        A dict with the states of Python's ``random`` (``"python"``), NumPy's global generator (``"numpy"``),
        torch's CPU generator (``"torch"``) and, when CUDA is available, of every CUDA device (``"cuda"``).

    Example:
        >>> saved = mq.training.rng_state()
        >>> torch.save(saved, "rng.pt")
        >>> {"python", "numpy", "torch"} <= set(torch.load("rng.pt", weights_only=True))
        True
    """
    kind, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved.

    Args:
        state: a dict returned by ``rng_state``, possibly saved and loaded with ``torch.load(weights_only=True)``.
            Its ``"cuda"`` entry is ignored when CUDA is not available.

    Example:
        >>> import random
        >>> torch.save(mq.training.rng_state(), "rng.pt")
        >>> drawn = (random.random(), torch.rand(2))
        >>> mq.training.set_rng_state(torch.load("rng.pt", weights_only=True))
        >>> again = (random.random(), torch.rand(2))
        >>> drawn[0] == again[0], torch.equal(drawn[1], again[1])
        (True, True)
    """
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of ``model`` in eval mode over ``loader``.

    Runs without gradients and puts ``model`` back in the mode it was in. Under data parallelism each process
    evaluates its shard and the sums are combined, so every process returns the metrics of the whole set.
    With fewer than 5 classes, "top-5" counts the top ``num_classes``.

    Args:
        model: returns logits ``[B, num_classes]`` for a batch ``x``.
        loader: any iterable of ``(x, y)`` batches (a ``TensorLoader``, a plain list), ``y`` int64 ``[B]``.

    Returns:
        ``{"loss": mean cross-entropy, "top1": percent, "top5": percent}`` over all examples.

    Raises:
        ValueError: ``loader`` yielded no examples.

    Example:
        A "model" that returns its input as the logits, over two batches; the loss is
        ``(2·log(1 + 2e⁻²) + log(e² + 2)) / 3``:

        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
        >>> batches = [(logits[:2], torch.tensor([0, 1])), (logits[2:], torch.tensor([0]))]
        >>> metrics = mq.evaluate(torch.nn.Identity(), batches)
        >>> round(metrics["loss"], 4), round(metrics["top1"], 2), metrics["top5"]
        (0.9062, 66.67, 100.0)
    """
    was_training = model.training
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    # data-parallel: each process evaluated its shard of the test set
    sums = all_reduce_sum([loss_sum, correct1, correct5, total])
    loss_sum, correct1, correct5, total = sums[0], int(sums[1]), int(sums[2]), int(sums[3])
    if total == 0:
        raise ValueError("evaluation loader yielded no examples")
    return {"loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


@dataclass
class FitState:
    """Where a run stands, enough to continue it exactly.

    ``epoch`` is the epoch in progress (or the next one), ``batch`` the number of its batches already done
    (non-zero only in a checkpoint written mid-epoch), and the ``epoch_*`` fields the running sums of the
    epoch's training statistics. ``iteration`` counts the steps of the whole run, ``best_acc`` and ``last_acc``
    are the best and the latest test top-1 accuracy (percent), and ``epoch_losses`` the ``(iteration, loss)``
    pairs of the epoch (the loss the trainer minimised). ``epoch_loss_sum`` sums the labels' cross-entropy and,
    with a ``criterion`` other than it, ``epoch_objective_sum`` that criterion. ``skipped`` counts the steps
    skipped for non-finite values in the whole run and ``epoch_skipped`` those of the epoch. ``fit`` returns it
    and saves it in each checkpoint as ``dataclasses.asdict(state)``.

    Example:
        >>> import dataclasses
        >>> state = mq.training.FitState(epoch=2, batch=5, epoch_seen=640)
        >>> state.start_epoch(); state.epoch, state.batch, state.epoch_seen
        (2, 0, 0)
        >>> mq.training.FitState(**dataclasses.asdict(state)) == state  # a checkpoint's "fit" entry, read back
        True
    """

    epoch: int = 0
    iteration: int = 0
    best_acc: float = 0.0
    last_acc: float = float("nan")
    batch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_objective_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_losses: list[tuple[int, float]] = field(default_factory=list)
    skipped: int = 0
    epoch_skipped: int = 0

    def start_epoch(self) -> None:
        """Reset ``batch`` and the epoch's running statistics (``epoch`` itself is left to the caller)."""
        self.batch, self.epoch_loss_sum, self.epoch_correct, self.epoch_seen = 0, 0.0, 0, 0
        self.epoch_objective_sum = 0.0
        self.epoch_losses = []
        self.epoch_skipped = 0


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
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if isinstance(precise_bn_batches, bool) or not isinstance(precise_bn_batches, int) or precise_bn_batches < 0:
        raise ValueError(f"precise_bn_batches must be an integer >= 0, got {precise_bn_batches!r}")
    if precise_bn_batches and isinstance(train_loader, Iterator):
        raise ValueError(
            f"precise_bn_batches {precise_bn_batches} iterates train_loader again after each epoch's training; "
            f"a one-shot {type(train_loader).__name__} cannot be: pass a loader or a list"
        )
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and scheduler_interval == "step":
        raise ValueError("ReduceLROnPlateau steps on the epoch's test loss: use scheduler_interval='epoch'")

    def set_rates(epoch: int) -> None:
        if schedule is None:
            return
        if scheduler is None:
            scale_lr(trainer.optimizer, schedule(epoch))
        else:
            set_scaled_rates(trainer.optimizer, scheduler.get_last_lr(), schedule(epoch))

    def step_scheduler(epoch: int, test_loss: float | None = None) -> None:
        assert scheduler is not None
        if schedule is not None:  # the scheduler steps from its own rates, without the schedule's factor
            set_scaled_rates(trainer.optimizer, scheduler.get_last_lr(), 1.0)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(test_loss if test_loss is not None else math.inf)
        else:
            scheduler.step()
        set_rates(epoch)

    state = state or FitState()
    if averaged is not None and not isinstance(averaged, AveragedModel):
        raise TypeError(f"averaged must be a torch.optim.swa_utils.AveragedModel, got {type(averaged).__name__}")
    if averaged is not None and not precise_bn_batches and batchnorm_layers(averaged.module):
        logger.warning(
            "the weight average is evaluated with the trained model's BatchNorm statistics, gathered for other "
            "weights; give precise_bn_batches (--precise-bn) to recompute them for the average"
        )
    skip = getattr(trainer, "on_nonfinite", "raise") == "skip"
    weights = [*unwrap(model).parameters(), *unwrap(model).buffers()]

    def last_good() -> str:
        return str(run.checkpoint_path) if run is not None and run.checkpoint_path.exists() else "none yet"

    def save(mid_epoch: bool = False) -> None:
        # A mid-epoch checkpoint holds the epoch's running sums of all processes (a collective: every process
        # calls save; only the writer writes). A resumed run gives them back to rank 0 alone.
        fit_state = dataclasses.asdict(state)
        if mid_epoch and is_distributed():
            sums = all_reduce_sum(
                [state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_objective_sum]
            )
            fit_state.update(
                epoch_loss_sum=sums[0], epoch_correct=int(sums[1]), epoch_seen=int(sums[2]), epoch_objective_sum=sums[3]
            )
        if run is None:
            return
        checkpoint = {
            "model": unwrap(model).state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "trainer": trainer.state_dict(),
            "epoch": state.epoch,
            "iteration": state.iteration,
            "best_acc": state.best_acc,
            "fit": fit_state,
            "rng": rng_state(),
            **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
            **({"averaged": averaged.state_dict()} if averaged is not None else {}),
            **(extra_checkpoint() if extra_checkpoint else {}),
        }
        if not all_finite(checkpoint["model"].values()):
            at = f"epoch {state.epoch + 1}, step {state.batch}" if mid_epoch else f"the end of epoch {state.epoch}"
            raise NonFiniteError(
                f"non-finite weights at {at} (iteration {state.iteration}); refusing to save "
                f"them over {run.checkpoint_path}, the last good checkpoint"
            )
        save_checkpoint(run.checkpoint_path, checkpoint)

    def measure(network: nn.Module) -> dict[str, float]:
        if precise_bn_batches:
            generators = rng_state()  # a DataLoader draws from them: the training that follows must not change
            recompute_batchnorm_stats(network, train_loader, precise_bn_batches)
            set_rng_state(generators)
        return evaluate(network, test_loader)

    if on_epoch_end is not None and state.epoch == 0 and state.batch == 0:
        on_epoch_end(0)
    for epoch in range(state.epoch, epochs):
        state.epoch = epoch
        set_rates(epoch)
        trainer.set_epoch(epoch)
        if hasattr(train_loader, "set_epoch"):  # e.g. a TensorLoader; a DataLoader has none
            train_loader.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        resume_at = state.batch
        batches = len(train_loader) if isinstance(train_loader, Sized) else None  # a generator has no len
        epoch_batches = iter(train_loader)
        # The batches done before the checkpoint this run resumed from: the loader replays the epoch (same order,
        # same augmentation), and they are drawn and dropped outside the bar, which starts at resume_at.
        replayed = sum(1 for _ in itertools.islice(epoch_batches, resume_at))
        if any_process(replayed < resume_at):  # every process takes the same branch: none waits in a collective
            raise ValueError(
                f"the training loader yields {replayed} batches in epoch {epoch + 1} (in this process), but the "
                f"state to resume from is at step {resume_at} of that epoch: the data, the batch size or the "
                f"number of processes differs from the run's; resume as the run was trained"
            )
        bar = tqdm(
            epoch_batches,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=not progress,
            total=batches,
            initial=resume_at,
        )
        for b, (x, y) in enumerate(bar, start=resume_at):
            logits_box: list[Tensor] = []

            def closure(x: Tensor = x, y: Tensor = y, logits_box: list[Tensor] = logits_box) -> Tensor:
                with autocast(amp, x.device):
                    logits = model(x)
                logits_box.append(logits)
                logits = logits if amp == "none" else logits.float()
                return F.cross_entropy(logits, y) if criterion is None else criterion(logits, y, x)

            where = f"epoch {epoch + 1}, step {b + 1} (iteration {state.iteration + 1})"
            snapshot = StepSnapshot(unwrap(model), trainer.optimizer, trainer) if skip else None
            skipped_before = getattr(trainer, "skipped_steps", 0)
            overflows_before = getattr(trainer, "overflow_steps", 0)
            try:
                loss = trainer.step(closure).item()
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"{err} at {where}; nothing was updated; last good checkpoint: {last_good()}"
                ) from None
            skipped = getattr(trainer, "skipped_steps", 0) > skipped_before
            # A finite update can still overflow the weights (e.g. a huge learning rate): every process checks,
            # so that all of them take the same branch.
            if not skipped and any_process(not all_finite(weights)):
                if snapshot is None:
                    raise NonFiniteError(
                        f"non-finite weights after the update at {where}; last good checkpoint: {last_good()}"
                    )
                snapshot.restore()
                if hasattr(trainer, "skipped_steps"):
                    trainer.skipped_steps = skipped_before + 1
                logger.warning("skipped the step at %s: its update made the weights non-finite", where)
                skipped = True
            # a step the fp16 loss scaler skipped made no update: the average must not count the weights twice
            overflowed = getattr(trainer, "overflow_steps", 0) > overflows_before
            if averaged is not None and not skipped and not overflowed:
                averaged.update_parameters(unwrap(model))
            state.iteration += 1
            state.batch = b + 1
            if skipped:
                state.skipped += 1
                state.epoch_skipped += 1
                if max_skipped is not None and state.skipped > max_skipped:
                    raise SkipLimitError(
                        f"{state.skipped} steps skipped for non-finite values, more than the limit of {max_skipped}, "
                        f"at {where}; the run is failing (a lower learning rate?); last good checkpoint: "
                        f"{last_good()}"
                    )
            elif math.isfinite(loss):  # a skipped step counts as a step but not in the statistics
                state.epoch_losses.append((state.iteration, loss))
                logits = logits_box[-1].detach()
                if criterion is None:
                    state.epoch_loss_sum += loss * y.numel()
                else:  # train_loss stays the labels' cross-entropy, comparable with other runs; the criterion beside
                    state.epoch_loss_sum += F.cross_entropy(logits.float(), y).item() * y.numel()
                    state.epoch_objective_sum += loss * y.numel()
                state.epoch_correct += int((logits.argmax(1) == y).sum().item())
                state.epoch_seen += y.numel()
            if scheduler is not None and scheduler_interval == "step":
                step_scheduler(epoch)
            bar.set_postfix(loss=f"{loss:.4f}")
            if stop_requested(stop):
                save(mid_epoch=True)
                where = f"; checkpoint written to {run.checkpoint_path}" if run is not None else ""
                signum = stop.signum if stop is not None and stop.signum else signal.SIGTERM  # another rank's
                raise TrainingInterrupted(
                    f"stopped by signal {signum} at epoch {epoch + 1}, step {b + 1}{where}", signum
                )
            if checkpoint_every and state.batch % checkpoint_every == 0 and (batches is None or state.batch < batches):
                save(mid_epoch=True)
        train_time = time.perf_counter() - start
        lr = trainer.optimizer.param_groups[0]["lr"]  # the epoch's rate, before an epoch scheduler moves it
        test = measure(model)
        trained = None
        if averaged is not None:  # the average is the run's model; the trained one is reported beside it
            trained, test = test, measure(averaged.module)
        extras: dict[str, float] = {}
        if extra_metrics is not None:
            generators = rng_state()
            extras = extra_metrics(averaged.module if averaged is not None else model)
            set_rng_state(generators)
        if scheduler is not None and scheduler_interval == "epoch":
            step_scheduler(epoch, test["loss"])
        loss_sum, correct, seen, objective_sum = all_reduce_sum(
            [state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_objective_sum]
        )
        state.best_acc = max(state.best_acc, test["top1"])
        state.last_acc = test["top1"]
        record = {
            "epoch": epoch,
            "lr": lr,
            # None, not 0: an epoch whose every step was skipped has no training loss
            "train_loss": loss_sum / seen if seen else None,
            "train_acc": 100.0 * correct / seen if seen else None,
            "test_loss": test["loss"],
            "test_acc": test["top1"],
            "test_top5": test["top5"],
            "best_acc": state.best_acc,
            "iteration": state.iteration,
            "skipped_steps": state.epoch_skipped,
            "train_seconds": train_time,
        }
        if criterion is not None:  # the loss minimised, beside the labels' cross-entropy in train_loss
            record["train_objective"] = objective_sum / seen if seen else None
        if trained is not None:
            record["trained_test_loss"] = trained["loss"]
            record["trained_test_acc"] = trained["top1"]
        record.update(extras)
        skipped_note = f", {state.epoch_skipped} steps skipped" if state.epoch_skipped else ""
        trained_note = f" (trained weights {trained['top1']:.2f}%)" if trained is not None else ""
        logger.info(
            "epoch %d/%d: train loss %s acc %s, test acc %.2f%%%s (best %.2f%%), %.1fs%s",
            epoch + 1,
            epochs,
            _fmt(record["train_loss"], "{:.4f}"),
            _fmt(record["train_acc"], "{:.2f}%"),
            record["test_acc"],
            trained_note,
            state.best_acc,
            train_time,
            skipped_note,
        )
        if run is not None:
            run.record_epoch(record, state.epoch_losses)
        state.epoch = epoch + 1
        state.start_epoch()
        save()
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)
    return state


def precise_bn_metrics(
    train_loader: Iterable[tuple[Tensor, Tensor]], test_loader: Iterable[tuple[Tensor, Tensor]], num_batches: int
) -> Callable[[nn.Module], dict[str, float]]:
    """``fit``'s ``extra_metrics``: the test loss and accuracy with BatchNorm statistics recomputed from
    ``num_batches`` training batches, on a copy of the network (whose own running statistics stay as they are),
    as ``test_loss_precise_bn`` and ``test_acc_precise_bn``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> before = net[2].running_mean.clone()
        >>> metrics = mq.training.precise_bn_metrics(batches, batches, 2)(net)
        >>> sorted(metrics), torch.equal(net[2].running_mean, before)
        (['test_acc_precise_bn', 'test_loss_precise_bn'], True)
    """

    def measure(network: nn.Module) -> dict[str, float]:
        network = copy.deepcopy(unwrap(network))
        recompute_batchnorm_stats(network, train_loader, num_batches)
        result = evaluate(network, test_loader)
        return {"test_loss_precise_bn": result["loss"], "test_acc_precise_bn": result["top1"]}

    return measure


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


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def stop_requested(stop: StopFlag | None) -> bool:
    """Whether to stop now; under data parallelism, whether any process was asked to (all stop together)."""
    local = bool(stop)
    if is_distributed():
        return all_reduce_sum([float(local)])[0] > 0
    return local


def step_schedule(kind: str, epochs: int, step_size: int, gamma: float) -> Callable[[int], float]:
    """``epoch -> factor`` for ``fit`` from a schedule name (see ``schedules.lr_factor``)."""
    return lambda epoch: lr_factor(kind, epoch, epochs, step_size, gamma)
