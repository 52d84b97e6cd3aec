"""The loop that ``fit`` runs, and the ``Callback`` interface through which the features around it join it.

``FitLoop`` trains epochs of ``trainer.step``, evaluates after each, records the epoch and writes a checkpoint
from which a run continues exactly (mid-epoch too). It knows neither the algorithm (all trainers offer
``step(closure)``) nor the features around the steps, which are callbacks (``metaquant.callbacks``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, any_process, is_distributed, unwrap
from .evaluation import evaluate
from .files import save_checkpoint
from .guards import NonFiniteError, StepSnapshot, StopFlag, TrainingInterrupted, all_finite
from .precision import autocast
from .rng import rng_state

__all__ = ["Callback", "StepResult", "FitLoop", "StepTrainer", "RunLog"]

# fit's messages have always come from this logger; users filter on its name
logger = logging.getLogger("metaquant.training")


class StepTrainer(Protocol):
    """What the loop needs of a trainer (``Trainer``, ``MetaQuant``): a step from a loss closure, the epoch, a
    checkpointable state, its non-finite policy (``"skip"``: the loop undoes an update that made the weights
    non-finite) and its counts of skipped and loss-scaler-overflowed steps."""

    optimizer: torch.optim.Optimizer
    on_nonfinite: str
    skipped_steps: int
    overflow_steps: int

    def step(self, closure: Callable[[], Tensor]) -> Tensor: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RunLog(Protocol):
    """Where the loop keeps a run (``metaquant.experiments.runs.RunDir`` is one): a checkpoint file, and a record
    of each epoch with the ``(iteration, loss)`` pairs of its steps."""

    @property
    def checkpoint_path(self) -> Path: ...
    def record_epoch(self, record: dict[str, Any], losses: list[tuple[int, float]]) -> None: ...


class EpochLoader(Protocol):
    """A loader that the loop can reshuffle per epoch (``set_epoch``) and resume mid-epoch (``len``)."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self): ...


@dataclass
class FitState:
    """Where a run stands, enough to continue it exactly; saved in each checkpoint as ``dataclasses.asdict``.

    ``epoch`` is the epoch in progress (or the next), ``batch`` its batches done (non-zero only mid-epoch),
    ``iteration`` the steps of the whole run, ``best_acc``/``last_acc`` test top-1 (percent). The ``epoch_*``
    fields are the epoch's running sums: ``epoch_loss_sum`` of the labels' cross-entropy, ``epoch_objective_sum``
    of a ``criterion`` other than it, ``epoch_losses`` the ``(iteration, loss)`` pairs. ``skipped`` and
    ``epoch_skipped`` count the steps skipped for non-finite values.
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


@dataclass(frozen=True)
class StepResult:
    """What one step did: ``loss``, the loss the trainer minimised; ``skipped``, whether it was skipped for
    non-finite values (nothing updated); ``overflowed``, whether the fp16 loss scaler skipped it (no update
    either, and no error)."""

    loss: float
    skipped: bool
    overflowed: bool

    @property
    def updated(self) -> bool:
        """Whether the step changed the weights."""
        return not (self.skipped or self.overflowed)


class Callback:
    """A part of a run that acts at fixed points of the loop; give it to ``fit(..., callbacks=[...])``.

    The hooks, in the order of a run: ``on_fit_start``; per epoch ``on_epoch_start``, ``on_step_end``,
    ``before_evaluation`` (per network evaluated), ``on_evaluate`` (fields for the record), ``on_epoch_end``;
    ``checkpoint_state``/``load_checkpoint_state`` for checkpoint entries. Each does nothing here: override those
    you need. Callbacks run in order, ``fit``'s keywords' own first; a hook gets the ``FitLoop``.

    Example:
        The share of positive latent weights of a layer in each epoch's record:

        >>> class PositiveShare(mq.Callback):
        ...     def on_evaluate(self, loop, test):
        ...         return {"positive": (loop.model[1].weight > 0).float().mean().item()}
        ...     def on_epoch_end(self, loop, record):
        ...         print(record["epoch"], 0 <= record["positive"] <= 1)
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> batches = [(torch.randn(8, 1, 4), torch.randint(0, 3, (8,)))]
        >>> _ = mq.fit(model, trainer, batches, batches, epochs=2, schedule=None, progress=False,
        ...            callbacks=[PositiveShare()])
        0 True
        1 True
    """

    def on_fit_start(self, loop: FitLoop) -> None:
        """Before the first epoch of this call (of a resumed run too: ``loop.state`` says where it stands)."""

    def on_epoch_start(self, loop: FitLoop) -> None:
        """At the start of epoch ``loop.state.epoch``, before the trainer and the loader are told the epoch."""

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        """After each step, once ``loop.state`` counts it; a checkpoint of this position (a stop's, or one
        asked for with ``loop.request_checkpoint``) is written after every callback's hook."""

    def before_evaluation(self, loop: FitLoop, network: nn.Module) -> None:
        """Before each evaluation of ``network``: the trained model, then the delivered one if it differs."""

    def on_evaluate(self, loop: FitLoop, test: dict[str, float]) -> dict[str, float]:
        """After the evaluation of the delivered network (``test``: ``evaluate``'s metrics), before the record and
        the checkpoint are written (a scheduler stepped here is in the checkpoint); returns fields for the record."""
        return {}

    def on_epoch_end(self, loop: FitLoop, record: dict[str, Any]) -> None:
        """After the epoch's ``record`` and checkpoint are written; ``loop.state.epoch`` counts the epochs done."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries to add to every checkpoint, under keys of this callback's own."""
        return {}

    def load_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        """Put back what ``checkpoint_state`` saved; to resume, call it with the checkpoint beside ``restore_fit``."""


