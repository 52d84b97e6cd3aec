"""Results of many runs as the paper's table and comparison figures, for our runs and the original code's logs.

``collect(paths)`` finds, under each path, run directories of this library (``config.json`` +
``metrics.jsonl``) and runs of the original MetaQuant code (``<config>-trial-<n>/test-acc.txt`` and
``loss.txt``, below a folder named ``<Model>-<Dataset>``), and reads each as a ``TrialCurves``.
``summarize`` groups trials by their experiment (source, model, dataset, forward, bits, backward, optimizer and
every other setting that changes what is trained: ``TrialCurves.setting``) and computes the seed table's
statistics:

* *Best Acc*: mean and variance, over trials, of each trial's best test accuracy;
* *Last 10 Acc*: mean and variance of the test accuracies of the last 10 epochs of all trials, pooled.

Variances are population variances (``ddof = 0``) throughout, for both columns. A trial found twice (an
identical copy of a run) counts once; rows that would show the same name get the settings that tell them
apart appended to their backward label, e.g. ``STE [amp=bf16]``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .naming import backward_label
from .runs import RunDir

logger = logging.getLogger(__name__)

__all__ = [
    "TrialCurves",
    "SummaryRow",
    "collect",
    "read_run",
    "read_original_run",
    "summarize",
    "told_apart",
    "best_stats",
    "last_k_stats",
    "final_stats",
]

OURS = "metaquant"
ORIGINAL = "original code"
_MODELS = {f"resnet{d}": f"ResNet{d}" for d in (18, 20, 32, 44, 56, 110)} | {
    "lab": "LAB",
    "resnet20-bireal": "ResNet20 (Bi-Real)",
}
_DATASETS = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "fashion-mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "imagenet": "ImageNet",
}
_FORWARD = {
    "dorefa": "dorefa",
    "bwn": "BWN",
    "bwn-channel": "BWN-F",
    "ternary": "ternary",
    "uniform": "uniform",
    "lsq": "LSQ",
    "lsq-channel": "LSQ-channel",
}
_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
_ORIGINAL_META = {"MLPFC": "MultiFC", "MultiFC": "MultiFC", "FC-Grad": "FC-Grad", "LSTMFC": "LSTMFC"}
_ORIGINAL_RUN = re.compile(
    r"^(?:Baseline-(?P<base_fwd>dorefa|BWN-F|BWN)-optimizer-(?P<base_opt>SGD|Adam)-(?P<base_bits>\d+)bits"
    r"|Meta-(?P<meta>FC-Grad|MLPFC|MultiFC|LSTMFC)-Nonlinear-\w+-hidden-size-\d+(?:-nfc-\d+|-nlstm-\d+)?-"
    r"(?P<meta_fwd>dorefa|BWN-F|BWN)-(?P<meta_opt>SGD|Adam)-(?P<meta_bits>\d+)bits(?:-lr-\d+)?)"
    r"-trial-(?P<trial>\d+)$"
)
_MODEL_DATASET = re.compile(r"^(?P<model>[A-Za-z]+\d*)-(?P<dataset>CIFAR100|CIFAR10|ImageNet|MNIST|Fashion-MNIST)$")
#: RunConfig fields that do not change what is trained: the seeds (what varies from trial to trial), where files
#: are (a run that continues another is told apart by ``first_epoch``), where and how the run executes, its
#: reliability knobs, what it only records, and its name and the fields that the row's key already shows.
_NOT_THE_SETTING = frozenset(
    {
        *("seed", "subset_seed", "init", "teacher", "meta_init", "lr_gain_from", "data_dir", "download", "device"),
        *("memory_format", "on_nonfinite", "max_skipped", "checkpoint_every", "test_batch_size", "record_precise_bn"),
        *("label", "task", "model", "dataset", "quantizer", "bits", "optimizer"),
    }
)


@dataclass
class TrialCurves:
    """One trial: its group key and per-epoch curves (test accuracy in percent, mean training loss).

    Attributes:
        source: ``"metaquant"`` (a run of this library) or ``"original code"``.
        model, dataset, forward, bits, backward, optimizer: the configuration, as the table names them
            (e.g. ``"ResNet20"``, ``"CIFAR10"``, ``"dorefa"``, ``1``, ``"MultiFC"``, ``"SGD"``).
        trial: the trial number.
        test_acc: test accuracy after each epoch.
        train_loss: mean training loss of each epoch.
        fp_acc: the full-precision model's accuracy, if known (the run it started from).
        path: where the trial was read from.
        first_epoch: the epochs of the runs this one continues (a fine-tuning run's source run); the figures draw
            this run's epoch ``i`` at ``first_epoch + i``.
        precise_acc: test accuracy after each epoch with BatchNorm statistics recomputed from training batches
            (``record_precise_bn``, or every test of a run with ``precise_bn_batches``), when the run has it.
        setting: ``(field, value)`` pairs of everything else that changes the experiment (learning rate, epochs,
            precision, schedule, activation quantization, ...; ``first_epoch``); empty for a run of the original
            code.
        act_bits: the activations' bit width, None for float activations (the backward label names the
            activation quantizer).
        start: what trial ``n`` of two experiments must share to be compared trial by trial (``paired``): the
            seeds, and the names of the run it starts from and of its teacher; empty when not known.
        gain_from: for an equivalent STE, the name of the run whose gain it takes; else None.

    Example:
        >>> from metaquant.experiments.report import TrialCurves
        >>> t = TrialCurves("metaquant", "ResNet20", "CIFAR10", "dorefa", 1, "MultiFC", "SGD", trial=2,
        ...                 test_acc=[80.0, 85.5], train_loss=[0.9, 0.6])
        >>> t.key  # what summarize groups by: everything but the trial
        ('metaquant', 'ResNet20', 'CIFAR10', 'dorefa', 1, 'MultiFC', 'SGD', ())
    """

    source: str
    model: str
    dataset: str
    forward: str
    bits: int
    backward: str
    optimizer: str
    trial: int
    test_acc: list[float]
    train_loss: list[float]
    fp_acc: float | None = None
    path: Path | None = None
    first_epoch: int = 0
    precise_acc: list[float] | None = None
    setting: tuple[tuple[str, Any], ...] = ()
    act_bits: int | None = None
    start: tuple[Any, ...] = ()
    gain_from: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str, int, str, str, tuple[tuple[str, Any], ...]]:
        return (*self.shown, self.setting)

    @property
    def shown(self) -> tuple[str, str, str, str, int, str, str]:
        """What the table shows of the experiment: ``key`` without ``setting``."""
        return (self.source, self.model, self.dataset, self.forward, self.bits, self.backward, self.optimizer)


@dataclass
class SummaryRow:
    """One experiment of the table: ``summarize``'s statistics over its trials.

    Attributes:
        source, model, dataset, forward, bits, backward, optimizer, setting: the experiment (``TrialCurves.key``).
        best_mean, best_var: mean and population variance over trials of each trial's best test accuracy.
        last_mean, last_var: mean and population variance of the last ``k`` test accuracies of all trials.
        fp_acc: mean full-precision accuracy of the trials' starting models, or None.
        trials: the number of trials.
        epochs: each trial's number of epochs.
        final: mean and population variance over trials of each trial's final test accuracy.
        precise_final, precise_last: as ``final`` and ``last_*``, with BatchNorm statistics recomputed
            (``TrialCurves.precise_acc``), when every trial of the row has them; else None.
        act_bits: the activations' bit width, None for float activations.

    Example:
        >>> from metaquant.experiments.report import TrialCurves
        >>> def trial(backward, n, acc):  # one trial of 3 epochs of ResNet20 on CIFAR10, 1-bit DoReFa, SGD
        ...     return TrialCurves("metaquant", "ResNet20", "CIFAR10", "dorefa", 1, backward, "SGD", n, acc, [1.0]*3)
        >>> from metaquant.experiments.report import summarize
        >>> (row,) = summarize([trial("STE", 1, [70.0, 80.0, 75.0]), trial("STE", 2, [72.0, 78.0, 79.0])], last_k=2)
        >>> row.backward, row.best_mean, row.best_var, row.last_mean, row.last_var, row.trials, row.epochs
        ('STE', 79.5, 0.25, 78.0, 3.5, 2, [3, 3])
    """

    source: str
    model: str
    dataset: str
    forward: str
    bits: int
    backward: str
    optimizer: str
    best_mean: float
    best_var: float
    last_mean: float
    last_var: float
    fp_acc: float | None
    trials: int
    epochs: list[int] = field(default_factory=list)
    final: tuple[float, float] = (float("nan"), float("nan"))
    precise_final: tuple[float, float] | None = None
    precise_last: tuple[float, float] | None = None
    setting: tuple[tuple[str, Any], ...] = ()
    act_bits: int | None = None


# --- statistics (pure) -----------------------------------------------------------------------------------
def best_stats(curves: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean and population variance, over trials, of each trial's best accuracy.

    The paper's *Best Acc* column (docs/design.md §6.1).

    Args:
        curves: each trial's test accuracies, one per epoch (at least one per trial).

    Returns:
        ``(mean, variance)``, the variance with ``ddof = 0``.

    Raises:
        ValueError: a trial without accuracies.

    Example:
        >>> from metaquant.experiments.report import best_stats
        >>> best_stats([[70.0, 80.0, 75.0], [72.0, 78.0, 79.0]])  # bests 80, 79: mean 79.5, variance 0.5² = 0.25
        (79.5, 0.25)
    """
    best = np.array([max(c) for c in curves], dtype=np.float64)
    return float(best.mean()), float(best.var())


