"""Every figure of the application, drawn with matplotlib (the ``plot`` extra, imported here only).

* ``plot_trace(run_dir, out)``: from a MetaQuant run's ``trace.pt``, ``learned-function.png`` (the meta
  quantizer's learned function at the snapshot epochs next to STE's: MultiFC's multiplier of ``g_Ŵ`` against
  ``W̃``, FC-Grad's output against its input gradient, LSTMFC's multiplier of sampled coordinates over the
  epochs) and ``weights.png`` (each quantized layer's latent weights at the first and last snapshot, and the
  change in every bin);
* ``plot_comparisons(trials, out)``: the report's figures (test accuracy and training loss per epoch and
  backward method, one figure per model, data set, forward quantizer and optimizer).

The figures are drawn on ``Figure`` objects, not through ``pyplot``: nothing global changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..meta import FCGrad, MetaQuantizer, MultiFC
from .builders import build_meta
from .config import RunConfig
from .report import ORIGINAL, OURS, TrialCurves, _slug
from .trace import TRACE_FILE

__all__ = ["plot_trace", "plot_comparisons", "figure_class", "PLOT_EXTRA"]

logger = logging.getLogger(__name__)


PLOT_EXTRA = "pip install matplotlib"


_ORIGINAL_ORDER = " (original order)"


# One colour per backward method, the same in every figure; the step order and the source are line styles.
_METHOD_ORDER = ["STE", "STE + momentum", "STE (unclipped)", "EWGS", "FC-Grad", "MultiFC", "LSTMFC"]


def figure_class() -> type:
    """``matplotlib.figure.Figure``, or an ImportError that names the extra to install.

    Drawing on ``Figure`` objects rather than through ``pyplot`` selects no backend and registers no figure, so it
    works the same in a script, on a server without a display and in a notebook.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"drawing figures needs matplotlib (the plot extra): {PLOT_EXTRA}") from None
    return Figure


_MARKERS = "osD^vPX*h"


def _line_style(label: str) -> dict[str, Any]:
    """Colour and marker by backward method; a solid line and hollow markers for this library's paper order,
    dashed with small filled markers for the original code's order, dash-dotted for runs of the original code:
    curves that coincide (a method in both orders, two methods that train alike) stay visible."""
    key = _method(label)
    # methods outside the list share the remaining colours C7 to C9, each always the same one
    index = _METHOD_ORDER.index(key) if key in _METHOD_ORDER else len(_METHOD_ORDER) + sum(map(ord, key)) % 3
    style: dict[str, Any] = {"color": f"C{index % 10}", "marker": _MARKERS[index % len(_MARKERS)], "linewidth": 1.6}
    if label.removesuffix(f" [{ORIGINAL}]").endswith(_ORIGINAL_ORDER):
        style.update(linestyle=(0, (4, 2)), markersize=3)
    elif label.endswith(f" [{ORIGINAL}]"):
        style.update(linestyle="-.", markersize=4, markerfacecolor="none")
    else:
        style.update(linestyle="-", markersize=6.5, markerfacecolor="none")
    return style


