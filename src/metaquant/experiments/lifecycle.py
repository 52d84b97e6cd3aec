"""From a ``RunConfig`` to a finished run: build data, model, optimizer and trainer, then ``fit``.

This is what ``metaquant pretrain`` and ``metaquant quantize`` execute; it is also the easiest way to start a
run from Python: ``execute(RunConfig(task="quantize", init="runs/pretrain/checkpoint.pt"), "runs/q")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..algorithm import MetaQuant
from ..distributed import any_process, init_from_env, is_main
from ..files import atomic_write_bytes, load_checkpoint, temporary_files
from ..guards import StopFlag
from ..training import FitState, fit, precise_bn_metrics, restore_fit, step_schedule
from .builders import Session, init_path, prepare_session, teacher_path
from .config import RunConfig
from .equivalent import gain_tensor
from .meta_files import META_FILE, meta_config, save_meta
from .runs import DAMAGED_CHECKPOINT, RUN_FILES, RunDir, RunLock, RunLockedError
from .trace import TRACE_FILE, MetaTrace

__all__ = ["execute", "resume", "RunResult", "describe_checkpoint", "latest_checkpoint"]


logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports: the value of ``execute`` and ``resume``.

    Attributes:
        run_dir: the run directory, or None when the run wrote nothing (``execute(config, None)``).
        final_acc: test accuracy (percent, top-1) after the last epoch.
        best_acc: the best test accuracy of all epochs.
        epochs: the number of epochs trained.

    Example:
        >>> from metaquant.experiments.lifecycle import RunResult
        >>> result = RunResult(run_dir=None, final_acc=88.5, best_acc=89.25, epochs=100)
        >>> result.best_acc - result.final_acc, result.epochs
        (0.75, 100)
    """

    run_dir: Path | None
    final_acc: float
    best_acc: float
    epochs: int


# The edits of config.json that a resumed run accepted (``_accepted_edits``), kept in each checkpoint it writes.
_CONFIG_EDITS: contextvars.ContextVar[tuple[dict[str, Any], ...]] = contextvars.ContextVar("config_edits", default=())


def _extra(config: RunConfig, teacher_digest: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"config": config.to_dict()}
    if _CONFIG_EDITS.get():
        extra["config_edits"] = list(_CONFIG_EDITS.get())
    if config.uses_meta:
        extra["meta_config"] = meta_config(config)
    if teacher_digest is not None:  # a distilling run: resume checks that its teacher is the same model
        extra["teacher"] = teacher_digest
    return extra


def _train(
    config: RunConfig,
    session: Session,
    run: RunDir | None,
    state: FitState,
    progress: bool,
    stop: StopFlag | None,
    checkpoint: dict[str, Any] | None = None,
) -> RunResult:
    callbacks = []
    if run is not None and isinstance(session.trainer, MetaQuant):  # snapshots of what the meta quantizer learns
        trace = MetaTrace(run.path / TRACE_FILE, config.epochs, _gain_of(config))
        if checkpoint is not None:
            trace.load_checkpoint_state(checkpoint)
        callbacks.append(trace)
    state = fit(
        session.model,
        session.trainer,
        session.train_loader,
        session.test_loader,
        epochs=config.epochs,
        schedule=step_schedule(config.lr_schedule, config.epochs, config.lr_step, config.lr_gamma),
        run=run,
        state=state,
        extra_checkpoint=lambda: _extra(config, session.teacher_digest),
        progress=progress,
        stop=stop,
        checkpoint_every=config.checkpoint_every,
        max_skipped=config.max_skipped if config.on_nonfinite == "skip" else None,
        amp=config.amp,
        criterion=session.criterion,
        precise_bn_batches=config.precise_bn_batches,
        averaged=session.averaged,
        extra_metrics=(
            precise_bn_metrics(session.train_loader, session.test_loader, config.record_precise_bn)
            if config.record_precise_bn
            else None
        ),
        callbacks=callbacks,
    )
    if run is not None:
        if isinstance(session.trainer, MetaQuant):
            save_meta(run.path / META_FILE, session.trainer.meta, config)
        run.mark_done()
    return RunResult(
        run_dir=run.path if run else None, final_acc=state.last_acc, best_acc=state.best_acc, epochs=state.epoch
    )


def _gain_of(config: RunConfig) -> Callable[[nn.Module], Tensor] | None:
    """The gain ``k`` of the run's meta quantizer where it has one (FC-Grad without a non-linearity), else None."""
    if config.estimator != "fc-grad" or config.nonlinearity != "none":
        return None
    return lambda meta: gain_tensor(meta.state_dict(), config.meta_init_scheme)