def last_k_stats(curves: Sequence[Sequence[float]], k: int = 10) -> tuple[float, float]:
    """Mean and population variance of the last ``k`` accuracies of every trial, pooled together.

    The paper's *Last 10 Acc* column (docs/design.md §6.1) for ``k = 10``; a trial shorter than ``k`` epochs contributes
    all of its accuracies.

    Args:
        curves: each trial's test accuracies, one per epoch.
        k: how many of the last epochs of each trial to pool.

    Returns:
        ``(mean, variance)``, the variance with ``ddof = 0``; NaN for no accuracy at all.

    Example:
        >>> from metaquant.experiments.report import last_k_stats
        >>> last_k_stats([[70.0, 80.0, 75.0], [72.0, 78.0, 79.0]], k=2)  # pooled 80, 75, 78, 79
        (78.0, 3.5)

        The mean is 312 / 4 = 78 and the variance (2² + 3² + 0² + 1²) / 4 = 3.5.
    """
    pooled = np.array([a for c in curves for a in c[-k:]], dtype=np.float64)
    return float(pooled.mean()), float(pooled.var())


def final_stats(curves: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean and population variance, over trials, of each trial's final accuracy."""
    final = np.array([c[-1] for c in curves], dtype=np.float64)
    return float(final.mean()), float(final.var())


def _precise_curve(config: RunConfig, metrics: list[dict]) -> list[float] | None:
    """Each epoch's test accuracy with BatchNorm statistics recomputed, if the run measured it."""
    if metrics and all(isinstance(m.get("test_acc_precise_bn"), (int, float)) for m in metrics):
        return [m["test_acc_precise_bn"] for m in metrics]
    if config.precise_bn_batches > 0:  # every test of the run recomputed them
        return [m["test_acc"] for m in metrics]
    return None


# --- reading ---------------------------------------------------------------------------------------------
def _descent(config: RunConfig, path: Path) -> tuple[float | None, int]:
    """What the run in ``path`` descends from: the final test accuracy of its full-precision model, if known, and
    the number of epochs of the quantization runs it continues (0 for a run started from a full-precision model).

    ``init`` names the run a run started from; a quantization run that continues another (fine-tuning a 1-bit
    model) names that one, so the chain is followed through quantization runs to the first run that is not
    one. A directory that is not found where ``init`` says is looked for beside the run (a sweep's folder moved
    elsewhere).
    """

    visited: set[Path] = set()
    source, here, epochs_before = config.init, path, 0
    while source:
        init = Path(source)
        if not init.exists() and (here.parent / init.name).exists():
            init = here.parent / init.name
        run_dir = init if init.is_dir() else init.parent
        key = run_dir.resolve()
        if key in visited:  # a loop of runs that start from each other: no full-precision model, no start
            return None, 0
        visited.add(key)
        if (run_dir / "config.json").exists():
            parent = RunConfig.load(run_dir / "config.json")
            if parent.task == "quantize":
                if (run_dir / "metrics.jsonl").exists():
                    epochs_before += len(_checked_metrics(run_dir, need=("test_acc",)))
                source, here = parent.init, run_dir
                continue
        if not (run_dir / "metrics.jsonl").exists():
            return None, epochs_before
        lines = _checked_metrics(run_dir, need=("test_acc",))
        return (lines[-1]["test_acc"] if lines else None), epochs_before
    return None, epochs_before


def read_run(path: Path) -> TrialCurves | None:
    """A finished run directory of this library; None for a pre-training run or an unfinished run (whose
    partial curves would bias the statistics).

    The backward method is the run's ``label`` (default ``naming.backward_label``); the trial number comes from
    a directory name ending in ``-trial-<n>``, else it is ``seed + 1``; ``fp_acc`` is the final accuracy of
    the run named by ``init``, when that run directory is there (or, for a sweep's folder that was moved, a
    directory of the same name beside the run); for a run that continues a quantization run, that of the
    full-precision run at the start of the chain, and ``first_epoch`` the epochs of the runs before it there.

    Args:
        path: the run directory.

    Returns:
        The ``TrialCurves``, or None.

    Raises:
        FileNotFoundError: a finished run without ``config.json`` or ``metrics.jsonl``.
        ValueError: an unreadable ``config.json`` or ``metrics.jsonl``, or a metrics record without a number
            for ``test_acc`` or without ``train_loss`` (the message names the file).

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.report import read_run
        >>> run = mq.experiments.runs.RunDir.create("runs/ste-trial-2", RunConfig(model="resnet20", dataset="cifar10"))
        >>> for epoch, (acc, loss) in enumerate([(80.0, 0.9), (84.5, 0.7)]):
        ...     run.record_epoch({"epoch": epoch, "test_acc": acc, "train_loss": loss}, [])
        >>> read_run(run.path) is None  # not finished yet
        True
        >>> run.mark_done(); t = read_run(run.path)
        >>> t.shown, t.trial, t.test_acc, t.train_loss, dict(t.setting)["epochs"]
        (('metaquant', 'ResNet20', 'CIFAR10', 'dorefa', 1, 'STE', 'SGD'), 2, [80.0, 84.5], [0.9, 0.7], 10)
    """

    if not (path / "done").exists():
        logger.info("leaving out the unfinished run %s", path)
        return None
    config = RunConfig.load(path / "config.json")
    metrics = _checked_metrics(path)
    if config.task != "quantize" or not metrics:
        return None
    fp_acc, epochs_before = _descent(config, path)
    label = config.label or backward_label(config)
    trial = int(path.name.rsplit("-trial-", 1)[1]) if "-trial-" in path.name else config.seed + 1
    return TrialCurves(
        OURS,
        _MODELS.get(config.model, config.model),
        _DATASETS.get(config.dataset, config.dataset),
        _FORWARD.get(config.quantizer, config.quantizer),
        config.bits,
        label,
        _OPTIMIZERS.get(config.optimizer, config.optimizer),
        trial,
        [m["test_acc"] for m in metrics],
        [m["train_loss"] for m in metrics],
        fp_acc,
        path,
        epochs_before,
        _precise_curve(config, metrics),
        _setting(config, epochs_before),
        config.act_bits,
        (config.seed, config.subset_seed, _name(config.init), _name(config.teacher)),
        _name(config.lr_gain_from),
    )


def _name(path: str | None) -> str | None:
    """The last part of a run's or file's path (a sweep's folder may have moved), or None."""
    return Path(path).name if path else None


def _setting(config: RunConfig, first_epoch: int) -> tuple[tuple[str, Any], ...]:
    kept = [(k, v) for k, v in config.to_dict().items() if k not in _NOT_THE_SETTING]
    return (*kept, ("first_epoch", first_epoch))


def _checked_metrics(path: Path, need: tuple[str, ...] = ("test_acc", "train_loss")) -> list[dict]:
    """A run directory's metrics records (``RunDir.metrics``: every line checked), each with the keys in
    ``need``; a missing file or key is an error that names the file."""

    run = RunDir(path)
    if not run.metrics_path.exists():
        raise FileNotFoundError(f"{run.metrics_path} is missing")
    metrics = run.metrics()
    for m in metrics:
        absent = [k for k in need if k not in m or (k == "test_acc" and not isinstance(m[k], (int, float)))]
        if absent:
            raise ValueError(f"{run.metrics_path}: the record of epoch {m['epoch']} has no {' or '.join(absent)}")
    return metrics


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _read_pairs(path: Path) -> list[tuple[int, float]]:
    pairs = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8)") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            it, value = line.split(",")
            pairs.append((int(it), float(value)))
        except ValueError:
            raise ValueError(f"{path}, line {n}: expected 'iteration, value', got {line!r}") from None
    return pairs