def _distinct_styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``_line_style`` of each of a figure's lines, except that a line whose colour, marker and line style an
    earlier line already has (two labels of one method: STE and the equivalent STE) takes the next free colour
    and marker, starting with the colours no known method uses."""
    styles: dict[str, dict[str, Any]] = {}
    taken: set[tuple[str, str, str]] = set()
    spare = [(f"C{c}", m) for m in _MARKERS for c in (7, 8, 9, *range(7))]
    for label in labels:
        style = _line_style(label)
        while (style["color"], style["marker"], repr(style["linestyle"])) in taken and spare:
            style["color"], style["marker"] = spare.pop(0)
        taken.add((style["color"], style["marker"], repr(style["linestyle"])))
        styles[label] = style
    return styles


def plot_comparisons(trials: Iterable[TrialCurves], out: Path) -> list[Path]:
    """One figure per (model, dataset, forward, optimizer), as PNG and PDF: training loss (log scale) and test
    accuracy per epoch, one line per backward method (mean over trials) in a min-max band; the paths written.

    Each method has its own colour in every figure; the original code's step order is dashed, runs of the
    original code dash-dotted, so a curve lying on its twin stays visible; two lines of one method get different
    colours or markers. A dotted line marks the full-precision accuracy when known; a run that continues another
    is drawn after its epochs; the legend (with each line's number of trials) sits outside the panels. Files are
    named ``<model>-<dataset>-<forward><bits>-<optimizer>.png`` in lower case.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra).
    """
    Figure = figure_class()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple[str, str, str, int, str], dict[str, list[TrialCurves]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        line = t.backward if t.source == OURS else f"{t.backward} [{t.source}]"
        figures[(t.model, t.dataset, t.forward, t.bits, t.optimizer)][line].append(t)
    written = []
    for (model, dataset, forward, bits, optimizer), lines in sorted(figures.items()):
        fig = Figure(figsize=(13, 4.8), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        handles, labels = [], []
        all_positive = True
        ordered = sorted(lines.items(), key=lambda item: _legend_order(item[0]))
        styles = _distinct_styles([label for label, _ in ordered])
        for label, members in ordered:
            style = styles[label]
            starts = sorted({t.first_epoch for t in members})  # a fine-tuning run is drawn after the run it continues
            if len(starts) > 1:  # e.g. one trial's source run is not there: its chain could not be followed
                logger.warning(
                    "%s: its trials continue runs of %s epochs; drawn from epoch %d", label, starts, starts[0] + 1
                )
            first = starts[0]
            for ax, attr in ((loss_ax, "train_loss"), (acc_ax, "test_acc")):
                n = min(len(getattr(t, attr)) for t in members)
                values = np.array([getattr(t, attr)[:n] for t in members], dtype=np.float64)
                if n == 0 or np.all(np.isnan(values)):
                    continue  # e.g. an original-code run without loss.txt
                epochs = np.arange(first + 1, first + n + 1)
                (handle,) = ax.plot(epochs, np.nanmean(values, axis=0), markevery=max(1, n // 15), **style)
                ax.fill_between(
                    epochs,
                    np.nanmin(values, axis=0),
                    np.nanmax(values, axis=0),
                    color=style["color"],
                    alpha=0.12,
                    linewidth=0,
                )
                if attr == "train_loss":
                    all_positive &= bool(np.nanmin(values) > 0)
                else:
                    handles.append(handle)
                    labels.append(f"{label} ({len(members)})")
        fps = [t.fp_acc for members in lines.values() for t in members if t.fp_acc is not None]
        if fps:
            fp = float(np.mean(fps))
            handles.append(acc_ax.axhline(fp, color="black", linestyle=":", linewidth=1.2))
            labels.append(f"full precision ({fp:.1f}%)")
        if all_positive:
            loss_ax.set_yscale("log")  # losses of very different sizes stay readable side by side
            # plain numbers (0.3, 2, not 3e-01); minor ticks labelled where the axis spans a decade or less
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            low, high = loss_ax.get_ylim()
            loss_ax.yaxis.set_major_formatter(plain)
            loss_ax.yaxis.set_minor_formatter(plain if np.log10(high / low) <= 1.2 else NullFormatter())
        loss_ax.set_ylabel("training loss (mean over the epoch" + (", log scale)" if all_positive else ")"))
        acc_ax.set_ylabel("test accuracy (%)")
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3, which="both")
        fig.legend(
            handles,
            labels,
            loc="outside right center",
            title="backward (trials)",
            fontsize=8,
            title_fontsize=9,
            frameon=False,
        )
        fig.suptitle(
            f"{model} on {dataset}, {bits}-bit {forward} forward, {optimizer}: mean over trials, band = min..max"
        )
        stem = out / f"{_slug(model)}-{_slug(dataset)}-{_slug(forward)}{bits}-{_slug(optimizer)}"
        for suffix, options in ((".png", {"dpi": 110}), (".pdf", {})):
            fig.savefig(stem.with_suffix(suffix), **options)
            written.append(stem.with_suffix(suffix))
    return written


def _method(label: str) -> str:
    """The backward method of a line's label: ``"STE + momentum 0.9 (original order)"`` → ``"STE + momentum"``."""
    method = label.removesuffix(f" [{ORIGINAL}]").removesuffix(_ORIGINAL_ORDER)
    # the longest known name that the label starts with: "STE + momentum 0.9" is not "STE"
    for known in sorted(_METHOD_ORDER, key=len, reverse=True):
        if method == known or method.startswith(known + " "):
            return known
    return method


