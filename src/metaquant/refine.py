"""The optimizer's refinement ``π``: the update direction ``torch.optim`` would make of a gradient.

MetaQuant's look-ahead weight is ``W^t = W^{t−1} − α·π(g_W)`` (Algorithm 1, step 2, paper Eq. 6), where ``π``
is the base optimizer's own rule applied with its state *before* this step. Each rule here is a pure,
out-of-place function of the gradient, the parameter, the optimizer's per-parameter state and the group's
hyperparameters, written to match ``torch.optim.SGD``, ``Adam`` and ``AdamW`` step for step: ``p − lr·π(g)`` is
the value ``optimizer.step()`` gives. Nothing in the optimizer is changed.

Because the functions are out of place and built from differentiable ops, autograd can differentiate through
them (``through="exact"``). The paper's default (``through="residual"``) writes ``π(g) = g + r`` with the
residual ``r = π(g) − g`` treated as a constant: the value is the optimizer's update, the derivative w.r.t. ``g``
is the identity (exact for SGD without Nesterov or dampening).
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
    """``torch.optim.SGD``'s update direction: weight decay, momentum (with dampening), Nesterov.

    ``π(g)`` of the look-ahead ``W^t = W^{t−1} − α·π(g_W)`` (Eq. 6) for SGD: ``p − lr·sgd_direction(...)`` is
    the value ``optimizer.step()`` gives. Out of place: neither ``state`` nor ``param`` is changed. Without
    momentum and weight decay the direction is ``grad`` itself.

    Shapes: ``grad``, ``param`` and the momentum buffer are all the parameter's shape.

    Args:
        grad: the gradient ``g`` (may require grad: the result is differentiable w.r.t. it).
        param: the parameter (only its value is used, for weight decay).
        state: ``optimizer.state[param]`` before the step (its ``momentum_buffer``, if any; may be empty).
        group: the parameter's group of a ``torch.optim.SGD``: ``weight_decay``, ``momentum``, ``dampening``,
            ``nesterov``.

    Returns:
        The direction ``π(g)``, the parameter's shape.

    Raises:
        KeyError: ``group`` lacks one of SGD's hyperparameters (e.g. a group of another optimizer).

    Example:
        One step of ``torch.optim.SGD`` with momentum, Nesterov and weight decay, from a filled momentum buffer:

        >>> p = torch.nn.Parameter(torch.randn(3))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
        >>> p.grad = torch.randn(3); opt.step()
        >>> p.grad = torch.randn(3)
        >>> look_ahead = p.detach() - 0.1 * mq.refine.sgd_direction(p.grad, p, opt.state[p], opt.param_groups[0])
        >>> opt.step()
        >>> torch.allclose(p, look_ahead)
        True
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
    """``torch.optim.Adam`` / ``AdamW``'s update direction, bias-corrected, with ``amsgrad``.

    ``π(g)`` of the look-ahead ``W^t = W^{t−1} − α·π(g_W)`` (Eq. 6) for Adam and AdamW: the moments are
    advanced with ``g`` from ``state`` (out of place; ``state`` is not changed), and
    ``π(g) = m̂ / (sqrt(v̂) + eps)``, ``m̂``, ``v̂`` bias-corrected for the step about to be taken.

    Adam adds ``weight_decay·p`` to the gradient (L2); AdamW (``decoupled_weight_decay``) shrinks the weight
    by ``lr·weight_decay·p`` instead, which is the term ``weight_decay·p`` in the direction.

    Args:
        grad: the gradient ``g`` (may require grad: the result is differentiable w.r.t. it).
        param: the parameter (only its value is used, for weight decay).
        state: ``optimizer.state[param]`` before the step: ``step``, ``exp_avg``, ``exp_avg_sq``,
            ``max_exp_avg_sq`` (may be empty: the first step).
        group: the parameter's group of a ``torch.optim.Adam`` or ``AdamW``: ``betas``, ``eps``,
            ``weight_decay``, ``amsgrad``, and ``decoupled_weight_decay`` (absent: False).

    Returns:
        The direction ``π(g)``, the parameter's shape.

    Raises:
        KeyError: ``group`` lacks one of Adam's hyperparameters (e.g. a group of another optimizer).

    Example:
        One step of ``torch.optim.AdamW`` with ``amsgrad``, after a first step filled its state:

        >>> p = torch.nn.Parameter(torch.randn(3))
        >>> opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, amsgrad=True)
        >>> p.grad = torch.randn(3); opt.step()
        >>> p.grad = torch.randn(3)
        >>> look_ahead = p.detach() - 1e-2 * mq.refine.adam_direction(p.grad, p, opt.state[p], opt.param_groups[0])
        >>> opt.step()
        >>> torch.allclose(p, look_ahead)
        True
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
    ``LightningOptimizer``), followed through nested wrappers; ``optimizer`` itself when it wraps nothing.

    A wrapper counts as one when its ``.optimizer`` has ``param_groups`` and ``state``: the wrapped optimizer
    owns the update rule, so ``refinement_for`` decides from it.

    Args:
        optimizer: an optimizer or a wrapper of one.

    Returns:
        The innermost wrapped optimizer.

    Example:
        >>> class Wrapper:  # like Accelerate's AcceleratedOptimizer: the groups and state are the wrapped ones
        ...     def __init__(self, optimizer):
        ...         self.optimizer, self.param_groups, self.state = optimizer, optimizer.param_groups, optimizer.state
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        >>> mq.refine.unwrap_optimizer(Wrapper(Wrapper(sgd))) is sgd, mq.refine.unwrap_optimizer(sgd) is sgd
        (True, True)
    """
    for _ in range(16):  # a bound, not a loop forever on a wrapper that holds itself
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not (hasattr(inner, "param_groups") and hasattr(inner, "state")):
            return optimizer
        optimizer = inner
    return optimizer


