"""The optimizer's refinement ``π``: the update direction ``torch.optim`` would make of a gradient.

MetaQuant's look-ahead weight is ``W^t = W^{t−1} − α·π(g_W)`` (Algorithm 1 step 2, Eq. 6), ``π`` the base
optimizer's own rule with its state *before* the step. Each rule is a pure, out-of-place function of the
gradient, the parameter, the optimizer's per-parameter state and the group's hyperparameters, matching
``torch.optim.SGD``, ``Adam`` and ``AdamW`` step for step (``p − lr·π(g)`` is what ``optimizer.step()`` gives).

Built from differentiable ops, so autograd can go through them (``through="exact"``). The paper's default
(``through="residual"``) writes ``π(g) = g + r`` with ``r = π(g) − g`` held constant: the optimizer's update as
value, the identity as derivative w.r.t. ``g`` (exact for SGD without Nesterov or dampening).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "sgd_direction",
    "adam_direction",
    "refinement_for",
    "with_derivative",
    "Refinement",
    "SUPPORTED_OPTIMIZERS",
    "THROUGH",
    "unwrap_optimizer",
]

#: ``(grad, param, state, group) -> direction``; ``state`` is ``optimizer.state[param]`` (may be empty).
Refinement = Callable[[Tensor, Tensor, dict[str, Any], dict[str, Any]], Tensor]

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")
THROUGH = ("residual", "exact")


def sgd_direction(grad: Tensor, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """``torch.optim.SGD``'s direction ``π(g)`` (Eq. 6): weight decay, momentum with dampening, Nesterov.

    ``state`` is ``optimizer.state[param]`` before the step (may be empty); neither it nor ``param`` is changed.

    Raises:
        KeyError: ``group`` lacks one of SGD's hyperparameters (e.g. a group of another optimizer).
    """
    d = grad
    if group["weight_decay"] != 0:
        d = d + group["weight_decay"] * param.detach()
    momentum = group["momentum"]
    if momentum != 0:
        buf = state.get("momentum_buffer")
        # torch.optim.SGD starts the buffer with the first gradient itself (no dampening on step 1).
        buf = d if buf is None else momentum * buf + (1 - group["dampening"]) * d
        d = d + momentum * buf if group["nesterov"] else buf
    return d


def adam_direction(grad: Tensor, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """``torch.optim.Adam`` / ``AdamW``'s direction ``π(g) = m̂ / (sqrt(v̂) + eps)`` (Eq. 6), with ``amsgrad``.

    The moments are advanced with ``g`` from ``state`` out of place and bias-corrected for the step about to be
    taken. Adam adds ``weight_decay·p`` to the gradient; AdamW (``decoupled_weight_decay`` in the group) adds it to
    the direction instead.

    Raises:
        KeyError: ``group`` lacks one of Adam's hyperparameters (e.g. a group of another optimizer).
    """
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", False)
    g = grad
    if wd != 0 and not decoupled:
        g = g + wd * param.detach()
    step = float(state["step"]) + 1 if "step" in state else 1.0
    exp_avg = state.get("exp_avg")
    exp_avg_sq = state.get("exp_avg_sq")
    m = (1 - beta1) * g if exp_avg is None else beta1 * exp_avg + (1 - beta1) * g
    v = (1 - beta2) * g * g if exp_avg_sq is None else beta2 * exp_avg_sq + (1 - beta2) * g * g
    if group["amsgrad"]:
        v_max = state.get("max_exp_avg_sq")
        v = v if v_max is None else torch.maximum(v_max, v)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    # sqrt with a finite derivative at v = 0 (a coordinate whose gradient has always been 0), where autograd's
    # would be 0·inf = NaN under through="exact"; the value is the plain sqrt.
    positive = v > 0
    root = torch.where(positive, v, torch.ones_like(v)).sqrt() * positive
    d = (m / bias1) / (root / bias2**0.5 + eps)
    if wd != 0 and decoupled:
        d = d + wd * param.detach()
    return d


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer a wrapper holds as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), through nested wrappers; ``optimizer`` itself when it wraps nothing.

    A wrapper counts as one when its ``.optimizer`` has ``param_groups`` and ``state``; the wrapped optimizer owns
    the update rule.
    """
    for _ in range(16):  # a bound, not a loop forever on a wrapper that holds itself
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not (hasattr(inner, "param_groups") and hasattr(inner, "state")):
            return optimizer
        optimizer = inner
    return optimizer


