"""An exponential moving average of the latent weights: the model a run delivers when it averages.

With 1-bit weights each step flips the signs of the latent weights near zero, so the network (and its test
accuracy) changes from step to step even at a small learning rate. The average

    W̄_t = d · W̄_{t−1} + (1 − d) · W_t,        W̄_1 = W_1,

quantized as usual (``Ŵ = Q(W̄)``), decides each sign over about the last ``1 / (1 − d)`` steps instead of the
last one. It is ``torch.optim.swa_utils.AveragedModel`` with the EMA update. It averages the parameters only:
its BatchNorm statistics, copied from the trained model, should be recomputed before evaluation
(``recompute_batchnorm_stats``; ``fit``'s ``precise_bn_batches``). A checkpoint of ``fit`` keeps its
``state_dict`` as ``"averaged"``; ``metaquant.models.load_weights`` reads it.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import unwrap
from .validation import is_number

__all__ = ["ema_model", "check_ema_decay"]


def check_ema_decay(decay: object, *, allow_zero: bool = False) -> float:
    """``decay`` as a float if it is a number in ``(0, 1)`` (or 0 with ``allow_zero``: no average), else ValueError."""
    low = "[0, 1)" if allow_zero else "(0, 1)"
    if not is_number(decay) or not ((0.0 <= decay < 1.0) if allow_zero else (0.0 < decay < 1.0)):
        raise ValueError(
            f"ema_decay must be a number in {low}, e.g. 0.999 (an average over about 1,000 steps), got {decay!r}"
        )
    return float(decay)


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters, to update with ``update_parameters(model)``.

    A copy of ``model`` (unwrapped from DDP, on its device and memory format) whose parameters become ``model``'s
    at the first update and then follow ``W̄ ← d·W̄ + (1 − d)·W``; its buffers are copied at each update.

    Raises:
        ValueError: ``decay`` not in ``(0, 1)``.

    Example:
        Two updates with ``d = 0.5``: the first copies, the second is halfway between:

        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> avg = mq.ema_model(net, 0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0); avg.update_parameters(net)
        ...     _ = net.weight.fill_(4.0); avg.update_parameters(net)
        >>> avg.module.weight.item(), int(avg.n_averaged)
        (3.0, 2)
    """
    decay = check_ema_decay(decay)
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