def refinement_for(optimizer: torch.optim.Optimizer) -> Refinement:
    """The refinement ``π`` (Eq. 6) matching ``optimizer``'s class and options.

    Args:
        optimizer: the base optimizer, ``torch.optim.SGD``, ``Adam`` or ``AdamW`` or a subclass that keeps its
            ``step`` and ``_init_group`` (e.g. one that only sets defaults), or a wrapper of one (see
            ``unwrap_optimizer``): the wrapped optimizer decides.

    Returns:
        ``sgd_direction`` or ``adam_direction`` (AdamW takes ``adam_direction``, its groups saying
        ``decoupled_weight_decay``; on a torch whose AdamW is not an Adam subclass, a wrapper that sets it).

    Raises:
        ValueError: an optimizer or option (``maximize``) without a refinement, or a subclass that overrides its
            update (the message names the method); the message lists the supported.

    Example:
        >>> params = [torch.nn.Parameter(torch.zeros(2))]
        >>> mq.refine.refinement_for(torch.optim.SGD(params, lr=0.1)) is mq.refine.sgd_direction
        True
        >>> mq.refine.refinement_for(torch.optim.Adam(params)) is mq.refine.adam_direction
        True
        >>> mq.refine.refinement_for(torch.optim.RMSprop(params))
        Traceback (most recent call last):
        ...
        ValueError: MetaQuant needs the refinement π of the base optimizer; RMSprop is not supported; supported: ...
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
    """Wrap ``rule`` so that autograd sees the paper's residual form (``residual``) or the rule itself (``exact``).

    How ``∂W^t/∂g_W`` is taken in the look-ahead of Eq. 6, and so how ``∂ℓ/∂φ`` (Eq. 8) flows through ``π``:
    ``"residual"`` returns ``π(g).detach() + (g − g.detach())``, the value of ``π(g)`` with the identity as
    its derivative w.r.t. ``g``; ``"exact"`` returns ``rule`` itself.

    Args:
        rule: a refinement (``sgd_direction``, ``adam_direction`` or one of the same signature).
        mode: ``"residual"`` or ``"exact"`` (see ``THROUGH``).

    Returns:
        A refinement with the signature of ``rule``.

    Raises:
        ValueError: ``mode`` is not one of ``THROUGH`` (the message lists them).

    Example:
        >>> p = torch.nn.Parameter(torch.randn(3))
        >>> group = torch.optim.Adam([p], lr=0.1).param_groups[0]
        >>> g = torch.randn(3, requires_grad=True)
        >>> d = mq.refine.with_derivative(mq.refine.adam_direction, "residual")(g, p, {}, group)
        >>> torch.equal(d, mq.refine.adam_direction(g, p, {}, group)), torch.autograd.grad(d.sum(), g)[0].tolist()
        (True, [1.0, 1.0, 1.0])
        >>> mq.refine.with_derivative(mq.refine.adam_direction, "exact") is mq.refine.adam_direction
        True
    """
    if mode == "exact":
        return rule
    if mode != "residual":
        raise ValueError(f"unknown refinement derivative {mode!r}; allowed: {', '.join(THROUGH)}")

    def residual(grad: Tensor, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        # π(g) + (g − g.detach()): the value is π(g) to the bit, the derivative w.r.t. g the identity.
        return rule(grad, param, state, group).detach() + (grad - grad.detach())

    return residual