def execute(
    config: RunConfig, run_dir: str | Path | None, *, progress: bool = True, stop: StopFlag | None = None
) -> RunResult:
    """Run ``config`` to the end, writing into a new ``run_dir`` (None: write nothing).

    Builds the data, the model (loaded from ``config.init``, then quantized for ``quantize`` runs), the
    optimizer and the trainer, and trains for ``config.epochs`` epochs. The run directory receives
    ``config.json``, ``metrics.jsonl``, ``loss.csv``, ``checkpoint.pt`` and, once finished, ``done``; a
    MetaQuant run also its trained meta quantizer (``meta.pt``, for ``meta_init``) and ``trace.pt``. Under
    ``torchrun`` every process trains and only rank 0 writes.

    Args:
        config: the run's configuration.
        run_dir: a directory that holds no run yet (created if needed), or None to write nothing.
        progress: show a progress bar per epoch.
        stop: a ``StopFlag``; when it becomes true the run stops after the current step with a checkpoint.

    Returns:
        A ``RunResult`` (final and best test accuracy, epochs).

    Raises:
        RunExistsError: ``run_dir`` already holds a run (it is left untouched; resume it with ``resume``), or
            it is a directory holding other files (not a run): a new run needs a missing or empty directory.
        RunLockedError: another process is creating a run in ``run_dir`` at the same time.
        TrainingInterrupted: ``stop`` was set; the run can be continued with ``resume``.
        NonFiniteError: a step produced a non-finite value; the last good checkpoint is intact.
        FileNotFoundError: ``config.init`` names no checkpoint, ``meta_init`` nothing to load, or the data set
            is not found and cannot be downloaded (``DatasetNotFoundError``).
        DatasetError: the data set's files are damaged (``DatasetFormatError``) or its download fails.
        ValueError: ``config.device`` asks for CUDA without CUDA; ``init`` or ``meta_init`` does not fit the
            model.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.lifecycle import execute
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, estimator="multifc", hidden_size=8, device="cpu")
        >>> result = execute(config, "runs/quick", progress=False)  # two steps of MetaQuant, one test
        >>> result.epochs, sorted(p.name for p in result.run_dir.iterdir())
        (1, ['checkpoint.pt', 'config.json', 'done', 'loss.csv', 'meta.pt', 'metrics.jsonl', 'trace.pt'])
        >>> try:
        ...     execute(config, "runs/quick")
        ... except mq.experiments.runs.RunExistsError:
        ...     print("refused: runs/quick already holds a run")
        refused: runs/quick already holds a run
    """
    if run_dir is not None:
        RunDir.check_free(run_dir)  # raises before any work is done, and before anything is written
    if config.init:
        init_path(config.init)  # a missing init or teacher is named before the data set is read
    if config.distill_weight > 0:
        teacher_path(config)
    session = prepare_session(config)
    if run_dir is None:
        return _train(config, session, None, FitState(), progress, stop)
    with _owning(Path(run_dir), create=config) as run:  # under torchrun only rank 0 writes
        result = _train(config, session, run, FitState(), progress, stop)
    return dataclasses.replace(result, run_dir=Path(run_dir))


@contextlib.contextmanager
def _owning(path: Path, create: RunConfig | None = None) -> Iterator[RunDir | None]:
    """Hold the run directory's lock for the duration, on the writing process (rank 0); with ``create``, make
    the run there first (under the lock). Every process learns whether that worked, so that under torchrun
    all of them stop together when it did not.

    Yields:
        The ``RunDir`` on the writing process, None on the others.
    """
    lock, run, error = None, None, None
    if is_main():
        try:
            if create is not None:
                RunDir.check_free(path)
                path.mkdir(parents=True, exist_ok=True)
            lock = RunLock(path)
            run = RunDir.create(path, create) if create is not None else RunDir(path)
        except Exception as err:  # reported on this process, after the others were told
            error = err
            if lock is not None:
                lock.release()
    if any_process(error is not None):
        if error is not None:
            raise error
        raise RunLockedError(f"rank 0 could not take the run directory {path}; its message says why")
    try:
        yield run
    finally:
        if lock is not None:
            lock.release()


def _epoch_and_batch(checkpoint: dict[str, Any]) -> tuple[int, int]:
    fit_state = checkpoint.get("fit") or {}
    return int(fit_state.get("epoch", checkpoint["epoch"])), int(fit_state.get("batch", 0))


