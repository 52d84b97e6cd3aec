"""The results tables: ``summarize``'s rows as Markdown (the seed's layout: mean (variance)) and CSV, and beside
them, for runs that measured it, the accuracies with BatchNorm statistics recomputed, and the trial-by-trial
differences with the STE (``paired``).

A table gains an ``Act Bits`` column after ``Bits`` only when one of its runs quantizes activations: the tables
of weight-only runs keep their layout.

Both files of a table are written together (``files.atomic_write_files``): a failure leaves the old pair whole.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_files
from .paired import PairedRow
from .report import SummaryRow

__all__ = ["write_table", "write_precise_table", "write_paired_table", "OPTIONAL_TABLES"]

PRECISE_STEM, PAIRED_STEM = "results-precise-bn", "results-paired"
#: The tables written only when the runs have what they show (each as ``<stem>.md`` and ``<stem>.csv``).
OPTIONAL_TABLES = (PRECISE_STEM, PAIRED_STEM)


_COLUMNS = [
    "Source",
    "Model",
    "Dataset",
    "Forward",
    "Bits",
    "Backward",
    "Optimizer",
    "Best Acc",
    "Last 10 Acc",
    "FP Acc",
    "Trials",
]
_CSV_KEY = ["source", "model", "dataset", "forward", "bits", "backward", "optimizer"]
_FLOAT_ACT_BITS = 32  # what the activations' column shows for float activations
_ACT_NOTE = f" Act Bits: the activations' bit width ({_FLOAT_ACT_BITS}: float)."


def _quantizes_activations(rows: Sequence[SummaryRow]) -> bool:
    return any(r.act_bits is not None for r in rows)


def _with_act(key: list[Any], act: Any, activations: bool) -> list[Any]:
    """``key`` (a row's experiment or the columns naming it) with ``act`` after the weights' bits, if shown."""
    return key[:5] + [act] + key[5:] if activations else key


def _key(row: SummaryRow, activations: bool) -> list[Any]:
    """What names the row's experiment: source, model, data set, forward, bits (and the activations'), backward,
    optimizer."""
    act = _FLOAT_ACT_BITS if row.act_bits is None else row.act_bits
    key = [row.source, row.model, row.dataset, row.forward, row.bits, row.backward, row.optimizer]
    return _with_act(key, act, activations)


def _cells(row: SummaryRow, activations: bool) -> list[str]:
    fp = f"{row.fp_acc:.2f}" if row.fp_acc is not None else "-"
    return [
        *map(str, _key(row, activations)),
        f"{row.best_mean:.3f} ({row.best_var:.3f})",
        f"{row.last_mean:.3f} ({row.last_var:.3f})",
        fp,
        str(row.trials),
    ]


def write_table(rows: Sequence[SummaryRow], out: Path, stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.md`` (the seed's layout: mean (variance)) and ``<stem>.csv`` (one column per number).

    The Markdown table shows three decimals and ends with a note on the statistics; the CSV has four decimals
    and the fewest epochs of the row's trials.

    Args:
        rows: the table (``summarize``).
        out: the directory to write in (created if needed).
        stem: the files' name without extension.

    Returns:
        ``(markdown path, CSV path)``.

    Raises:
        OSError: the files cannot be written (both are then as they were: neither replaces its old file before
            both are complete on disk).

    Example:
        >>> from metaquant.experiments.report import TrialCurves
        >>> def trial(backward, n, acc):  # one trial of 3 epochs of ResNet20 on CIFAR10, 1-bit DoReFa, SGD
        ...     return TrialCurves("metaquant", "ResNet20", "CIFAR10", "dorefa", 1, backward, "SGD", n, acc, [1.0]*3)
        >>> from metaquant.experiments.report import summarize
        >>> from metaquant.experiments.tables import write_table
        >>> rows = summarize([trial("STE", 1, [70.0, 80.0, 75.0]), trial("STE", 2, [72.0, 78.0, 79.0])], last_k=2)
        >>> import pathlib
        >>> md, csv_path = write_table(rows, pathlib.Path("tables"))
        >>> md.read_text().splitlines()[2]
        '| metaquant | ResNet20 | CIFAR10 | dorefa | 1 | STE | SGD | 79.500 (0.250) | 78.000 (3.500) | - | 2 |'
        >>> csv_path.read_text().splitlines()[1]
        'metaquant,ResNet20,CIFAR10,dorefa,1,STE,SGD,79.5000,0.2500,78.0000,3.5000,,2,3'
    """
    out.mkdir(parents=True, exist_ok=True)
    activations = _quantizes_activations(rows)
    columns = _with_act(_COLUMNS, "Act Bits", activations)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" :---: " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cells(r, activations)) + " |" for r in rows]
    lines.append("")
    lines.append(
        "Best Acc: mean (variance) over trials of each trial's best test accuracy. Last 10 Acc: mean "
        "(variance) of the last 10 epochs' test accuracies of all trials pooled. Variances are "
        "population variances (ddof = 0)." + (_ACT_NOTE if activations else "")
    )
    md = out / f"{stem}.md"
    markdown = "\n".join(lines) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        _with_act(_CSV_KEY, "act_bits", activations)
        + ["best_mean", "best_var", "last10_mean", "last10_var", "fp_acc", "trials", "epochs"]
    )
    for r in rows:
        writer.writerow(
            _key(r, activations)
            + [
                f"{r.best_mean:.4f}",
                f"{r.best_var:.4f}",
                f"{r.last_mean:.4f}",
                f"{r.last_var:.4f}",
                "" if r.fp_acc is None else f"{r.fp_acc:.4f}",
                r.trials,
                min(r.epochs),
            ]
        )
    csv_path = out / f"{stem}.csv"
    atomic_write_files({md: markdown.encode(), csv_path: buffer.getvalue().encode()})
    return md, csv_path


