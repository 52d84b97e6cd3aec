"""Precise BatchNorm statistics: the running means and variances recomputed for the weights as they are now.

BatchNorm's running statistics are an exponential average (``momentum`` 0.1: the last 20 or so batches)
gathered while the weights moved. With 1-bit weights a step flips signs and the activations' statistics jump,
so the average lags behind the network: a binary ResNet20 on Fashion-MNIST can test a point lower with it.
"Precise BN" (Wu & Johnson 2021, *Rethinking "Batch" in BatchNorm*, §3) recomputes the population mean
``E[x]`` and variance ``E[x²] − E[x]²`` of each layer's input over training batches with the weights fixed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from .distributed import all_reduce_sum, unwrap
from .validation import check_int

__all__ = [
    "StatsSource",
    "batchnorm_layers",
    "batches_to_read",
    "recompute_batchnorm_stats",
    "recompute_batchnorm_stats_counted",
]

logger = logging.getLogger(__name__)

_CHUNK_VALUES = 1 << 24  # values per float64 copy in the statistics' sums: 128 MB


def batches_to_read(batches: Iterable[Any], num_batches: int, told: set[int], name: str = "num_batches") -> int:
    """``num_batches``, or fewer where ``batches`` is known to hold fewer (its ``len``; not for a ``DataLoader``
    of an iterable dataset), saying so once per length: ``told`` holds the lengths already told (the caller keeps it
    from one pass to the next, so that a loader read after every epoch is not reported every epoch).
    """
    length = _known_length(batches)
    if length is None or length >= num_batches:
        return num_batches
    if length not in told:
        told.add(length)
        logger.warning(
            "%s is %d but only %d batches are available; the statistics are recomputed from those",
            name,
            num_batches,
            length,
        )
    return max(length, 1)  # an empty loader is refused by the recomputation, with its own message


def _known_length(batches: Iterable[Any]) -> int | None:
    """How many batches ``batches`` yields, where that is known before reading them: its ``len``, except for a
    ``DataLoader`` of an iterable dataset, whose length need not be what its workers yield."""
    if isinstance(batches, DataLoader) and isinstance(batches.dataset, IterableDataset):
        return None
    return len(batches) if isinstance(batches, Sized) else None


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` (any dimension, ``SyncBatchNorm`` included) that keep running statistics."""
    return [
        m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recompute_batchnorm_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_batches: int) -> int:
    """Replace the running statistics of ``model``'s BatchNorm layers by those of its first ``num_batches`` batches.

    Over the ``n`` values per channel of a layer's input in all batches (``B·H·W`` per batch):
    ``running_mean = Σx / n``, ``running_var = (Σx² / n − mean²) · n / (n − 1)`` (unbiased, as PyTorch's), summed in
    float64 and over all processes under data parallelism (each passes the same number of its own batches). The
    model runs as in evaluation except that each BatchNorm normalises with its batch's statistics; parameters,
    ``momentum``, ``num_batches_tracked`` and train/eval modes are left as they were. A BatchNorm in eval mode
    inside a model in training mode is taken as frozen and keeps its statistics. Iterating a ``DataLoader`` draws
    from the global generators (``fit`` saves and restores them around the pass).

    Returns the number of examples used (all processes); 0, reading nothing, without BatchNorm statistics. When
    ``batches`` holds fewer than ``num_batches`` batches, all are used and a warning is logged
    (``recompute_batchnorm_stats_counted`` returns the number of batches too).

    Raises:
        ValueError: ``num_batches`` is not an integer >= 1; ``batches`` yielded nothing.

    Example:
        The running statistics become the mean and unbiased variance of all the layer's inputs:

        >>> bn = torch.nn.BatchNorm1d(3)
        >>> data = [(torch.randn(8, 3) * 2 + 5, torch.zeros(8)) for _ in range(4)]
        >>> mq.recompute_batchnorm_stats(bn, data, num_batches=3)
        24
        >>> x = torch.cat([x for x, _ in data[:3]])
        >>> torch.allclose(bn.running_mean, x.mean(0)), torch.allclose(bn.running_var, x.var(0))
        (True, True)
    """
    return recompute_batchnorm_stats_counted(model, batches, num_batches).examples


class StatsSource(NamedTuple):
    """What the statistics were recomputed from: this process's batches and the examples of all processes."""

    batches: int
    examples: int