def _legend_order(label: str) -> tuple[int, str]:
    key = _method(label)
    return (_METHOD_ORDER.index(key) if key in _METHOD_ORDER else len(_METHOD_ORDER), label)


def _fc_grad_curve(meta: FCGrad, half_width: float = 1e-2, points: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """FC-Grad's ``g_W̃`` over gradient-sized inputs ``g_Ŵ ∈ [−half_width, half_width]``, both divided by
    ``half_width`` so that the curve is drawn on ``[−1, 1]`` beside STE's identity."""
    grid = torch.linspace(-half_width, half_width, points)
    with torch.no_grad():
        return grid / half_width, meta(grid, grid)[0] / half_width


def _multiplier(meta: MetaQuantizer, w_tilde: torch.Tensor, state: Any = None) -> torch.Tensor:
    """``g_W̃ / g_Ŵ`` of a multiplicative meta quantizer at ``w_tilde``."""
    with torch.no_grad():
        out, _ = meta(torch.ones_like(w_tilde), w_tilde, state)
    return out


def plot_trace(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw ``learned-function.png`` and ``weights.png`` (see the module docstring) for a MetaQuant run directory
    into ``out`` (default: ``run_dir``); their paths.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory, or has no trace (not a MetaQuant run) or no
            ``config.json``.
        ValueError: ``trace.pt`` is damaged or holds no snapshot; ``config.json`` is malformed.
        ImportError: matplotlib is not installed (the message names the extra).
    """
    Figure = figure_class()  # first: without matplotlib, the error names the extra to install
    from matplotlib import colormaps

    run_dir = Path(run_dir)
    trace_path = run_dir / TRACE_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} " + ("is not a directory" if run_dir.exists() else "does not exist"))
    if not trace_path.exists():
        raise FileNotFoundError(
            f"{run_dir} has no {TRACE_FILE}: only MetaQuant runs record what they learn, from their first epoch on"
        )
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = torch.load(trace_path, map_location="cpu", weights_only=True)
        if not (
            isinstance(data, dict)
            and isinstance(data.get("snapshots"), dict)
            and data["snapshots"]
            and isinstance(data.get("bins"), dict)
        ):
            raise ValueError("no snapshots")
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(
            f"{trace_path} is not a readable trace ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]})"
        ) from None
    config = RunConfig.load(run_dir / "config.json")
    meta = build_meta(config)
    snapshots = dict(sorted(data["snapshots"].items()))
    colors = colormaps["viridis"](np.linspace(0, 1, len(snapshots)))
    written = []

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    if isinstance(meta, MultiFC):
        # the range of W̃: DoReFa's A maps into [0, 1]; the identity pre-processing keeps the weights' range
        lo, hi = (0.0, 1.0) if config.quantizer in ("dorefa", "dorefa-channel") else (-1.0, 1.0)
        grid = torch.linspace(lo, hi, 200)
        for (epoch, snap), color in zip(snapshots.items(), colors):
            meta.load_state_dict(snap["meta"])
            ax.plot(grid, _multiplier(meta, grid), color=color, label=f"epoch {epoch}")
        ax.set_xlabel("W̃ = A(W)")
        form = "1 + FCs(W̃)" if meta.init_scheme == "ste" else "FCs(W̃)"
        ax.set_ylabel(f"multiplier of g_Ŵ  (g_W̃ = g_Ŵ · ({form}))")
    elif isinstance(meta, FCGrad):
        for (epoch, snap), color in zip(snapshots.items(), colors):
            meta.load_state_dict(snap["meta"])
            grid, curve = _fc_grad_curve(meta)
            ax.plot(grid, curve, color=color, label=f"epoch {epoch}")
        ax.set_xlabel("g_Ŵ (scaled to [-1, 1])")
        form = "g_Ŵ + FCs(g_Ŵ)" if meta.init_scheme == "ste" else "FCs(g_Ŵ)"
        ax.set_ylabel(f"g_W̃ = {form} (same scale)")
    else:
        epochs, values = [], []
        for epoch, snap in snapshots.items():
            sample = snap.get("lstm_sample")
            if sample is None:
                continue
            meta.load_state_dict(snap["meta"])
            state = (sample["h"], sample["c"])
            epochs.append(epoch)
            values.append(_multiplier(meta, sample["w_tilde"], state).numpy())
        if values:
            stacked = np.stack(values)
            for i in range(stacked.shape[1]):
                ax.plot(epochs, stacked[:, i], marker="o", label=f"coordinate {i}" if i < 4 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("multiplier of g_Ŵ for sampled coordinates")
    if isinstance(meta, FCGrad):
        ax.plot(grid, grid, color="black", linestyle="--", label="STE (identity)")
    else:
        ax.axhline(1.0, color="black", linestyle="--", label="STE (multiplier 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"What {type(meta).__name__} learned ({config.quantizer} {config.bits}-bit, {config.optimizer})")
    written.append(out / "learned-function.png")
    fig.savefig(written[-1], dpi=110)

    written.append(out / "weights.png")
    _plot_weights(Figure, data, snapshots, written[-1])
    return written


def _plot_weights(Figure: type, data: dict[str, Any], snapshots: dict[int, Any], path: Path) -> None:
    """Each quantized layer's latent-weight histogram at the first and the last snapshot, and below it their
    difference, which shows how the weights moved even where the two histograms look alike."""
    first, last = min(snapshots), max(snapshots)
    names = list(data["bins"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    for i, name in enumerate(names):
        row, col = divmod(i, cols)
        top, bottom = fig.add_subfigure(grid[row, col]).subplots(2, 1, sharex=True, height_ratios=[2, 1])
        edges = data["bins"][name].numpy()
        centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        start = snapshots[first]["weights"][name].numpy().astype(np.float64)
        end = snapshots[last]["weights"][name].numpy().astype(np.float64)
        top.fill_between(centers, start, step="mid", color="0.75", label=f"epoch {first}")
        top.step(centers, end, where="mid", color="C0", linewidth=1.2, label=f"epoch {last}")
        change = end - start
        bottom.bar(centers, change, width=width, color=np.where(change >= 0, "C2", "C3"))
        bottom.axhline(0, color="black", linewidth=0.6)
        # at least this share of the weights left their bin: every weight that moved bins adds 1 to |change| twice
        moved = np.abs(change).sum() / 2 / max(start.sum(), 1)
        top.set_title(f"{name}: {moved:.1%} changed bin", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("weights per bin", fontsize=8)
            bottom.set_ylabel(f"change\n(epoch {last} − {first})", fontsize=7)
        if row == rows - 1 or i + cols >= len(names):
            bottom.set_xlabel("latent weight W", fontsize=8)
        if i == 0:
            top.legend(fontsize=7)
    fig.suptitle(
        f"Latent weights W per quantized layer, epoch {first} (grey) and {last} (line); below, the "
        "change in each bin (green: more weights, red: fewer)"
    )
    fig.savefig(path, dpi=100)
