"""Making a sweep's runs: one after another, or N at a time in processes of their own (``jobs``).

``run_sweep(spec, root)`` makes the shared pre-training runs first, then the quantization runs in the order of
``plan``; a finished run is skipped and an interrupted one resumed from its last checkpoint (exactly: see
``lifecycle.resume``). Side by side (``jobs > 1``), a run waits for the runs it starts from (an equivalent STE
for its FC-Grad run, a fine-tuning for the run it continues), and the first failure stops the others with a
checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from ..guards import StopFlag, TrainingInterrupted
from .allocator import reuse_freed_memory
from .config import RunConfig
from .lifecycle import execute, resume
from .runs import RunDir, RunLock
from .sweep import (
    PlannedRun,
    SweepSpec,
    _prerequisites,
    plan,
    pretrain_config,
    pretrain_path,
    run_state,
    select_runs,
)

__all__ = ["run_sweep"]

logger = logging.getLogger(__name__)


def _run_once(
    path: Path, config: RunConfig, progress: bool, stop: StopFlag | None = None
) -> tuple[str, float | None, float | None]:
    state = run_state(path, config)
    if state == "done":
        metrics = RunDir(path).metrics()
        return "skipped (done)", metrics[-1]["test_acc"], max(m["test_acc"] for m in metrics)
    if state == "started":
        result = resume(path, progress=progress, stop=stop)
        return "resumed, done", result.final_acc, result.best_acc
    if state == "to run":
        result = execute(config, path, progress=progress, stop=stop)
        return "done", result.final_acc, result.best_acc
    if state == "unreadable configuration":
        RunDir(path).config()  # raises the reader's error, which names the file and what is wrong
    refusal = {"no run": "exists and holds no run", "a file, not a directory": "is a file, not a directory"}
    raise ValueError(
        f"{path} {refusal.get(state, f'holds a run with {state}')}; remove it or change the sweep's run directory"
    )


@dataclass(frozen=True)
class _Task:
    """One run to make: where, with what configuration, and how its progress line begins."""

    path: Path
    config: RunConfig
    title: str
    pretrain: bool


def _line(task: _Task, status: str, final: float | None, best: float | None, seconds: float) -> str:
    if task.pretrain:
        return f"{task.title}: {status}, test accuracy {final:.2f}% ({seconds:.0f}s)"
    return f"{task.title}: {status}, final {final:.2f}%, best {best:.2f}% ({seconds:.0f}s)"


def _tasks(
    spec: SweepSpec, root: Path, runs: list[PlannedRun], selected: list[PlannedRun]
) -> tuple[list[_Task], list[_Task]]:
    """The pre-training runs that ``selected`` start from or distil from, and ``selected`` (numbered as in
    ``runs``)."""
    pretrains = []
    if spec.pretrain is not None:
        needed = {Path(p) for run in selected for p in (run.config.init, run.config.teacher) if p}
        for model, dataset in dict.fromkeys((r.config.model, r.config.dataset) for r in selected):
            path = pretrain_path(root, model, dataset)
            if path in needed:  # not for a run that only continues another (or starts from a model of its own)
                pretrains.append(
                    _Task(path, pretrain_config(spec, model, dataset), f"[pretrain] {model} on {dataset}", True)
                )
    quantize = []
    chosen = {run.path for run in selected}
    for i, run in enumerate(runs, 1):
        if run.path not in chosen:
            continue
        c = run.config
        title = f"[{i}/{len(runs)}] {run.label} | {c.model} {c.quantizer}{c.bits} {c.optimizer} | trial {run.trial}"
        quantize.append(_Task(run.path, run.config, title, False))
    return pretrains, quantize


def run_sweep(
    spec: SweepSpec,
    root: str | Path,
    *,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    stop: StopFlag | None = None,
    jobs: int = 1,
    only: Sequence[str] | None = None,
) -> list[PlannedRun]:
    """Run every run of ``spec`` (or those ``only`` selects) under ``root`` that is not done yet; one progress line
    per run via ``echo``.

    The shared pre-training runs (if ``spec.pretrain``) come first. A finished run is skipped, an interrupted
    one resumed (``lifecycle.resume``), a new one started (``lifecycle.execute``).

    With ``jobs > 1``, up to ``jobs`` runs go side by side, each in its own process (started fresh, so CUDA
    works in each; on one GPU they share it), the pre-training runs before the quantization runs; each
    process gets ``1/jobs`` of this process's CPU threads, and lines come as runs finish; a run that needs
    another's result (an equivalent STE, its FC-Grad run) starts once that run has finished. A run's numbers do
    not depend on ``jobs`` beyond the number of CPU threads a run gets (which decides the order of a
    convolution's sums, so the last bits): every run is seeded by its configuration alone. A stop request
    (``stop``, e.g. Ctrl-C) is passed on to the runs in progress, which write a checkpoint and stop; a run that
    fails stops the others the same way, and its error is raised once they have stopped.

    Args:
        spec: the sweep.
        root: the directory of the run directories (created if needed).
        progress: show a progress bar per epoch (only with ``jobs=1``).
        echo: receives one line per run (status, final and best test accuracy, seconds); by default they go to
            this module's logger at INFO level (the CLI prints them).
        stop: a ``StopFlag``, as for ``lifecycle.execute``.
        jobs: how many runs at a time (1: one after another, in this process).
        only: patterns of run directory names (``select_runs``); None: every run. Only the pre-training runs
            that the selected runs start (or distil) from are made.

    Returns:
        The ``PlannedRun`` of every quantization run made (or skipped as done), as ``plan`` gives them.

    Raises:
        ValueError: a run directory holds a run of another configuration, or a directory that is not a run
            (nothing in it is touched); ``jobs`` is not an integer >= 1; ``select_runs``'s errors (with
            ``only``) and ``plan``'s.
        RunLockedError: another sweep is working in ``root`` (the sweep holds its lock while it runs).
        TrainingInterrupted: ``stop`` was set; running the sweep again resumes where it stopped.
        FileNotFoundError: as ``lifecycle.execute`` (e.g. the data set is not found).

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.experiments.scheduler import run_sweep
        >>> from metaquant.experiments.sweep import SweepSpec
        >>> base = {"model": "resnet8", "dataset": "mnist", "data_dir": "mnist", "download": False,
        ...         "batch_size": 4, "epochs": 1, "device": "cpu"}
        >>> spec = SweepSpec("tiny", 1, 0, None, base, grid=[{"estimator": "ste"}], optimizer_overrides={})
        >>> _ = run_sweep(spec, "sweeps/tiny", echo=print)
        [1/1] STE | resnet8 dorefa1 sgd | trial 1: done, final ...%, best ...% (...s)
        >>> _ = run_sweep(spec, "sweeps/tiny", echo=print)  # again: the finished run is not run twice
        [1/1] STE | resnet8 dorefa1 sgd | trial 1: skipped (done), final ...%, best ...% (...s)
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    echo = echo if echo is not None else logger.info
    root = Path(root)
    runs = plan(spec, root)
    selected = runs if only is None else select_runs(runs, only)
    pretrains, quantize = _tasks(spec, root, runs, selected)
    root.mkdir(parents=True, exist_ok=True)
    with RunLock(root, what="sweep folder"):  # a second sweep on the folder is refused before it starts anything
        for phase in (pretrains, quantize):  # the quantization runs start from the pre-trained models
            if jobs == 1:
                for task in phase:
                    start = time.perf_counter()
                    status, final, best = _run_once(task.path, task.config, progress, stop)
                    echo(_line(task, status, final, best, time.perf_counter() - start))
            else:
                _run_side_by_side(phase, jobs, echo, stop)
    return selected


