"""What a MetaQuant run keeps for pictures of what its meta quantizer learned, and the pictures.

During a run with a run directory, ``MetaTrace.snapshot`` is called before the first epoch and after chosen
epochs (1, 2, 5, 10, 20, 50, ... and the last). Each snapshot holds the meta quantizer's parameters, for
LSTMFC the LSTM state of a fixed sample of weight coordinates of the first quantized layer (with their
``W̃``), and a histogram of every quantized layer's latent weights ``W``. They go to ``trace.pt`` in the run
directory (a few hundred kilobytes at most).

``plot_trace(run_dir, out)`` draws from it:

* ``learned-function.png``: MultiFC's multiplier of ``g_Ŵ`` as a function of ``W̃``, FC-Grad's output as a
  function of its input gradient, or LSTMFC's multiplier of the sampled coordinates over the epochs, at the
  snapshot epochs, next to STE's (a multiplier of 1);
* ``weights.png``: the distribution of each quantized layer's latent weights at the first and the last
  snapshot, and below it the change in every bin, with the share of the weights that changed bin.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .layers import quantized_layers
from .meta import LSTMFC, FCGrad, MetaQuantizer, MultiFC
from .runs import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["MetaTrace", "snapshot_epochs", "plot_trace", "TRACE_FILE"]

TRACE_FILE = "trace.pt"
SAMPLE = 8  # LSTMFC coordinates followed
BINS = 60


def snapshot_epochs(epochs: int) -> set[int]:
    """Epoch counts after which a snapshot is taken: 0, 1, 2, 5, 10, 20, 50, ... and ``epochs``.

    Args:
        epochs: the run's number of epochs.

    Returns:
        The epoch counts, 0 (before training) and ``epochs`` included.

    Example:
        >>> from metaquant.trace import snapshot_epochs
        >>> sorted(snapshot_epochs(100)), sorted(snapshot_epochs(7))
        ([0, 1, 2, 5, 10, 20, 50, 100], [0, 1, 2, 5, 7])
    """
    marks, base = {0, epochs}, 1
    while base <= epochs:
        marks |= {m for m in (base, 2 * base, 5 * base) if m <= epochs}
        base *= 10
    return marks


class MetaTrace:
    """Collects snapshots of a MetaQuant run (see the module docstring) and writes them to ``path``.

    ``pipeline.execute`` makes one for every MetaQuant run with a run directory and calls ``snapshot`` after
    each epoch. An existing file at ``path`` is loaded, so a resumed run continues its trace.

    Args:
        path: the trace file (``<run dir>/trace.pt``); rewritten atomically at every snapshot.
        epochs: the run's number of epochs (which ones are snapshot epochs: ``snapshot_epochs``).

    An existing file that cannot be read (damaged, empty, truncated) is moved to ``trace.damaged.pt`` with a
    warning and a new trace begins: the trace illustrates a run and must not stop it from resuming.

    Example:
        >>> import pathlib
        >>> from metaquant.trace import MetaTrace
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        >>> trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=8))
        >>> trace = MetaTrace(pathlib.Path("trace.pt"), epochs=4)  # snapshots after epochs 0, 1, 2 and 4
        >>> for epoch in range(5):
        ...     trace.snapshot(epoch, trainer, model)  # epoch 3 is not a snapshot epoch
        >>> data = torch.load("trace.pt")
        >>> sorted(data["snapshots"]), [int(h.sum()) for h in data["snapshots"][4]["weights"].values()]
        ([0, 1, 2, 4], [24, 8])
    """

    def __init__(self, path: Path, epochs: int) -> None:
        self.path = Path(path)
        self.epochs = epochs
        self.data: dict[str, Any] = {"snapshots": {}, "bins": {}}
        if self.path.exists():  # a resumed run continues its trace
            try:
                data = torch.load(self.path, map_location="cpu", weights_only=True)
                if not (isinstance(data, dict) and {"snapshots", "bins"} <= set(data)):
                    raise ValueError("not a trace: no snapshots and bins")
                self.data = data
            except Exception as err:  # torch raises several types for a damaged file
                # The trace only illustrates the run: keep the damaged file for inspection, start a new one,
                # and let the training itself resume.
                aside = self.path.with_name(self.path.stem + ".damaged" + self.path.suffix)
                os.replace(self.path, aside)
                logger.warning(
                    "%s is not a readable trace (%s: %s); moved to %s, starting a new trace",
                    self.path,
                    type(err).__name__,
                    err,
                    aside.name,
                )

    def snapshot(self, epoch: int, trainer: Any, model: nn.Module) -> None:
        """Record the state after ``epoch`` epochs (0: before training) if it is a snapshot epoch.

        Args:
            epoch: epochs done.
            trainer: the run's ``MetaQuant`` (its meta quantizer and, for LSTMFC, its recorded states).
            model: the quantized model, unwrapped from DDP.
        """
        if epoch not in snapshot_epochs(self.epochs) or epoch in self.data["snapshots"]:
            return
        layers = quantized_layers(model)
        histograms = {}
        for name, layer in layers.items():
            w = layer.weight.detach().float().cpu()
            if name not in self.data["bins"]:
                edge = float(w.abs().max()) or 1.0
                self.data["bins"][name] = torch.linspace(-edge, edge, BINS + 1)
            histograms[name] = torch.from_numpy(
                np.histogram(w.numpy().ravel(), bins=self.data["bins"][name].numpy())[0]
            )
        # On the CPU, so that a trace written on a GPU reads (and a run resumes) on a machine without one.
        meta_state = {k: v.detach().cpu().clone() for k, v in trainer.meta.state_dict().items()}
        entry: dict[str, Any] = {"meta": meta_state, "weights": histograms}
        if isinstance(trainer.meta, LSTMFC):
            first = next(iter(layers))
            record = trainer.state_dict()["records"][first]
            if record["w_tilde"] is not None and record["meta_state"] is not None:
                h, c = record["meta_state"]
                entry["lstm_sample"] = {
                    "w_tilde": record["w_tilde"].reshape(-1)[:SAMPLE].cpu().clone(),
                    "h": h[:, :SAMPLE].cpu().clone(),
                    "c": c[:, :SAMPLE].cpu().clone(),
                }
        self.data["snapshots"][epoch] = entry
        buffer = io.BytesIO()
        torch.save(self.data, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())


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
    """Draw ``learned-function.png`` and ``weights.png`` for a MetaQuant run directory.

    The figures are described in the module docstring. Needs matplotlib (the ``plot`` extra).

    Args:
        run_dir: a MetaQuant run directory with ``trace.pt`` and ``config.json``.
        out: where to write the figures (created if needed; default: ``run_dir``).

    Returns:
        The paths of ``learned-function.png`` and ``weights.png``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or is not a directory; the run has no trace (not a
            MetaQuant run, or made before traces existed), or no ``config.json``.
        ValueError: ``trace.pt`` is damaged or holds no snapshot; ``config.json`` is malformed.
        ImportError: matplotlib is not installed (the message names the extra).

    Example:
        Drawing takes about a second (matplotlib; drawn on ``Figure`` objects, without ``pyplot``, so nothing
        global changes). For MultiFC, ``learned-function.png`` shows at each snapshot
        the multiplier of ``g_Ŵ`` as a function of ``W̃`` (DoReFa: ``W̃`` in [0, 1]), next to STE's 1:

        >>> meta, w_tilde = mq.MultiFC(hidden=8), torch.linspace(0, 1, 5)
        >>> multiplier, _ = meta(torch.ones(5), w_tilde)  # g_W̃ / g_Ŵ, the curve drawn
        >>> multiplier.shape, torch.allclose(meta(torch.full((5,), 3.0), w_tilde)[0], 3 * multiplier)
        (torch.Size([5]), True)
    """
    from .config import RunConfig
    from .pipeline import build_meta
    from .report import figure_class

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
        lo, hi = (0.0, 1.0) if config.quantizer == "dorefa" else (-1.0, 1.0)
        grid = torch.linspace(lo, hi, 200)
        for (epoch, snap), color in zip(snapshots.items(), colors):
            meta.load_state_dict(snap["meta"])
            ax.plot(grid, _multiplier(meta, grid), color=color, label=f"epoch {epoch}")
        ax.set_xlabel("W̃ = A(W)")
        ax.set_ylabel("multiplier of g_Ŵ  (g_W̃ = g_Ŵ · FCs(W̃))")
    elif isinstance(meta, FCGrad):
        for (epoch, snap), color in zip(snapshots.items(), colors):
            meta.load_state_dict(snap["meta"])
            grid, curve = _fc_grad_curve(meta)
            ax.plot(grid, curve, color=color, label=f"epoch {epoch}")
        ax.set_xlabel("g_Ŵ (scaled to [-1, 1])")
        ax.set_ylabel("g_W̃ = FCs(g_Ŵ) (same scale)")
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
