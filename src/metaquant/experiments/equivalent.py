"""The "equivalent STE" of an FC-Grad run: SGD with the STE at the learning rate ``α·k̄`` and the weight decay
``λ/k̄``, ``k̄`` the gain FC-Grad learned (docs/design.md §6.2 defines it and where it applies).

FC-Grad without a non-linearity computes ``g_W̃ = FCs_φ(g_Ŵ) = k·g_Ŵ`` with one learned scalar
``k = W_L ⋯ W_1``: its weight gradient is the STE's times ``k``, and SGD adds ``λ·W`` to it. SGD with the rate
``α·k`` and the decay ``λ/k`` on the STE's gradient takes the same steps, momentum, dampening and Nesterov
included. If a meta quantizer's gain over STE came only from that scale, the equivalent STE would match it.

``k̄`` is the learning-rate-weighted mean of ``k`` over the run's steps, ``Σ_t α_t·k_t / Σ_t α_t`` with ``k_t``
the gain step ``t`` used, which the run's trace records (``trace.pt``'s ``gain``). A trace written before that
record existed gives the estimate from its snapshots of the meta quantizer (after epochs 0, 1, 2, 5, 10, ... and
the last): within epoch ``e`` the gain is the mean of its values at the epoch's start and end, linearly
interpolated between snapshots, and epoch ``e`` weighs as much as its learning-rate factor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..schedules import lr_factor

__all__ = ["fc_grad_gain", "gain_tensor", "mean_gain", "learned_gain", "check_equivalent", "equivalent_sgd"]

#: The options of the FC-Grad run that the equivalent STE must share (its update rule, but for the gain, and what
#: it quantizes).
SHARED = (
    *("quantizer", "bits", "act_quantizer", "act_bits", "act_backward", "act_first_layer_bits"),
    *("optimizer", "lr", "momentum", "dampening", "nesterov", "weight_decay"),
)
#: Per quantizer, the classical estimators whose weight gradient is FC-Grad's divided by its gain: DoReFa's
#: ``c(W)`` is FC-Grad's, and the STE's gate is open for it (per channel too); ternary and uniform (per channel,
#: per group) have ``c(W) = 1`` and no scale, so only the ungated STE (``identity``) is. BWN's STE multiplies by
#: the layer scale ``a`` and LSQ's ``c(W)`` by ``1/(s·h)`` with a learned ``s``: none is.
ESTIMATORS_FOR = {
    "dorefa": ("ste", "identity"),
    "dorefa-channel": ("ste", "identity"),
    "ternary": ("identity",),
    "uniform": ("identity",),
    "uniform-channel": ("identity",),
    "uniform-group": ("identity",),
}


def fc_grad_gain(meta_state: Mapping[str, Tensor], init_scheme: str) -> float:
    """The gain ``k`` of an FC-Grad meta quantizer without a non-linearity, from its state dict:
    ``W_L ⋯ W_1``, plus 1 for ``init_scheme="ste"`` (``g + FCs_φ(g)``).

    Args:
        meta_state: ``FCGrad.state_dict()`` (keys ``net.layers.<i>.weight``).
        init_scheme: the ``init_scheme`` the FC-Grad was made with (its state dict does not say it).

    Returns:
        ``k``: ``FCGrad(g, ·) = k·g`` for every ``g``.

    Raises:
        ValueError: the state holds no FC layers (not an FC-Grad state).

    Example:
        >>> meta = mq.FCGrad(hidden=4, init_scheme="paper")
        >>> k = mq.experiments.equivalent.fc_grad_gain(meta.state_dict(), "paper")
        >>> g = torch.tensor([0.5, -2.0])
        >>> torch.allclose(meta(g, torch.zeros(2))[0], k * g)
        True
    """
    return float(gain_tensor(meta_state, init_scheme))


def gain_tensor(meta_state: Mapping[str, Tensor], init_scheme: str) -> Tensor:
    """``fc_grad_gain`` as a float64 scalar tensor on the state's device (read without waiting for it)."""
    keys = sorted(
        (k for k in meta_state if k.startswith("net.layers.") and k.endswith(".weight")),
        key=lambda k: int(k.split(".")[2]),
    )
    if not keys:
        raise ValueError(f"not an FC-Grad state: no net.layers.<i>.weight among {sorted(meta_state)[:5]}")
    product = meta_state[keys[0]].detach().double()
    for key in keys[1:]:
        product = meta_state[key].detach().double() @ product
    return product.reshape(()) + (1.0 if init_scheme == "ste" else 0.0)


