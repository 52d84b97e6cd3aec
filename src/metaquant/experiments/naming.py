"""How runs are named: their directory names, and how tables and figures name their backward method."""

from __future__ import annotations

import logging

from .config import RunConfig

__all__ = ["default_run_name", "backward_label"]

logger = logging.getLogger(__name__)


_DISPLAY = {
    "ste": "STE",
    "identity": "STE (unclipped)",
    "ewgs": "EWGS",
    "fc-grad": "FC-Grad",
    "multifc": "MultiFC",
    "lstmfc": "LSTMFC",
}


def backward_label(config: RunConfig) -> str:
    """How tables and figures name a run's backward method, e.g. ``MultiFC (original order)``.

    The estimator's display name, then `` (original order)`` for a meta quantizer run in the original code's
    order (docs/design.md §5.1), then `` + momentum m`` for SGD with momentum, then `` + distillation (λ, T)``
    for a run that distils from its ``init`` model.

    Args:
        config: the run's configuration.

    Returns:
        The label.

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.naming import backward_label
        >>> backward_label(RunConfig(estimator="multifc", step_order="original"))
        'MultiFC (original order)'
        >>> backward_label(RunConfig(estimator="ste", momentum=0.9)), backward_label(RunConfig(estimator="identity"))
        ('STE + momentum 0.9', 'STE (unclipped)')
        >>> backward_label(RunConfig(estimator="ste", distill_weight=0.9, distill_temperature=4.0))
        'STE + distillation (0.9, T 4)'
        >>> backward_label(RunConfig(estimator="multifc", precise_bn_batches=100, ema_decay=0.999))
        'MultiFC + precise BN + EMA 0.999'
    """
    label = _DISPLAY.get(config.estimator, config.estimator)
    if config.uses_meta and config.meta_init_scheme == "ste":
        label += " (STE start)"
    if config.lr_gain_from is not None:
        label += " (FC-Grad's gain)"
    if config.uses_meta and config.step_order == "original":
        label += " (original order)"
    if config.optimizer == "sgd" and config.momentum > 0:
        label += f" + momentum {config.momentum:g}"
    if config.distill_weight > 0:
        label += f" + distillation ({config.distill_weight:g}, T {config.distill_temperature:g})"
    if config.precise_bn_batches > 0:
        label += " + precise BN"
    if config.ema_decay > 0:
        label += f" + EMA {config.ema_decay:g}"
    return label


def default_run_name(config: RunConfig) -> str:
    """A readable directory name for a run: task, model, dataset, then the options that tell runs apart.

    ``pretrain`` runs are named by optimizer and seed; ``quantize`` runs also by quantizer, bit width,
    estimator and (for meta quantizers run in the original code's order) ``-original-order``.

    Args:
        config: the run's configuration.

    Returns:
        The name (no directory part).

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.naming import default_run_name
        >>> default_run_name(RunConfig(model="resnet20", dataset="cifar10", estimator="multifc", seed=2))
        'quantize-resnet20-cifar10-dorefa1-multifc-sgd-seed2'
        >>> default_run_name(RunConfig(task="pretrain", dataset="cifar10", optimizer="adam"))
        'pretrain-resnet20-cifar10-adam-seed0'
    """
    base = f"{config.task}-{config.model}-{config.dataset}"
    if config.task == "pretrain":
        return f"{base}-{config.optimizer}-seed{config.seed}"
    order = "-original-order" if config.uses_meta and config.step_order == "original" else ""
    start = "-ste-start" if config.uses_meta and config.meta_init_scheme == "ste" else ""
    return (
        f"{base}-{config.quantizer}{config.bits}-{config.estimator}{start}{order}-{config.optimizer}-seed{config.seed}"
    )