_PRECISE_COLUMNS = _COLUMNS[:7] + [
    "Final Acc",
    "Final Acc (BN recomputed)",
    "Last 10 Acc",
    "Last 10 Acc (BN recomputed)",
    "Trials",
]


_PRECISE_NOTE = (
    "Final Acc: mean (variance) over trials of each trial's last test accuracy; Last 10 Acc: as in the main table. "
    "(BN recomputed): the same with the BatchNorm statistics recomputed from training batches before each test "
    "(record_precise_bn, or a run's own precise_bn_batches) instead of the running averages the run kept."
)


def write_precise_table(rows: Sequence[SummaryRow], out: Path, stem: str = PRECISE_STEM) -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv``: the rows whose trials all measured their accuracy with BatchNorm
    statistics recomputed, raw and recomputed side by side; nothing (an empty list) when no row has them."""
    shown = [r for r in rows if r.precise_final is not None and r.precise_last is not None]
    if not shown:
        return []
    out.mkdir(parents=True, exist_ok=True)
    activations = _quantizes_activations(rows)  # as in the main table

    def pair(stats: tuple[float, float] | None) -> tuple[float, float]:
        assert stats is not None
        return stats

    cells = []
    for r in shown:
        stats = [r.final, pair(r.precise_final), (r.last_mean, r.last_var), pair(r.precise_last)]
        cells.append((_key(r, activations), stats, r.trials))
    columns = _with_act(_PRECISE_COLUMNS, "Act Bits", activations)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" :---: " for _ in columns) + "|"]
    lines += [
        "| " + " | ".join([*map(str, key)] + [f"{m:.3f} ({v:.3f})" for m, v in stats] + [str(trials)]) + " |"
        for key, stats, trials in cells
    ]
    md = out / f"{stem}.md"
    markdown = "\n".join(lines) + "\n\n" + _PRECISE_NOTE + (_ACT_NOTE if activations else "") + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = ["final", "final_precise_bn", "last10", "last10_precise_bn"]
    header = _with_act(_CSV_KEY, "act_bits", activations)
    writer.writerow(header + [f"{n}_{s}" for n in names for s in ("mean", "var")] + ["trials"])
    for key, stats, trials in cells:
        writer.writerow(key + [f"{x:.4f}" for m, v in stats for x in (m, v)] + [trials])
    csv_path = out / f"{stem}.csv"
    atomic_write_files({md: markdown.encode(), csv_path: buffer.getvalue().encode()})
    return [md, csv_path]


_PAIRED_COLUMNS = ["Model", "Dataset", "Forward", "Bits", "Optimizer", "Backward", "Against", "Trials"]
_PAIRED_STATS = [
    ("Δ Last 10", "last10", "last"),
    ("Δ Last 10 (BN recomputed)", "last10_precise_bn", "precise_last"),
    ("Δ Final", "final", "final"),
    ("Δ Final (BN recomputed)", "final_precise_bn", "precise_final"),
]
_PAIRED_NOTE = (
    "Trial by trial against the STE experiment of the same settings (trial n of both share a seed: the same data "
    "order, augmentation and start): each cell is the mean over the paired trials of the difference (method − "
    "STE), in points, then each trial's difference in trial order. Last 10: the mean of a trial's last 10 test "
    "accuracies; (BN recomputed): with BatchNorm statistics recomputed from training batches before each test; "
    "-: not measured by every trial of both."
)


def write_paired_table(rows: Sequence[PairedRow], out: Path, stem: str = PAIRED_STEM) -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv``: ``paired.paired_differences``'s comparisons; nothing (an empty list)
    when there is none."""
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    activations = any(r.act_bits is not None for r in rows)
    act = ["Act Bits"] if activations else []
    columns = _PAIRED_COLUMNS[:4] + act + _PAIRED_COLUMNS[4:]
    lines = [
        "| " + " | ".join(columns + [title for title, _, _ in _PAIRED_STATS]) + " |",
        "|" + "|".join(" :---: " for _ in range(len(columns) + len(_PAIRED_STATS))) + "|",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["model", "dataset", "forward", "bits"] + (["act_bits"] if activations else [])
    header += ["optimizer", "backward", "against", "trials"]
    writer.writerow(header + [f"d_{name}_{part}" for _, name, _ in _PAIRED_STATS for part in ("mean", "per_trial")])
    for r in rows:
        act_bits = [_FLOAT_ACT_BITS if r.act_bits is None else r.act_bits] if activations else []
        key = [r.model, r.dataset, r.forward, r.bits, *act_bits, r.optimizer, r.backward, r.baseline]
        key.append(" ".join(map(str, r.trials)))
        values = [getattr(r, attr) for _, _, attr in _PAIRED_STATS]
        cells = [
            "-" if v is None else f"{statistics.fmean(v):+.3f} ({', '.join(f'{d:+.2f}' for d in v)})" for v in values
        ]
        lines.append("| " + " | ".join([*map(str, key)] + cells) + " |")
        csv_values = [
            x
            for v in values
            for x in (("", "") if v is None else (f"{statistics.fmean(v):.4f}", " ".join(f"{d:.4f}" for d in v)))
        ]
        writer.writerow(key + csv_values)
    md = out / f"{stem}.md"
    markdown = "\n".join(lines) + "\n\n" + _PAIRED_NOTE + (_ACT_NOTE if activations else "") + "\n"
    csv_path = out / f"{stem}.csv"
    atomic_write_files({md: markdown.encode(), csv_path: buffer.getvalue().encode()})
    return [md, csv_path]