def _position(checkpoint: dict[str, Any]) -> str:
    """Where a checkpoint stands, e.g. ``after epoch 2`` or ``at epoch 3, step 5``."""
    epoch, batch = _epoch_and_batch(checkpoint)
    return f"at epoch {epoch + 1}, step {batch}" if batch else f"after epoch {epoch}"


def describe_checkpoint(path: str | Path) -> str | None:
    """``"<path> (after epoch E)"`` when ``path`` is an intact checkpoint, None when it is missing or damaged.

    What the command line tells a user whose run stopped: which checkpoint a resume would continue from.

    Args:
        path: a checkpoint file.

    Returns:
        The description, or None.

    Example:
        >>> from metaquant.experiments.lifecycle import describe_checkpoint
        >>> from metaquant.files import save_checkpoint
        >>> state = {"model": {}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 2}
        >>> save_checkpoint("checkpoint.pt", {**state, "fit": {"epoch": 2, "batch": 3}})
        >>> describe_checkpoint("checkpoint.pt"), describe_checkpoint("missing.pt")
        ('checkpoint.pt (at epoch 3, step 3)', None)
    """
    try:
        return f"{path} ({_position(load_checkpoint(Path(path)))})"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _previous_note(run: RunDir) -> str:
    previous = run.previous_checkpoint_path
    if not previous.exists():
        return "there is no previous checkpoint"
    described = describe_checkpoint(previous)
    if described is None:
        return f"the previous checkpoint {previous} is damaged too"
    return f"the previous checkpoint {described} is intact: use it with `from_previous`"


def latest_checkpoint(run: RunDir, from_previous: bool = False) -> tuple[dict[str, Any] | None, Path | None]:
    """``checkpoint.pt`` of ``run``, verified, and its path; ``(None, None)`` when the run has none yet.

    ``checkpoint.prev.pt`` is used only when asked for (``from_previous``): a damaged or missing latest
    checkpoint is refused with a message that names the previous one, never replaced by it silently.
    """
    current, previous = run.checkpoint_path, run.previous_checkpoint_path
    if from_previous:
        if not previous.exists():
            raise FileNotFoundError(f"`from_previous`: {previous} does not exist")
        return load_checkpoint(previous), previous
    if not current.exists():
        if previous.exists():
            raise ValueError(f"{current} is missing; {_previous_note(run)}")
        return None, None
    try:
        return load_checkpoint(current), current
    except ValueError as err:
        raise ValueError(f"{err}; {_previous_note(run)}") from None


# What decides the shapes a checkpoint must fit: a checkpoint of a run that differs in one of these is not this
# run's (the number of epochs, say, may be changed in config.json to extend a run).
_IDENTITY = (
    "task",
    "model",
    "dataset",
    "quantizer",
    "bits",
    "act_quantizer",
    "act_bits",
    "act_backward",
    "act_first_layer_bits",
    "estimator",
    "hidden_size",
    "num_fc",
    "num_lstm",
    "nonlinearity",
    "meta_init_scheme",
    "optimizer",
    "step_order",
    "through",
)


def _check_owner(checkpoint: dict[str, Any], path: Path, config: RunConfig, run: RunDir) -> None:
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return  # written by other code: the restore below still checks what it loads
    relevant = _IDENTITY if config.task == "quantize" else ("task", "model", "dataset", "optimizer")
    differ = [k for k in relevant if k in saved and saved[k] != getattr(config, k)]
    if differ:
        theirs = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        ours = ", ".join(f"{k}={getattr(config, k)!r}" for k in differ)
        raise ValueError(
            f"checkpoint {path} was written by another run ({theirs}), not by the run of {run.config_path} ({ours})"
        )
    # The average's weights are part of the checkpoint: a run cannot gain or lose one half-way.
    was = saved.get("ema_decay", 0.0)
    if isinstance(was, (int, float)) and (was > 0) != (config.ema_decay > 0):
        raise ValueError(
            f"{run.config_path} sets ema_decay={config.ema_decay!r}, but checkpoint {path} was written with "
            f"ema_decay={was!r}: a run cannot {'drop its' if was > 0 else 'start a'} weight average half-way; "
            f"put ema_decay back to {was!r}, or start a new run"
        )


#: What a resumed run may take from an edited config.json: how it goes on (its length, where and how it runs, its
#: reliability options, what it records and is called, where its starting files are), never what it trains.
EDITABLE = (
    *("epochs", "device", "memory_format", "data_dir", "download", "test_batch_size", "record_precise_bn"),
    *("on_nonfinite", "max_skipped", "checkpoint_every", "label", "init", "teacher", "meta_init"),
)