def mean_gain(gains: Mapping[int, float], epochs: int, lr_factor: Callable[[int], float]) -> float:
    """The learning-rate-weighted mean gain over ``epochs`` epochs, from gains known after some epochs.

    Args:
        gains: ``{epochs done: k}``; must hold 0 (before training) and ``epochs``.
        epochs: the run's number of epochs.
        lr_factor: ``epoch -> learning-rate factor`` of the run's schedule (0-based epochs).

    Returns:
        ``Σ_e f_e·(k(e) + k(e+1))/2 / Σ_e f_e`` with ``k`` linear between the known points.

    Raises:
        ValueError: ``gains`` lacks epoch 0 or ``epochs``.

    Example:
        The gain grows from 1 to 3 over two epochs; the second epoch's rate is a tenth of the first's:

        >>> mq.experiments.equivalent.mean_gain({0: 1.0, 2: 3.0}, 2, lambda e: [1.0, 0.1][e])  # (1·1.5 + 0.1·2.5) / 1.1
        1.5909090909090908
    """
    if 0 not in gains or epochs not in gains:
        raise ValueError(
            f"gains must be known before training (0) and after the last epoch ({epochs}); known after {sorted(gains)}"
        )
    known = sorted(gains)

    def at(e: int) -> float:
        upper = next(k for k in known if k >= e)
        lower = max(k for k in known if k <= e)
        if upper == lower:
            return gains[e]
        w = (e - lower) / (upper - lower)
        return (1 - w) * gains[lower] + w * gains[upper]

    weights = [lr_factor(e) for e in range(epochs)]
    total = sum(f * (at(e) + at(e + 1)) / 2 for e, f in enumerate(weights))
    return total / sum(weights)


def equivalent_sgd(lr: float, weight_decay: float, gain: float) -> tuple[float, float]:
    """The SGD learning rate and weight decay under which the STE takes FC-Grad's steps: ``(α·k, λ/k)``.

    With gradient ``k·g`` FC-Grad's SGD moves ``W`` by ``α·(k·g + λ·W)`` (through the momentum buffer too); the
    STE's gradient is ``g``, and ``α·k·(g + (λ/k)·W)`` is the same step.

    Args:
        lr: the FC-Grad run's ``α``.
        weight_decay: its ``λ``.
        gain: ``k``, a number > 0.

    Returns:
        ``(α·k, λ/k)``.

    Raises:
        ValueError: ``gain`` is not > 0 (no learning rate is equivalent to it).
    """
    if not gain > 0:
        raise ValueError(f"a gain {gain:g} <= 0 has no equivalent STE learning rate")
    return lr * gain, weight_decay / gain


