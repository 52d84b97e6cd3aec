"""Results of many runs as the paper's table and comparison figures, for our runs and the original code's logs.

``collect(paths)`` finds, under each path, run directories of this library (``config.json`` +
``metrics.jsonl``) and runs of the original MetaQuant code (``<config>-trial-<n>/test-acc.txt`` and
``loss.txt``, below a folder named ``<Model>-<Dataset>``), and reads each as a ``TrialCurves``.
``summarize`` groups trials by (source, model, dataset, forward, backward, optimizer) and computes the seed
table's statistics:

* *Best Acc*: mean and variance, over trials, of each trial's best test accuracy;
* *Last 10 Acc*: mean and variance of the test accuracies of the last 10 epochs of all trials, pooled.

Variances are population variances (``ddof = 0``) throughout, for both columns.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "TrialCurves", "SummaryRow", "collect", "read_run", "read_original_run", "summarize", "best_stats",
    "last_k_stats", "write_table", "plot_comparisons",
]

OURS = "metaquant"
ORIGINAL = "original code"
_MODELS = {f"resnet{d}": f"ResNet{d}" for d in (18, 20, 32, 44, 56, 110)} | {"lab": "LAB"}
_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "fashion-mnist": "Fashion-MNIST", "mnist": "MNIST",
             "imagenet": "ImageNet"}
_FORWARD = {"dorefa": "dorefa", "bwn": "BWN", "bwn-channel": "BWN-F", "ternary": "ternary", "uniform": "uniform"}
_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
_ORIGINAL_META = {"MLPFC": "MultiFC", "MultiFC": "MultiFC", "FC-Grad": "FC-Grad", "LSTMFC": "LSTMFC"}
_ORIGINAL_RUN = re.compile(
    r"^(?:Baseline-(?P<base_fwd>dorefa|BWN-F|BWN)-optimizer-(?P<base_opt>SGD|Adam)-(?P<base_bits>\d+)bits"
    r"|Meta-(?P<meta>FC-Grad|MLPFC|MultiFC|LSTMFC)-Nonlinear-\w+-hidden-size-\d+(?:-nfc-\d+|-nlstm-\d+)?-"
    r"(?P<meta_fwd>dorefa|BWN-F|BWN)-(?P<meta_opt>SGD|Adam)-(?P<meta_bits>\d+)bits(?:-lr-\d+)?)"
    r"-trial-(?P<trial>\d+)$"
)
_MODEL_DATASET = re.compile(r"^(?P<model>[A-Za-z]+\d*)-(?P<dataset>CIFAR100|CIFAR10|ImageNet|MNIST|Fashion-MNIST)$")


@dataclass
class TrialCurves:
    """One trial: its group key and per-epoch curves (test accuracy in percent, mean training loss)."""

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

    @property
    def key(self) -> tuple[str, str, str, str, int, str, str]:
        return (self.source, self.model, self.dataset, self.forward, self.bits, self.backward, self.optimizer)


@dataclass
class SummaryRow:
    """One configuration of the table."""

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


# --- statistics (pure) -----------------------------------------------------------------------------------
def best_stats(curves: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean and population variance, over trials, of each trial's best accuracy."""
    best = np.array([max(c) for c in curves], dtype=np.float64)
    return float(best.mean()), float(best.var())


def last_k_stats(curves: Sequence[Sequence[float]], k: int = 10) -> tuple[float, float]:
    """Mean and population variance of the last ``k`` accuracies of every trial, pooled together."""
    pooled = np.array([a for c in curves for a in c[-k:]], dtype=np.float64)
    return float(pooled.mean()), float(pooled.var())