def _accepted_edits(checkpoint: dict[str, Any], path: Path, config: RunConfig, run: RunDir) -> list[dict[str, Any]]:
    """The fields of ``config`` that differ from those the checkpoint was written with, each as ``{"field", "old",
    "new", "at"}``, once every one of them is ``EDITABLE`` and ``epochs`` still covers the checkpoint's position.

    Raises:
        ValueError: any other edit, or ``epochs`` lowered below what the run has trained; the message names the
            fields with both values and says what to do.
    """
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return []  # written by other code: nothing to compare with
    now, at = config.to_dict(), _position(checkpoint)
    edits = [{"field": k, "old": saved[k], "new": v, "at": at} for k, v in now.items() if k in saved and saved[k] != v]
    refused = [e for e in edits if e["field"] not in EDITABLE]
    if refused:
        changes = ", ".join(f"{e['field']} {e['old']!r} -> {e['new']!r}" for e in refused)
        raise ValueError(
            f"{run.config_path} was edited since checkpoint {path} was written ({at}): {changes}; a run cannot change "
            f"what it trains half-way. Put the old values back to continue it, or start a new run with the new ones "
            f"(from this run's weights with `init` {run.path}); a resume may change only {', '.join(EDITABLE)}"
        )
    epoch, batch = _epoch_and_batch(checkpoint)
    reached = epoch + (1 if batch else 0)  # a run stopped within an epoch ends that epoch at the earliest
    if config.epochs < reached:
        raise ValueError(
            f"{run.config_path} sets epochs {config.epochs}, but checkpoint {path} is {at}: the run has gone past "
            f"that; set epochs to {reached} or more to continue it"
        )
    for e in edits:
        logger.warning(
            "%s: %s changed from %r to %r (%s); continuing with it", run.path, e["field"], e["old"], e["new"], at
        )
    return edits