class FitLoop:
    """Trains ``model`` with ``trainer`` from ``state`` to the end of epoch ``epochs``, with ``callbacks``.

    ``fit`` describes the arguments. Callbacks may read the arguments as attributes, ``batches`` (the epoch's
    number of batches, None without ``len``) and ``delivered``: the network evaluated for ``test_acc``, the model
    unless a callback sets another (a weight average) in ``on_fit_start``; the model is then recorded beside it
    as ``trained_test_*``.
    """

    def __init__(
        self,
        model: nn.Module,
        trainer: StepTrainer,
        train_loader: Iterable[tuple[Tensor, Tensor]],
        test_loader: Iterable[tuple[Tensor, Tensor]],
        *,
        epochs: int,
        run: RunLog | None = None,
        state: FitState | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        stop: StopFlag | None = None,
        amp: str = "none",
        criterion: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.model, self.trainer, self.epochs, self.run = model, trainer, epochs, run
        self.train_loader, self.test_loader = train_loader, test_loader
        self.state = state or FitState()
        self.callbacks = list(callbacks)
        self.progress, self.stop, self.amp, self.criterion = progress, stop, amp, criterion
        self.delivered: nn.Module = model
        self.batches: int | None = None
        self._skip = trainer.on_nonfinite == "skip"
        self._weights = [*unwrap(model).parameters(), *unwrap(model).buffers()]
        self._checkpoint_requested = False

    def fit(self) -> FitState:
        """Train to the end of epoch ``epochs``; the final state."""
        for callback in self.callbacks:
            callback.on_fit_start(self)
        for epoch in range(self.state.epoch, self.epochs):
            self.state.epoch = epoch
            seconds = self.train_epoch()
            self.end_epoch(seconds)
        return self.state

    def train_epoch(self) -> float:
        """The steps of epoch ``state.epoch`` from ``state.batch`` on; the seconds they took."""
        epoch = self.state.epoch
        for callback in self.callbacks:
            callback.on_epoch_start(self)
        self.trainer.set_epoch(epoch)
        if hasattr(self.train_loader, "set_epoch"):  # e.g. a TensorLoader; a DataLoader has none
            self.train_loader.set_epoch(epoch)
        self.model.train()
        start = time.perf_counter()
        resume_at = self.state.batch
        batches = self._remaining_batches()
        desc = f"epoch {epoch + 1}/{self.epochs}"
        bar = tqdm(batches, desc=desc, leave=False, disable=not self.progress, total=self.batches, initial=resume_at)
        for x, y in bar:
            step = self.step(x, y)
            for callback in self.callbacks:
                callback.on_step_end(self, step)
            bar.set_postfix(loss=f"{step.loss:.4f}")
            self._stop_if_requested()
            if self._checkpoint_requested:
                self.save(mid_epoch=True)
        return time.perf_counter() - start

    def _remaining_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The batches done before the checkpoint this run resumed from: the loader replays the epoch (same order,
        # same augmentation), and they are drawn and dropped outside the bar, which starts at resume_at.
        resume_at = self.state.batch
        self.batches = len(self.train_loader) if isinstance(self.train_loader, Sized) else None  # a generator: none
        batches = iter(self.train_loader)
        replayed = sum(1 for _ in itertools.islice(batches, resume_at))
        if any_process(replayed < resume_at):  # every process takes the same branch: none waits in a collective
            raise ValueError(
                f"the training loader yields {replayed} batches in epoch {self.state.epoch + 1} (in this process), "
                f"but the state to resume from is at step {resume_at} of that epoch: the data, the batch size or the "
                f"number of processes differs from the run's; resume as the run was trained"
            )
        return batches

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """One optimization step on the batch ``(x, y)``, checked for non-finite weights and counted in ``state``."""
        where = self.position(next_step=True)
        logits: list[Tensor] = []
        snapshot = StepSnapshot(unwrap(self.model), self.trainer.optimizer, self.trainer) if self._skip else None
        skipped_before, overflows_before = self.trainer.skipped_steps, self.trainer.overflow_steps
        try:
            loss = self.trainer.step(lambda: self._loss(x, y, logits)).item()
        except NonFiniteError as err:
            raise NonFiniteError(
                f"{err} at {where}; nothing was updated; last good checkpoint: {self.last_good()}"
            ) from None
        skipped = self.trainer.skipped_steps > skipped_before
        # A finite update can still overflow the weights (e.g. a huge learning rate): every process checks, so that
        # all of them take the same branch.
        if not skipped and any_process(not all_finite(self._weights)):
            if snapshot is None:
                raise NonFiniteError(
                    f"non-finite weights after the update at {where}; last good checkpoint: {self.last_good()}"
                )
            snapshot.restore()
            self.trainer.skipped_steps = skipped_before + 1
            logger.warning("skipped the step at %s: its update made the weights non-finite", where)
            skipped = True
        step = StepResult(loss, skipped, overflowed=self.trainer.overflow_steps > overflows_before)
        self._count(step, logits, y)
        return step

    def _loss(self, x: Tensor, y: Tensor, logits_seen: list[Tensor]) -> Tensor:
        with autocast(self.amp, x.device):
            logits = self.model(x)
        logits_seen.append(logits)
        logits = logits if self.amp == "none" else logits.float()
        return F.cross_entropy(logits, y) if self.criterion is None else self.criterion(logits, y, x)

    def _count(self, step: StepResult, logits: list[Tensor], y: Tensor) -> None:
        state = self.state
        state.iteration += 1
        state.batch += 1
        if step.skipped:
            state.skipped += 1
            state.epoch_skipped += 1
        elif math.isfinite(step.loss):  # a skipped step counts as a step but not in the statistics
            state.epoch_losses.append((state.iteration, step.loss))
            last = logits[-1].detach()  # of the closure's last call
            if self.criterion is None:
                state.epoch_loss_sum += step.loss * y.numel()
            else:  # train_loss stays the labels' cross-entropy, comparable with other runs; the criterion beside
                state.epoch_loss_sum += F.cross_entropy(last.float(), y).item() * y.numel()
                state.epoch_objective_sum += step.loss * y.numel()
            state.epoch_correct += int((last.argmax(1) == y).sum().item())
            state.epoch_seen += y.numel()

    def _stop_if_requested(self) -> None:
        if not stop_requested(self.stop):
            return
        self.save(mid_epoch=True)
        where = f"; checkpoint written to {self.run.checkpoint_path}" if self.run is not None else ""
        signum = self.stop.signum if self.stop is not None and self.stop.signum else signal.SIGTERM  # another rank's
        raise TrainingInterrupted(
            f"stopped by signal {signum} at epoch {self.state.epoch + 1}, step {self.state.batch}{where}", signum
        )

    def end_epoch(self, seconds: float) -> None:
        """Evaluate, record the epoch, move ``state`` to the next epoch and checkpoint it."""
        state = self.state
        lr = self.trainer.optimizer.param_groups[0]["lr"]  # the epoch's rate, before a callback's scheduler moves it
        trained = self.measure(self.model)
        test = trained if self.delivered is self.model else self.measure(self.delivered)
        extras: dict[str, float] = {}
        for callback in self.callbacks:
            extras.update(callback.on_evaluate(self, test))
        state.best_acc = max(state.best_acc, test["top1"])
        state.last_acc = test["top1"]
        record = {**self.epoch_record(lr, test, trained, seconds), **extras}
        self._log(record)
        if self.run is not None:
            self.run.record_epoch(record, state.epoch_losses)
        state.epoch += 1
        state.start_epoch()
        self.save()
        for callback in self.callbacks:
            callback.on_epoch_end(self, record)

    def measure(self, network: nn.Module) -> dict[str, float]:
        """``evaluate``'s metrics of ``network`` on the test loader, after the callbacks' ``before_evaluation``."""
        for callback in self.callbacks:
            callback.before_evaluation(self, network)
        return evaluate(network, self.test_loader)

    def epoch_record(
        self, lr: float, test: dict[str, float], trained: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        """The epoch's record from its statistics (of all processes) and the evaluations, without the callbacks'."""
        state = self.state
        loss_sum, correct, seen, objective_sum = all_reduce_sum(
            [state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_objective_sum]
        )
        record = {
            "epoch": state.epoch,
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
            "train_seconds": seconds,
        }
        if self.criterion is not None:  # the loss minimised, beside the labels' cross-entropy in train_loss
            record["train_objective"] = objective_sum / seen if seen else None
        if self.delivered is not self.model:  # e.g. a weight average: the trained model is reported beside it
            record["trained_test_loss"] = trained["loss"]
            record["trained_test_acc"] = trained["top1"]
        return record

    def _log(self, record: dict[str, Any]) -> None:
        skipped = f", {record['skipped_steps']} steps skipped" if record["skipped_steps"] else ""
        trained = f" (trained weights {record['trained_test_acc']:.2f}%)" if "trained_test_acc" in record else ""
        logger.info(
            "epoch %d/%d: train loss %s acc %s, test acc %.2f%%%s (best %.2f%%), %.1fs%s",
            record["epoch"] + 1,
            self.epochs,
            _fmt(record["train_loss"], "{:.4f}"),
            _fmt(record["train_acc"], "{:.2f}%"),
            record["test_acc"],
            trained,
            record["best_acc"],
            record["train_seconds"],
            skipped,
        )

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint of the position after the current step, written once every callback's
        ``on_step_end`` has run."""
        self._checkpoint_requested = True

    def save(self, *, mid_epoch: bool = False) -> None:
        """Write a checkpoint of the exact position, with every callback's ``checkpoint_state``, to ``run`` if any.
        Every process calls it at the same points (a mid-epoch checkpoint sums all processes' statistics)."""
        state = self.state
        self._checkpoint_requested = False
        fit_state = dataclasses.asdict(state)
        if mid_epoch and is_distributed():  # a resumed run gives the sums back to rank 0 alone
            sums = all_reduce_sum(
                [state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_objective_sum]
            )
            fit_state.update(
                epoch_loss_sum=sums[0], epoch_correct=int(sums[1]), epoch_seen=int(sums[2]), epoch_objective_sum=sums[3]
            )
        model_state = unwrap(self.model).state_dict()
        if self._unsaveable(model_state):
            at = f"epoch {state.epoch + 1}, step {state.batch}" if mid_epoch else f"the end of epoch {state.epoch}"
            raise NonFiniteError(
                f"non-finite weights at {at} (iteration {state.iteration}); not saved (last good checkpoint: "
                f"{self.last_good()})"
            )
        if self.run is None:
            return
        checkpoint: dict[str, Any] = {
            "model": model_state,
            "optimizer": self.trainer.optimizer.state_dict(),
            "trainer": self.trainer.state_dict(),
            "epoch": state.epoch,
            "iteration": state.iteration,
            "best_acc": state.best_acc,
            "fit": fit_state,
            "rng": rng_state(),
        }
        for callback in self.callbacks:
            checkpoint.update(callback.checkpoint_state())
        save_checkpoint(self.run.checkpoint_path, checkpoint)

    def _unsaveable(self, model_state: dict[str, Tensor]) -> bool:
        """Whether a checkpoint of ``model_state`` would be written with non-finite values. Under torchrun every
        process decides (only rank 0 writes): all stop together, and none waits in a collective."""
        if not is_distributed():
            return self.run is not None and not all_finite(model_state.values())
        bad, writers = all_reduce_sum([float(not all_finite(model_state.values())), float(self.run is not None)])
        return bad > 0 and writers > 0

    def position(self, *, next_step: bool = False) -> str:
        """The step just done (or the next one), for messages: ``"epoch E, step B (iteration I)"``, counted from 1."""
        state, ahead = self.state, int(next_step)
        return f"epoch {state.epoch + 1}, step {state.batch + ahead} (iteration {state.iteration + ahead})"

    def last_good(self) -> str:
        """The last checkpoint written, for messages; ``"none yet"`` without one (under torchrun, on the processes
        that do not write: the one rank 0 keeps)."""
        run = self.run
        if run is None and is_distributed():
            return "the one rank 0 keeps"
        return str(run.checkpoint_path) if run is not None and run.checkpoint_path.exists() else "none yet"


def stop_requested(stop: StopFlag | None) -> bool:
    """Whether to stop now; under data parallelism, whether any process was asked to (all stop together)."""
    local = bool(stop)
    if is_distributed():
        return all_reduce_sum([float(local)])[0] > 0
    return local


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)