def refinement_for(optimizer: torch.optim.Optimizer) -> Refinement:
    """The refinement ``π`` (Eq. 6) for ``optimizer``: ``sgd_direction`` or ``adam_direction``.

    ``optimizer`` is an SGD, Adam or AdamW, a subclass that keeps its ``step`` and ``_init_group``, or a wrapper of
    one (``unwrap_optimizer``). On a torch whose AdamW is not an Adam subclass, AdamW gets a wrapper of
    ``adam_direction`` that sets ``decoupled_weight_decay``.

    Raises:
        ValueError: an unsupported optimizer, a subclass that overrides its update (named), or ``maximize=True``.
    """
    optimizer = unwrap_optimizer(optimizer)
    cls = type(optimizer)
    base = next((c for c in cls.__mro__ if c in _RULES), None)
    if base is None:
        raise ValueError(
            f"MetaQuant needs the refinement π of the base optimizer; {cls.__name__} is not "
            f"supported; supported: {', '.join(SUPPORTED_OPTIMIZERS)} and subclasses that keep their update rule"
        )
    changed = [name for name in _UPDATE_METHODS if _method(cls, name) is not _method(base, name)]
    if changed:
        raise ValueError(
            f"MetaQuant needs the refinement π of the base optimizer; {cls.__name__} overrides "
            f"{', '.join(f'{base.__name__}.{name}' for name in changed)}, so its update rule may not be "
            f"{base.__name__}'s; supported: {', '.join(SUPPORTED_OPTIMIZERS)} and subclasses that keep their "
            f"{' and '.join(_UPDATE_METHODS)}"
        )
    rule = _RULES[base]
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("MetaQuant does not support maximize=True in the base optimizer")
    return rule


def _adamw_legacy(grad: Tensor, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    return adam_direction(grad, param, state, {**group, "decoupled_weight_decay": True})


#: The rule of each supported class; AdamW's groups say ``decoupled_weight_decay`` where it is an Adam subclass.
_RULES: dict[type, Refinement] = {
    torch.optim.SGD: sgd_direction,
    torch.optim.Adam: adam_direction,
    torch.optim.AdamW: adam_direction if issubclass(torch.optim.AdamW, torch.optim.Adam) else _adamw_legacy,
}
#: The methods through which ``torch.optim`` computes an update: a subclass that keeps them keeps the rule.
_UPDATE_METHODS = ("step", "_init_group")


def _method(cls: type, name: str) -> Any:
    """``cls``'s method ``name`` without its decorators (``torch.optim`` wraps ``step`` in each class it makes)."""
    method = getattr(cls, name, None)
    return inspect.unwrap(method) if method is not None else None


def with_derivative(rule: Refinement, mode: str) -> Refinement:
    """``rule`` as autograd should see it in the look-ahead of Eq. 6, and so in ``∂ℓ/∂φ`` (Eq. 8).

    ``"residual"``: ``π(g).detach() + (g − g.detach())``, the value of ``π(g)`` with the identity as derivative
    w.r.t. ``g``; ``"exact"``: ``rule`` itself.

    Raises:
        ValueError: ``mode`` is not one of ``THROUGH``.
    """
    if mode == "exact":
        return rule
    if mode != "residual":
        raise ValueError(f"unknown refinement derivative {mode!r}; allowed: {', '.join(THROUGH)}")

    def residual(grad: Tensor, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        # π(g) + (g − g.detach()): the value is π(g) to the bit, the derivative w.r.t. g the identity.
        return rule(grad, param, state, group).detach() + (grad - grad.detach())

    return residual