def recompute_batchnorm_stats_counted(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_batches: int
) -> StatsSource:
    """``recompute_batchnorm_stats``, returning the number of batches it read (at most ``num_batches``) as well as
    the number of examples.

    Raises:
        ValueError: as ``recompute_batchnorm_stats``.
    """
    num_batches = check_int("num_batches", num_batches, minimum=1)
    net = unwrap(model)
    # a layer left in eval mode inside a model in training mode is frozen (fine-tuning): it keeps its statistics
    layers = [bn for bn in batchnorm_layers(net) if bn.training or not net.training]
    if not layers:
        return StatsSource(0, 0)
    moments = [_Moments() for _ in layers]
    was_training = {m: m.training for m in net.modules()}
    saved = [(bn.momentum, _buffer(bn, "num_batches_tracked").clone()) for bn in layers]
    hooks = [bn.register_forward_pre_hook(layer_moments.hook) for bn, layer_moments in zip(layers, moments)]
    examples = read = 0
    try:
        net.eval()
        for bn in layers:
            bn.train()
            bn.momentum = 0.0  # batch statistics for the forward pass; the running ones are set below
        with torch.no_grad():
            for x, _ in itertools.islice(batches, num_batches):
                net(x)
                examples += x.shape[0]
                read += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in was_training.items():
            module.train(training)
        for bn, (momentum, tracked) in zip(layers, saved):
            bn.momentum = momentum
            _buffer(bn, "num_batches_tracked").copy_(tracked)
    # data-parallel: every process saw its own batches; the totals are over all of them
    flat = [float(examples)]
    for bn, layer_moments in zip(layers, moments):
        flat += layer_moments.flat(bn.num_features)
    totals = all_reduce_sum(flat)
    examples = int(totals[0])
    if examples == 0:
        raise ValueError("recompute_batchnorm_stats: the batches yielded no examples")
    at = 1
    for bn in layers:
        c = bn.num_features
        sum_x = torch.tensor(totals[at : at + c], dtype=torch.float64)
        sum_xx = torch.tensor(totals[at + c : at + 2 * c], dtype=torch.float64)
        n = totals[at + 2 * c]
        at += 2 * c + 1
        if n == 0:  # a layer that the forward pass did not reach keeps its statistics
            continue
        mean = sum_x / n
        var = (sum_xx / n - mean * mean).clamp_min(0.0) * (n / max(n - 1.0, 1.0))
        running_mean, running_var = _buffer(bn, "running_mean"), _buffer(bn, "running_var")
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))
    if read < num_batches:
        logger.warning(
            "recompute_batchnorm_stats: num_batches is %d but only %d batches were available; the statistics "
            "are recomputed from those",
            num_batches,
            read,
        )
    logger.debug("recomputed the statistics of %d BatchNorm layers from %d examples", len(layers), examples)
    return StatsSource(read, examples)


def _buffer(bn: nn.Module, name: str) -> Tensor:
    buffer = getattr(bn, name)
    assert isinstance(buffer, Tensor)  # a layer with running statistics has all three buffers
    return buffer


@dataclass
class _Moments:
    """Running sums of one layer's input per channel: ``Σx`` and ``Σx²`` (float64, ``[C]``) over ``count`` values."""

    sum_x: Tensor | None = None
    sum_xx: Tensor | None = None
    count: int = 0

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]  # every dimension but the channels'
        # float64 copies of a few samples at a time: a whole batch's (an ImageNet stem's: GBs) is not needed
        for part in x.split(max(1, _CHUNK_VALUES // max(1, x[0].numel()))):
            part = part.double()
            s, ss = part.sum(dims), (part * part).sum(dims)
            self.sum_x = s if self.sum_x is None else self.sum_x + s
            self.sum_xx = ss if self.sum_xx is None else self.sum_xx + ss
        self.count += x.numel() // x.shape[1]

    def flat(self, channels: int) -> list[float]:
        """``Σx``, ``Σx²`` and the count as one list of ``2·C + 1`` numbers (zeros when nothing was seen)."""
        if self.sum_x is None or self.sum_xx is None:
            return [0.0] * (2 * channels + 1)
        return [*self.sum_x.tolist(), *self.sum_xx.tolist(), float(self.count)]
