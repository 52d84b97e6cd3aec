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

_ACT_DISPLAY = {"sign": "sign", "lsq": "LSQ", "pact": "PACT"}


def _activation_label(config: RunConfig) -> str:
    """``A1 sign (ApproxSign)``, ``A4 LSQ``, ``A2 PACT (first layer float)``: width, quantizer, and what differs
    from the defaults (the STE backward, an 8-bit first layer)."""
    notes = ["ApproxSign"] if config.act_backward == "approxsign" else []
    first = config.act_first_layer_bits
    if first != 8:
        notes.append(f"first layer {'float' if first is None else f'A{first}'}")
    name = config.act_quantizer or ""
    label = f"A{config.act_bits} {_ACT_DISPLAY.get(name, name)}"
    return label + (f" ({', '.join(notes)})" if notes else "")


def backward_label(config: RunConfig) -> str:
    """How tables and figures name a run's backward method, e.g. ``MultiFC (original order)``.

    The estimator's display name, then `` (STE start)``, `` (FC-Grad's gain)``, `` (original order)`` for a meta
    quantizer run in the original code's order (docs/design.md §5.1), `` + A4 LSQ`` or `` + A1 sign (ApproxSign)``
    for quantized activations, `` + momentum m`` for SGD with momentum, `` + distillation (λ, T)``, `` + precise BN``
    and `` + EMA d`` where they apply.
    """
    label = _DISPLAY.get(config.estimator, config.estimator)
    if config.uses_meta and config.meta_init_scheme == "ste":
        label += " (STE start)"
    if config.lr_gain_from is not None:
        label += " (FC-Grad's gain)"
    if config.uses_meta and config.step_order == "original":
        label += " (original order)"
    if config.act_quantizer is not None:
        label += f" + {_activation_label(config)}"
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
    """A run's directory name: task, model, dataset, then what tells runs apart (``pretrain``: optimizer and seed;
    ``quantize``: also quantizer, bits, the group size (``-g128``, only per group), the activations' width and
    quantizer (``-a4lsq``, only when they are quantized), estimator, ``-ste-start`` and ``-original-order`` where
    they apply)."""
    base = f"{config.task}-{config.model}-{config.dataset}"
    if config.task == "pretrain":
        return f"{base}-{config.optimizer}-seed{config.seed}"
    order = "-original-order" if config.uses_meta and config.step_order == "original" else ""
    start = "-ste-start" if config.uses_meta and config.meta_init_scheme == "ste" else ""
    groups = f"-g{config.group_size}" if config.group_size is not None else ""
    return (
        f"{base}-{config.quantizer}{config.bits}{groups}{_activation_tag(config)}-{config.estimator}{start}{order}-"
        f"{config.optimizer}-seed{config.seed}"
    )


def _activation_tag(config: RunConfig) -> str:
    if config.act_quantizer is None:
        return ""
    backward = "-approxsign" if config.act_backward == "approxsign" else ""
    return f"-a{config.act_bits}{config.act_quantizer}{backward}"