def _worker(path: str, config: RunConfig, threads: int, conn: Connection) -> None:
    """One run in a process of its own; sends ``("done", status, final, best)``, ``("interrupted", signum)`` or
    ``("error", module, class name, message)``."""
    torch.set_num_threads(threads)
    reuse_freed_memory()  # a spawned process starts with glibc's defaults: the program's settings, as in run_program
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    stop = StopFlag()
    with stop.installed():
        try:
            conn.send(("done", *_run_once(Path(path), config, False, stop)))
        except TrainingInterrupted as err:
            conn.send(("interrupted", err.signum))
        except Exception as err:  # the parent reports it and stops the sweep
            conn.send(("error", type(err).__module__, type(err).__qualname__, str(err)))
    conn.close()


def _rebuild(module: str, name: str, message: str) -> Exception:
    """The worker's exception, of its own type where that type takes a message alone."""
    try:
        cls = getattr(importlib.import_module(module), name)
        err = cls(message)
        if isinstance(err, Exception):
            return err
    except Exception:  # a type that cannot be rebuilt from its message
        pass
    return RuntimeError(f"{name}: {message}")


@contextlib.contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started in the block begin with SIGINT ignored (a disposition that exec keeps): a Ctrl-C, which
    the terminal sends to every process of the sweep, cannot end one with a traceback while it is still
    importing; this process stops them with SIGTERM, and each run, once started, handles SIGINT itself. A
    SIGINT meant for this process meanwhile is held back (blocked), not lost."""
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (AttributeError, ValueError):  # no POSIX signal masks, or not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _received(receive: Connection) -> Any:
    """The worker's message, or None when it ended without one (killed: its end of the pipe closed unsent)."""
    try:
        return receive.recv() if receive.poll() else None
    except EOFError:
        return None


