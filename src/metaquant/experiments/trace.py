"""What a MetaQuant run keeps for pictures of what its meta quantizer learned (``plots.plot_trace`` draws them).

``MetaTrace`` snapshots a run with a run directory before the first epoch and after epochs 1, 2, 5, 10, 20,
50, ... and the last: the meta quantizer's parameters, for LSTMFC the LSTM state of a fixed sample of weight
coordinates of the first quantized layer (with their ``W̃``), and a histogram of every quantized layer's
latent weights ``W``, in ``trace.pt`` in the run directory (a few hundred kilobytes at most). Given a ``gain``
(FC-Grad without a non-linearity), it also records ``Σ_t α_t·k_t`` and ``Σ_t α_t`` over the steps that moved
the weights (``gain``: the equivalent STE's ``k̄``, docs/design.md §6.2), carried in the checkpoints so that a
resumed run's record is the uninterrupted run's.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import unwrap
from ..files import atomic_write_bytes
from ..layers import quantized_layers
from ..loop import Callback, FitLoop, StepResult
from ..meta import LSTMFC

logger = logging.getLogger(__name__)

__all__ = ["MetaTrace", "snapshot_epochs", "TRACE_FILE"]

TRACE_FILE = "trace.pt"
SAMPLE = 8  # LSTMFC coordinates followed
BINS = 60


def snapshot_epochs(epochs: int) -> set[int]:
    """Epoch counts after which a snapshot is taken: 0 (before training), 1, 2, 5, 10, 20, 50, ... and ``epochs``."""
    marks, base = {0, epochs}, 1
    while base <= epochs:
        marks |= {m for m in (base, 2 * base, 5 * base) if m <= epochs}
        base *= 10
    return marks


class MetaTrace(Callback):
    """The callback that collects a MetaQuant run's snapshots and rewrites ``path`` atomically at each.

    An existing trace at ``path`` is continued (a resumed run). One that cannot be read is moved to
    ``trace.damaged.pt`` with a warning and a new trace begins: the trace illustrates a run and must not stop it
    from resuming.
    """

    def __init__(self, path: Path, epochs: int, gain: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        self.path = Path(path)
        self.epochs = epochs
        self.gain = gain  # meta quantizer -> its gain k (a scalar tensor), or None: no record
        # Σ α_t·k_t, Σ α_t, steps; and the gain the next step uses (None before the first step, which moves no
        # quantized weight). Tensors, so that a step does not wait for the device.
        self.sums: list[Any] = [0.0, 0.0, 0]
        self.next_gain: torch.Tensor | None = None
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

    def on_fit_start(self, loop: FitLoop) -> None:
        if loop.state.epoch == 0 and loop.state.batch == 0:  # before training; a resumed run has it already
            self.snapshot(0, loop.trainer, unwrap(loop.model))

    def on_step_end(self, loop: FitLoop, step: StepResult) -> None:
        if self.gain is None or not step.updated:
            return
        if self.next_gain is not None:  # step t used the gain the meta quantizer had after step t − 1
            lr = loop.trainer.optimizer.param_groups[0]["lr"]
            self.sums = [self.sums[0] + lr * self.next_gain, self.sums[1] + lr, self.sums[2] + 1]
        trainer: Any = loop.trainer  # a MetaQuant: the loop knows it as a StepTrainer
        self.next_gain = self.gain(trainer.meta)

    def on_epoch_end(self, loop: FitLoop, record: dict[str, Any]) -> None:
        if self.gain is not None:
            lr_k, lr, steps = self.sums
            self.data["gain"] = {"lr_weighted_sum": float(lr_k), "lr_sum": float(lr), "steps": int(steps)}
        self.snapshot(loop.state.epoch, loop.trainer, unwrap(loop.model))

    def checkpoint_state(self) -> dict[str, Any]:
        if self.gain is None:
            return {}
        lr_k, lr, steps = self.sums
        next_gain = None if self.next_gain is None else float(self.next_gain)
        return {"trace_gain": {"sums": [float(lr_k), float(lr), int(steps)], "next_gain": next_gain}}

    def load_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("trace_gain")
        if self.gain is not None and saved is not None:
            self.sums = list(saved["sums"])
            self.next_gain = (
                None if saved["next_gain"] is None else torch.tensor(saved["next_gain"], dtype=torch.float64)
            )

    def snapshot(self, epoch: int, trainer: Any, model: nn.Module) -> None:
        """Record the state after ``epoch`` epochs (0: before training) if it is a snapshot epoch not yet taken;
        ``model`` is the quantized model unwrapped from DDP."""
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