# --- reading ---------------------------------------------------------------------------------------------
def read_run(path: Path) -> TrialCurves | None:
    """A finished run directory of this library; None for a pre-training run or an unfinished run (whose
    partial curves would bias the statistics)."""
    from .config import RunConfig
    from .sweep import backward_label

    if not (path / "done").exists():
        logger.info("leaving out the unfinished run %s", path)
        return None
    config = RunConfig.load(path / "config.json")
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if config.task != "quantize" or not metrics:
        return None
    fp_acc = None
    if config.init:
        init = Path(config.init)
        init_metrics = (init if init.is_dir() else init.parent) / "metrics.jsonl"
        if init_metrics.exists():
            lines = [json.loads(x) for x in init_metrics.read_text().splitlines() if x.strip()]
            fp_acc = lines[-1]["test_acc"] if lines else None
    label = config.label or backward_label(config)
    trial = int(path.name.rsplit("-trial-", 1)[1]) if "-trial-" in path.name else config.seed + 1
    return TrialCurves(
        OURS, _MODELS.get(config.model, config.model), _DATASETS.get(config.dataset, config.dataset),
        _FORWARD.get(config.quantizer, config.quantizer), config.bits, label,
        _OPTIMIZERS.get(config.optimizer, config.optimizer),
        trial, [m["test_acc"] for m in metrics], [m["train_loss"] for m in metrics], fp_acc, path,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _read_pairs(path: Path) -> list[tuple[int, float]]:
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
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
    (``iteration, loss`` per iteration); the training loss of an epoch is the mean over its iterations."""
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
        ORIGINAL, model, dataset, _FORWARD.get(forward.lower(), forward),
        int(match["base_bits"] or match["meta_bits"]), backward, optimizer,
        int(match["trial"]), [a for _, a in acc], [float(np.mean(v)) if v else float("nan") for v in per_epoch],
        None, path,
    )


def collect(paths: Iterable[str | Path]) -> list[TrialCurves]:
    """Every trial found under ``paths`` (run directories of this library and original-code runs).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: nothing found, or a file that cannot be parsed (the message names it).
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
    return found


# --- the table -------------------------------------------------------------------------------------------
def summarize(trials: Iterable[TrialCurves], last_k: int = 10) -> list[SummaryRow]:
    """One row per configuration, in a stable order (source, model, dataset, forward, optimizer, backward)."""
    groups: dict[tuple, list[TrialCurves]] = defaultdict(list)
    for t in trials:
        groups[t.key].append(t)
    rows = []
    for key, members in groups.items():
        curves = [t.test_acc for t in members]
        best_mean, best_var = best_stats(curves)
        last_mean, last_var = last_k_stats(curves, last_k)
        fps = [t.fp_acc for t in members if t.fp_acc is not None]
        rows.append(SummaryRow(*key, best_mean, best_var, last_mean, last_var,
                               float(np.mean(fps)) if fps else None, len(members), [len(c) for c in curves]))
    order = {"STE": 0, "FC-Grad": 2, "MultiFC": 3, "LSTMFC": 4}
    rows.sort(key=lambda r: (r.source != OURS, r.model, r.dataset, r.forward, r.bits, r.optimizer,
                             order.get(r.backward, 1 if r.backward.startswith("STE") else 5), r.backward))
    return rows


_COLUMNS = ["Source", "Model", "Dataset", "Forward", "Bits", "Backward", "Optimizer", "Best Acc", "Last 10 Acc",
            "FP Acc", "Trials"]


def _cells(row: SummaryRow) -> list[str]:
    fp = f"{row.fp_acc:.2f}" if row.fp_acc is not None else "-"
    return [row.source, row.model, row.dataset, row.forward, str(row.bits), row.backward, row.optimizer,
            f"{row.best_mean:.3f} ({row.best_var:.3f})", f"{row.last_mean:.3f} ({row.last_var:.3f})", fp,
            str(row.trials)]


def write_table(rows: Sequence[SummaryRow], out: Path, stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.md`` (the seed's layout: mean (variance)) and ``<stem>.csv`` (one column per number)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(" :---: " for _ in _COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines.append("")
    lines.append("Best Acc: mean (variance) over trials of each trial's best test accuracy. Last 10 Acc: mean "
                 "(variance) of the last 10 epochs' test accuracies of all trials pooled. Variances are "
                 "population variances (ddof = 0).")
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source", "model", "dataset", "forward", "bits", "backward", "optimizer", "best_mean", "best_var",
                     "last10_mean", "last10_var", "fp_acc", "trials", "epochs"])
    for r in rows:
        writer.writerow([r.source, r.model, r.dataset, r.forward, r.bits, r.backward, r.optimizer, f"{r.best_mean:.4f}",
                         f"{r.best_var:.4f}", f"{r.last_mean:.4f}", f"{r.last_var:.4f}",
                         "" if r.fp_acc is None else f"{r.fp_acc:.4f}", r.trials, min(r.epochs)])
    csv_path = out / f"{stem}.csv"
    csv_path.write_text(buffer.getvalue())
    return md, csv_path


# --- the figures -----------------------------------------------------------------------------------------
def plot_comparisons(trials: Iterable[TrialCurves], out: Path) -> list[Path]:
    """One PNG per (model, dataset, forward, optimizer): training loss and test accuracy per epoch, one line per
    backward method (mean over trials) with a band from the minimum to the maximum over trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple, dict[str, list[TrialCurves]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        line = t.backward if t.source == OURS else f"{t.backward} [{t.source}]"
        figures[(t.model, t.dataset, t.forward, t.bits, t.optimizer)][line].append(t)
    written = []
    for (model, dataset, forward, bits, optimizer), lines in sorted(figures.items()):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, members in sorted(lines.items()):
            for ax, attr in zip(axes, ("train_loss", "test_acc")):
                n = min(len(getattr(t, attr)) for t in members)
                values = np.array([getattr(t, attr)[:n] for t in members], dtype=np.float64)
                epochs = np.arange(1, n + 1)
                (handle,) = ax.plot(epochs, np.nanmean(values, axis=0), label=f"{label} ({len(members)})")
                ax.fill_between(epochs, np.nanmin(values, axis=0), np.nanmax(values, axis=0),
                                color=handle.get_color(), alpha=0.2)
        axes[0].set_ylabel("training loss (mean over the epoch)")
        axes[1].set_ylabel("test accuracy (%)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[1].legend(title="backward (trials)", fontsize=8)
        fig.suptitle(f"{model} on {dataset}, {bits}-bit {forward} forward, {optimizer}: mean over trials, "
                     "band = min..max")
        fig.tight_layout()
        path = out / f"{_slug(model)}-{_slug(dataset)}-{_slug(forward)}{bits}-{_slug(optimizer)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