def resume(
    run_dir: str | Path,
    *,
    progress: bool = True,
    stop: StopFlag | None = None,
    from_previous: bool = False,
    on_nonfinite: str | None = None,
    max_skipped: int | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, to the same result as an uninterrupted run.

    Everything is restored: model, base optimizer, the trainer's state (MetaQuant: meta quantizer, its
    optimizer, the recorded ``g_Ŵ`` and ``W̃``, LSTM states), the position within the epoch, RNG states. A run
    killed before its first checkpoint starts again from its beginning. A finished run is left as it is.

    The run's files are read through before anything trains (a malformed one is named), the checkpoint is
    verified (CRCs and content digest) and must belong to the run; the process holds the directory's lock
    while it works, so a second process on the same run is refused. An edit of ``config.json`` since the
    checkpoint is taken only for the ``EDITABLE`` fields (e.g. more ``epochs`` to extend the run; never fewer
    than it has reached), logged and kept in each later checkpoint as ``config_edits``; any other is refused.

    Args:
        run_dir: a run directory made by ``execute`` (or ``metaquant pretrain``/``quantize``).
        progress: show a progress bar per epoch.
        stop: a ``StopFlag``, as for ``execute``.
        from_previous: continue from ``checkpoint.prev.pt`` (when ``checkpoint.pt`` is damaged); the damaged
            file is kept as ``checkpoint.damaged.pt``.
        on_nonfinite: ``"raise"`` or ``"skip"`` for this continuation, instead of the run's own setting (the
            run's ``config.json`` is not changed).
        max_skipped: the limit of skipped steps for this continuation, instead of the run's own.

    Returns:
        A ``RunResult``; for a finished run, read from its ``metrics.jsonl`` without training.

    Raises:
        FileNotFoundError: no run in ``run_dir`` (no ``config.json``); ``from_previous`` without a previous
            checkpoint.
        ValueError: a malformed ``config.json``, ``metrics.jsonl`` or ``loss.csv``; a damaged checkpoint (the
            message says whether the previous one is intact), or one of another run or model; an edit of
            ``config.json`` that a resume does not take; a bad ``on_nonfinite`` or ``max_skipped``.
        RunLockedError: another process is working in ``run_dir``.
        TrainingInterrupted: ``stop`` was set again; the run can be resumed once more.
        NonFiniteError: as for ``execute``.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.guards import StopFlag, TrainingInterrupted
        >>> from metaquant.experiments.lifecycle import execute, resume
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, estimator="multifc", hidden_size=8, device="cpu")
        >>> stop = StopFlag(); stop.request(2)  # as if SIGINT arrived during the first of the two steps
        >>> try:
        ...     execute(config, "runs/interrupted", progress=False, stop=stop)
        ... except TrainingInterrupted as err:
        ...     print(err)
        stopped by signal 2 at epoch 1, step 1; checkpoint written to runs/interrupted/checkpoint.pt
        >>> resumed = resume("runs/interrupted", progress=False)
        >>> straight = execute(config, "runs/straight", progress=False)  # the same run, never interrupted
        >>> resumed.final_acc == straight.final_acc, (resumed.run_dir / "done").exists()
        (True, True)
        >>> (resumed.run_dir / "loss.csv").read_text() == (straight.run_dir / "loss.csv").read_text()
        True
    """
    run = RunDir(run_dir)
    if not run.path.is_dir() or not run.config_path.exists():
        raise FileNotFoundError(f"`run_dir` {run_dir}: no run there (config.json is missing)")
    config = run.config()
    overrides = {k: v for k, v in (("on_nonfinite", on_nonfinite), ("max_skipped", max_skipped)) if v is not None}
    if overrides:
        config = RunConfig.from_dict({**config.to_dict(), **overrides})  # validates them
        logger.info("continuing %s with %s", run.path, ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    run.check_files()  # a malformed file stops the run now, not after an epoch of training
    if run.is_done():
        metrics = run.metrics()
        if not metrics:
            raise ValueError(f"{run.metrics_path} holds no epoch, yet {run.done_path} says the run has finished")
        logger.info("run %s is already finished", run.path)
        return RunResult(run.path, metrics[-1]["test_acc"], max(m["test_acc"] for m in metrics), len(metrics))
    if config.distill_weight > 0:
        teacher_path(config)
    init_from_env(config.device)  # join the process group first: every process learns whether the lock was taken
    with _owning(run.path) as writer:
        if writer is not None:
            # writes of the run's files that a kill interrupted: never complete files; nothing else is touched
            for stale in (tmp for name in RUN_FILES for tmp in temporary_files(run.path / name)):
                stale.unlink(missing_ok=True)
        if from_previous and describe_checkpoint(run.checkpoint_path) is not None:
            raise ValueError(
                f"`from_previous`: {run.checkpoint_path} is intact; continue from it (without `from_previous`)"
            )
        checkpoint, source = latest_checkpoint(run, from_previous)
        if checkpoint is None:
            logger.info("run %s has no checkpoint yet: starting it from its beginning", run.path)
            session = prepare_session(config)
            result = _train(config, session, writer, FitState(), progress, stop)
            return dataclasses.replace(result, run_dir=run.path)
        assert source is not None  # a checkpoint comes with its path
        _check_owner(checkpoint, source, config, run)
        edits = [*checkpoint.get("config_edits", []), *_accepted_edits(checkpoint, source, config, run)]
        session = prepare_session(config, load_init=False, checkpoint=checkpoint)
        if checkpoint.get("teacher", session.teacher_digest) != session.teacher_digest:
            raise ValueError(
                f"the teacher of {run.path}, {teacher_path(config)}, is not the model the run started with (its "
                "weights changed since); put that model back there, or start a new run"
            )
        try:
            state = restore_fit(checkpoint, session.trainer, averaged=session.averaged)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            reason = " ".join(str(err).split())  # torch's messages span lines; this one is one line
            raise ValueError(
                f"checkpoint {source} does not fit the run of {run.config_path} ({type(err).__name__}: {reason})"
            ) from None
        if not is_main():  # the saved running sums are those of all processes: counted once, by rank 0
            state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0.0, 0, 0
            state.epoch_objective_sum = 0.0
        if writer is not None and source != run.checkpoint_path:
            _adopt_previous(run)
        logger.info("resuming %s at epoch %d, step %d", run.path, state.epoch + 1, state.batch)
        recording = _CONFIG_EDITS.set(tuple(edits))
        try:
            result = _train(config, session, writer, state, progress, stop, checkpoint)
        finally:
            _CONFIG_EDITS.reset(recording)
    return dataclasses.replace(result, run_dir=run.path)


def _adopt_previous(run: RunDir) -> None:
    """Make the previous checkpoint the latest again, keeping the damaged one aside (never deleted): the next
    save then copies an intact checkpoint to ``checkpoint.prev.pt``."""
    damaged = run.path / DAMAGED_CHECKPOINT
    if run.checkpoint_path.exists():
        os.replace(run.checkpoint_path, damaged)
        logger.warning(
            "kept the damaged %s as %s; continuing from %s",
            run.checkpoint_path.name,
            damaged.name,
            run.previous_checkpoint_path.name,
        )
    atomic_write_bytes(run.checkpoint_path, run.previous_checkpoint_path.read_bytes())