def read_original_run(path: Path) -> TrialCurves:
    """A run of the original code: ``test-acc.txt`` (``iteration, accuracy`` per epoch) and ``loss.txt``
    (``iteration, loss`` per iteration); the training loss of an epoch is the mean over its iterations.

    The configuration comes from the directory's name (``Baseline-<forward>-optimizer-<SGD|Adam>-<k>bits-
    trial-<n>`` or ``Meta-<method>-Nonlinear-...-<forward>-<SGD|Adam>-<k>bits-trial-<n>``) and the model and
    data set from a parent folder ``<Model>-<Dataset>`` (``"?"`` without one). ``loss.txt`` is optional.

    Args:
        path: the run's directory.

    Returns:
        The ``TrialCurves`` (source ``"original code"``).

    Raises:
        ValueError: the directory's name is not a run name of the original code, ``test-acc.txt`` holds no
            accuracy, or a line is not ``iteration, value`` (the message names the file and line).
        FileNotFoundError: no ``test-acc.txt``.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.report import read_original_run
        >>> name = "Meta-MultiFC-Nonlinear-None-hidden-size-100-nfc-2-dorefa-SGD-1bits-trial-3"
        >>> run = pathlib.Path("ResNet20-CIFAR10") / name; run.mkdir(parents=True)
        >>> _ = (run / "test-acc.txt").write_text("2, 80.5\\n4, 84.0\\n")  # epochs end at iterations 2 and 4
        >>> _ = (run / "loss.txt").write_text("1, 2.0\\n2, 1.0\\n3, 0.75\\n4, 0.25\\n")
        >>> t = read_original_run(run)
        >>> t.source, t.model, t.backward, t.optimizer, t.trial, t.test_acc, t.train_loss
        ('original code', 'ResNet20', 'MultiFC', 'SGD', 3, [80.5, 84.0], [1.5, 0.5])
    """
    match = _ORIGINAL_RUN.match(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not a run name of the original code")
    owner = next((m for p in path.parents if (m := _MODEL_DATASET.match(p.name))), None)
    model, dataset = (owner["model"], owner["dataset"]) if owner else ("?", "?")
    acc = _read_pairs(path / "test-acc.txt")
    if not acc:
        raise ValueError(f"{path / 'test-acc.txt'} holds no accuracy")
    losses = _read_pairs(path / "loss.txt") if (path / "loss.txt").exists() else []
    epoch_ends = [it for it, _ in acc]
    per_epoch: list[list[float]] = [[] for _ in epoch_ends]
    e = 0
    for it, loss in losses:
        while e < len(epoch_ends) - 1 and it > epoch_ends[e]:
            e += 1
        per_epoch[e].append(loss)
    forward = match["base_fwd"] or match["meta_fwd"]
    optimizer = match["base_opt"] or match["meta_opt"]
    backward = "STE" if match["base_fwd"] else _ORIGINAL_META[match["meta"]]
    return TrialCurves(
        ORIGINAL,
        model,
        dataset,
        _FORWARD.get(forward.lower(), forward),
        int(match["base_bits"] or match["meta_bits"]),
        backward,
        optimizer,
        int(match["trial"]),
        [a for _, a in acc],
        [float(np.mean(v)) if v else float("nan") for v in per_epoch],
        None,
        path,
    )


def collect(paths: Iterable[str | Path]) -> list[TrialCurves]:
    """Every trial found under ``paths`` (run directories of this library and original-code runs).

    Each path and every directory below it is looked at once (overlapping paths count a run once); unfinished
    runs and pre-training runs of this library are left out (``read_run``). An identical copy of a trial (the
    same experiment and curves) counts once, and a trial number found twice in one experiment is logged as a
    warning.

    Args:
        paths: directories to search (a run directory itself is fine).

    Returns:
        The ``TrialCurves`` found.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: nothing found, or a file that cannot be parsed (the message names it).

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.report import collect
        >>> for n in (1, 2):
        ...     run = mq.experiments.runs.RunDir.create(f"results/multifc-trial-{n}", RunConfig(estimator="multifc"))
        ...     run.record_epoch({"epoch": 0, "test_acc": 80.0 + n, "train_loss": 0.5}, [])
        ...     run.mark_done()
        >>> _ = mq.experiments.runs.RunDir.create("results/unfinished", RunConfig())  # left out
        >>> sorted((t.backward, t.trial, t.test_acc) for t in collect(["results", "results/multifc-trial-1"]))
        [('MultiFC (STE start)', 1, [81.0]), ('MultiFC (STE start)', 2, [82.0])]
    """
    found: list[TrialCurves] = []
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
        for d in candidates:
            if d.resolve() in seen:  # overlapping paths: each run counts once
                continue
            seen.add(d.resolve())
            if (d / "config.json").exists() and (d / "metrics.jsonl").exists():
                trial = read_run(d)
                if trial is not None:
                    found.append(trial)
            elif (d / "test-acc.txt").exists() and _ORIGINAL_RUN.match(d.name):
                found.append(read_original_run(d))
    if not found:
        raise ValueError(f"no runs found under {', '.join(map(str, paths))}")
    found = _counted_once(found)
    _warn_repeated_trials(found)
    return found


def _counted_once(trials: Iterable[TrialCurves]) -> list[TrialCurves]:
    """``trials`` without repeats: a trial with the key and the curves of one before it is a copy of it."""
    kept: list[TrialCurves] = []
    first: dict[tuple[Any, ...], Path | None] = {}  # fingerprint -> where it was first found
    for t in trials:
        fingerprint = (t.key, repr(t.test_acc), repr(t.train_loss))
        if fingerprint in first:
            logger.warning(
                "counting one trial once: %s is a copy of %s (the same experiment and curves)",
                t.path,
                first[fingerprint],
            )
            continue
        first[fingerprint] = t.path
        kept.append(t)
    return kept


def _warn_repeated_trials(trials: Iterable[TrialCurves]) -> None:
    paths: dict[tuple[Any, int], list[str]] = defaultdict(list)
    for t in trials:
        paths[(t.key, t.trial)].append(str(t.path))
    for (key, trial), where in paths.items():
        if len(where) > 1:
            logger.warning(
                "trial %d of %s appears %d times (%s): each counts as a trial; give them different trial numbers "
                "if they are different trials, or remove the extra ones",
                trial,
                " | ".join(map(str, key[1:7])),
                len(where),
                ", ".join(where),
            )


def _shown_value(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def told_apart(trials: Iterable[TrialCurves]) -> list[TrialCurves]:
    """``trials``, where experiments that the table would show under one name (``TrialCurves.shown``) get the
    settings that differ between them appended to their backward label, e.g. ``STE [amp=bf16]`` beside
    ``STE [amp=none]``."""
    trials = list(trials)
    variants: dict[tuple[Any, ...], dict[tuple[tuple[str, Any], ...], None]] = defaultdict(dict)
    for t in trials:
        variants[t.shown][t.setting] = None
    suffix = {}
    for shown, settings in variants.items():
        if len(settings) < 2:
            continue
        values = [dict(setting) for setting in settings]
        names = dict.fromkeys(name for v in values for name in v)
        differ = [name for name in names if len({repr(v.get(name)) for v in values}) > 1]
        for setting, v in zip(settings, values):
            suffix[(shown, setting)] = " [" + ", ".join(f"{n}={_shown_value(v.get(n))}" for n in differ) + "]"
    return [
        replace(t, backward=t.backward + suffix[(t.shown, t.setting)]) if (t.shown, t.setting) in suffix else t
        for t in trials
    ]


# --- the table -------------------------------------------------------------------------------------------
def summarize(trials: Iterable[TrialCurves], last_k: int = 10) -> list[SummaryRow]:
    """One row per configuration, in a stable order (source, model, dataset, forward, optimizer, backward).

    Trials are grouped by ``TrialCurves.key`` (a repeated trial counts once; experiments that would show the same
    name are ``told_apart``); each group gets ``best_stats`` and ``last_k_stats``. Our runs
    come before the original code's; backward methods in the order STE, other STE variants, FC-Grad,
    MultiFC, LSTMFC, the rest.

    Args:
        trials: the trials (``collect``).
        last_k: how many last epochs of each trial the *Last k Acc* statistics pool.

    Returns:
        The ``SummaryRow`` of every configuration.

    Raises:
        ValueError: a trial without accuracies.

    Example:
        >>> from metaquant.experiments.report import TrialCurves
        >>> def trial(backward, n, acc):  # one trial of 3 epochs of ResNet20 on CIFAR10, 1-bit DoReFa, SGD
        ...     return TrialCurves("metaquant", "ResNet20", "CIFAR10", "dorefa", 1, backward, "SGD", n, acc, [1.0]*3)
        >>> from metaquant.experiments.report import summarize
        >>> rows = summarize([trial("MultiFC", 1, [80.0, 85.0, 86.0]), trial("STE", 1, [75.0, 80.0, 79.0]),
        ...                   trial("STE + momentum 0.9", 1, [78.0, 82.0, 84.0])], last_k=2)
        >>> [(r.backward, r.best_mean, r.last_mean) for r in rows]
        [('STE', 80.0, 79.5), ('STE + momentum 0.9', 84.0, 83.0), ('MultiFC', 86.0, 85.5)]
    """
    groups: dict[tuple[Any, ...], list[TrialCurves]] = defaultdict(list)
    for t in told_apart(_counted_once(trials)):
        groups[t.key].append(t)
    rows = []
    for key, members in groups.items():
        curves = [t.test_acc for t in members]
        best_mean, best_var = best_stats(curves)
        last_mean, last_var = last_k_stats(curves, last_k)
        fps = [t.fp_acc for t in members if t.fp_acc is not None]
        precise = [t.precise_acc for t in members if t.precise_acc]
        complete = len(precise) == len(members)
        source, model, dataset, forward, bits, backward, optimizer, setting = key
        rows.append(
            SummaryRow(
                source,
                model,
                dataset,
                forward,
                bits,
                backward,
                optimizer,
                best_mean,
                best_var,
                last_mean,
                last_var,
                float(np.mean(fps)) if fps else None,
                len(members),
                [len(c) for c in curves],
                final_stats(curves),
                final_stats(precise) if complete else None,
                last_k_stats(precise, last_k) if complete else None,
                setting,
                members[0].act_bits,  # read_run's setting holds it: the same for every member
            )
        )
    order = {"STE": 0, "FC-Grad": 2, "MultiFC": 3, "LSTMFC": 4}
    rows.sort(
        key=lambda r: (
            r.source != OURS,
            r.model,
            r.dataset,
            r.forward,
            r.bits,
            (r.act_bits is not None, r.act_bits or 0),  # float activations first, then by width
            r.optimizer,
            order.get(r.backward, 1 if r.backward.startswith("STE") else 5),
            r.backward,
        )
    )
    return rows