def _next_task(pending: list[_Task], running: set[Path]) -> _Task | None:
    """The first pending run whose prerequisites are neither pending nor running, or None."""
    unfinished = {t.path for t in pending} | running
    return next((t for t in pending if not (_prerequisites(t.config) & unfinished)), None)


def _run_side_by_side(tasks: list[_Task], jobs: int, echo: Callable[[str], None], stop: StopFlag | None) -> None:
    # "spawn": a fresh interpreter per run, safe with CUDA and with the threads torch has already started.
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // jobs)
    pending = list(tasks)
    running: dict[Any, tuple[Any, Connection, _Task, float]] = {}
    failure: Exception | None = None
    signum: int | None = None
    stopping = False

    def stop_all() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for process, _, _, _ in running.values():
                process.terminate()  # SIGTERM: the run writes a checkpoint at the end of its step and stops

    try:
        while running or (pending and not stopping):  # once stopping, nothing pending starts
            if stop and not stopping:
                signum = stop.signum
                stop_all()
            while len(running) < jobs and not stopping:
                task = _next_task(pending, {entry[2].path for entry in running.values()})
                if task is None:
                    break
                pending.remove(task)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(str(task.path), task.config, threads, send))
                with _children_ignore_ctrl_c():
                    process.start()
                send.close()
                running[process.sentinel] = (process, receive, task, time.perf_counter())
            for sentinel in multiprocessing.connection.wait(list(running), timeout=0.5):
                process, receive, task, start = running.pop(sentinel)
                message = _received(receive)
                process.join()
                receive.close()
                seconds = time.perf_counter() - start
                if message is not None and message[0] == "done":
                    _, status, final, best = message
                    echo(_line(task, status, final, best, seconds))
                elif message is not None and message[0] == "error":
                    echo(f"{task.title}: failed ({message[2]}: {message[3]})")
                    failure = failure or _rebuild(*message[1:])
                    stop_all()
                elif stopping or (message is not None and message[0] == "interrupted"):
                    # interrupted, with a checkpoint, or stopped before it began; a run stopped by a signal of
                    # its own (Ctrl-C reaches every process) stops the sweep as this process's would
                    echo(f"{task.title}: stopped ({seconds:.0f}s)")
                    signum = signum or (message[1] if message is not None else None)
                    stop_all()
                else:
                    failure = failure or RuntimeError(
                        f"the process of {task.path} ended with exit status {process.exitcode} without a result"
                    )
                    echo(f"{task.title}: failed (exit status {process.exitcode})")
                    stop_all()
    finally:
        for process, receive, _, _ in running.values():  # only left over when this process itself failed
            process.terminate()
            process.join()
            receive.close()
    if failure is not None:
        raise failure
    if stopping:
        signum = signum or signal.SIGTERM
        raise TrainingInterrupted(f"sweep stopped by signal {signum}; the runs in progress wrote checkpoints", signum)