def check_equivalent(ste: Mapping[str, Any], fc_grad: Mapping[str, Any], source: str = "the FC-Grad run") -> None:
    """Refuse, with the reason and what is allowed, an STE run (configuration ``ste``) that cannot be the
    equivalent STE of the FC-Grad run of configuration ``fc_grad`` (docs/design.md §6.2).

    Args:
        ste: the STE run's ``RunConfig.to_dict()``.
        fc_grad: the FC-Grad run's, as its ``config.json`` holds it.
        source: how the messages name the FC-Grad run.

    Raises:
        ValueError: FC-Grad with a non-linearity or the original step order; another optimizer than SGD (Adam
            divides each coordinate's gradient by its own scale: a gain cancels); an estimator whose gradient is
            not FC-Grad's divided by its gain for the quantizer; an option of ``SHARED`` that differs.
    """
    if fc_grad.get("estimator") != "fc-grad" or fc_grad.get("nonlinearity", "none") != "none":
        raise ValueError(
            f"{source} is not an FC-Grad run without a non-linearity (`estimator` {fc_grad.get('estimator')!r}, "
            f"`nonlinearity` {fc_grad.get('nonlinearity')!r}): only its gradient is a multiple of the STE's"
        )
    if fc_grad.get("step_order", "paper") != "paper":
        raise ValueError(
            f"{source} uses `step_order` {fc_grad.get('step_order')!r}, whose forward weight moves along the previous "
            "update: its steps are not STE steps at a rescaled rate; the equivalent STE is defined for `step_order` "
            "'paper'"
        )
    optimizer = ste.get("optimizer", "sgd")
    if optimizer != "sgd":
        raise ValueError(
            f"the equivalent STE is defined for SGD: {'Adam' if optimizer == 'adam' else 'AdamW'} divides each "
            f"coordinate's gradient by its own scale, so FC-Grad's gain cancels and no learning rate is equivalent "
            f"(`optimizer` {optimizer!r}; allowed: 'sgd')"
        )
    quantizer, estimator = ste.get("quantizer", "dorefa"), ste.get("estimator")
    allowed = ESTIMATORS_FOR.get(quantizer, ())
    if estimator not in allowed:
        raise ValueError(
            f"with `quantizer` {quantizer!r} the STE's gradient under `estimator` {estimator!r} is not FC-Grad's "
            f"divided by its gain; allowed: "
            + (
                f"`estimator` {' or '.join(map(repr, allowed))}"
                if allowed
                else f"`quantizer` {', '.join(ESTIMATORS_FOR)}"
            )
        )
    for key in SHARED:
        if key in fc_grad and ste.get(key) != fc_grad[key]:
            raise ValueError(
                f"the equivalent STE takes {source}'s update rule but for the gain: its `{key}` is "
                f"{fc_grad[key]!r}, this run's {ste.get(key)!r}"
            )


def learned_gain(run_dir: str | Path, ste: Mapping[str, Any] | None = None) -> float:
    """``k̄`` of a finished FC-Grad run (see the module's description), from its ``config.json`` and ``trace.pt``.

    Args:
        run_dir: the directory of an FC-Grad run without a non-linearity that has finished (``done``).
        ste: the configuration (``RunConfig.to_dict()``) of the STE run that takes the gain, checked with
            ``check_equivalent``; None: the FC-Grad run alone is checked.

    Returns:
        The learning-rate-weighted mean gain.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``config.json`` or ``trace.pt``.
        ValueError: the run is not a finished FC-Grad run without a non-linearity in the paper's step order, the
            STE run cannot be its equivalent (``check_equivalent``), or its trace lacks the snapshots before and
            after training; the message names the file.

    Example:
        A sweep entry with ``equivalent_of = "fc-grad"`` reads the FC-Grad run of its trial; before that run
        exists, the STE run cannot start:

        >>> mq.experiments.equivalent.learned_gain("runs/fc-grad-trial-1")
        Traceback (most recent call last):
        ...
        FileNotFoundError: runs/fc-grad-trial-1/config.json not found: the equivalent STE needs a finished ...
    """
    run = Path(run_dir)
    config_path, trace_path = run / "config.json", run / "trace.pt"
    for path in (config_path, trace_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the equivalent STE needs a finished FC-Grad run there")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not a run configuration: {err}") from None
    check_equivalent(ste if ste is not None else {**config, "estimator": "ste"}, config, str(run))
    if not (run / "done").exists():
        raise ValueError(f"{run} has not finished: run it first (the equivalent STE uses its whole trace)")
    try:
        data = torch.load(trace_path, map_location="cpu", weights_only=True)  # also a trace written on a GPU
        scheme = config.get("meta_init_scheme", "paper")
        gains = {int(e): fc_grad_gain(s["meta"], scheme) for e, s in data["snapshots"].items()}
    except Exception as err:  # noqa: BLE001 - any damage to the file is reported as such
        raise ValueError(f"{trace_path} is not a readable trace of an FC-Grad run: {err}") from None
    recorded = data.get("gain", {})
    if recorded.get("steps"):  # the per-step record (docs/design.md §6.2); older traces: the snapshots
        return recorded["lr_weighted_sum"] / recorded["lr_sum"]
    epochs = int(config["epochs"])
    schedule = config.get("lr_schedule", "step")
    step, gamma = int(config.get("lr_step", 30)), float(config.get("lr_gamma", 0.1))
    try:
        return mean_gain(gains, epochs, lambda e: lr_factor(schedule, e, epochs, step, gamma))
    except ValueError as err:
        raise ValueError(f"{trace_path}: {err}") from None
