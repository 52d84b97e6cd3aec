"""An exponential moving average of the latent weights: the model a run delivers when it averages.

With 1-bit weights a step of the optimizer flips the signs of the latent weights that lie near zero, so the
network changes from step to step even at a small learning rate, and so does its test accuracy (by ±0.15 points
from epoch to epoch for a binary ResNet20 on Fashion-MNIST at a rate of 1e-5). An exponential moving average of
the latent weights,

    W̄_t = d · W̄_{t−1} + (1 − d) · W_t,        W̄_1 = W_1,

quantized as usual (``Ŵ = Q(W̄)``), decides each sign by a weighted mean of the latent weight over the recent
steps (the last ``1 / (1 − d)`` steps carry about 63% of the weight) instead of by the last step alone. The
average is PyTorch's ``torch.optim.swa_utils.AveragedModel`` with its EMA update (Polyak & Juditsky 1992;
Izmailov et al. 2018 for the averaged model). It averages the parameters only;
its BatchNorm statistics are the trained model's, copied at each update, and should be recomputed for the
averaged weights before it is evaluated (``metaquant.batchnorm.recompute_batchnorm_stats``, which ``fit`` does
with ``precise_bn_batches``).

A checkpoint of ``fit`` keeps the average's ``state_dict`` (``"module."``-prefixed weights and ``n_averaged``) as
``"averaged"``, beside the trained model's; ``metaquant.models.load_weights`` reads the average from it.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import unwrap
from .validation import is_number

__all__ = ["ema_model", "check_ema_decay"]


def check_ema_decay(decay: object, *, allow_zero: bool = False) -> float:
    """``decay`` as a float if it is a number in ``(0, 1)`` (or 0, with ``allow_zero``: no average); else a ValueError.

    Example:
        >>> mq.averaging.check_ema_decay(0.999)
        0.999
        >>> mq.averaging.check_ema_decay(1.0)
        Traceback (most recent call last):
        ...
        ValueError: ema_decay must be a number in (0, 1), e.g. 0.999 (an average over about 1,000 steps), got 1.0
    """
    low = "[0, 1)" if allow_zero else "(0, 1)"
    if not is_number(decay) or not ((0.0 <= decay < 1.0) if allow_zero else (0.0 < decay < 1.0)):
        raise ValueError(
            f"ema_decay must be a number in {low}, e.g. 0.999 (an average over about 1,000 steps), got {decay!r}"
        )
    return float(decay)


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters, to update with ``update_parameters(model)``.

    The average is a copy of ``model`` (unwrapped from DistributedDataParallel, on its device, in its memory
    format) whose parameters are set to ``model``'s at the first update and then follow ``W̄ ← d·W̄ + (1 − d)·W``;
    its buffers (BatchNorm statistics) are ``model``'s, copied at each update.

    Args:
        model: the model being trained (quantized or not).
        decay: ``d`` in ``(0, 1)``; the average spans about ``1 / (1 − d)`` steps.

    Raises:
        ValueError: ``decay`` not in ``(0, 1)``.

    Example:
        Two updates with ``d = 0.5``: the first copies, the second is halfway between:

        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> avg = mq.averaging.ema_model(net, 0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0); avg.update_parameters(net)
        ...     _ = net.weight.fill_(4.0); avg.update_parameters(net)
        >>> avg.module.weight.item(), int(avg.n_averaged)
        (3.0, 2)
    """
    decay = check_ema_decay(decay)
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
