"""Argument checks of the training API: a wrong argument is one clear error at the call, not a failure deep inside
a later step."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_choice

NONFINITE_POLICIES = ("raise", "skip")


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of ``NONFINITE_POLICIES``.

    Args:
        policy: the ``on_nonfinite`` value to check.

    Raises:
        ValueError: ``policy`` is neither ``"raise"`` nor ``"skip"``; the message lists the allowed values.

    Example:
        >>> mq.guards.check_policy("skip")
        >>> mq.guards.check_policy("ignore")
        Traceback (most recent call last):
        ...
        ValueError: on_nonfinite 'ignore' is not supported; allowed: raise, skip
    """
    check_choice("on_nonfinite", policy, NONFINITE_POLICIES)


def check_trainer_inputs(model: Any, grad_scaler: Any = None, **callables: Any) -> None:
    """Refuse, with what was given, a trainer's model that is not a module, a ``grad_scaler`` that is not a
    gradient scaler, and any of ``callables`` (e.g. ``meta_optimizer``, ``before_update``) that is neither None
    nor callable; checked when given, not at the first step that uses them.

    Raises:
        TypeError: one of them; the message names the argument, what is allowed and what was given.

    Example:
        >>> try:
        ...     mq.guards.check_trainer_inputs(torch.nn.Linear(2, 2), meta_optimizer="adam")
        ... except TypeError as err:
        ...     print(err)
        meta_optimizer must be None or a callable, got 'adam'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}")
    scaler_api = ("scale", "unscale_", "step", "update", "get_scale")
    if grad_scaler is not None and not all(callable(getattr(grad_scaler, a, None)) for a in scaler_api):
        raise TypeError(
            f"grad_scaler must be None or a torch.amp.GradScaler (e.g. torch.amp.GradScaler('cuda')), "
            f"got {grad_scaler!r:.80}"
        )
    for name, value in callables.items():
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be None or a callable, got {value!r:.80}")


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Return ``optimizer`` if it is a ``torch.optim.Optimizer`` (or wraps one), else raise a ``TypeError``.

    Args:
        optimizer: what a trainer was given as its optimizer.

    Returns:
        ``optimizer`` itself.

    Raises:
        TypeError: anything else (e.g. the name ``"sgd"``); the message shows what was given.

    Example:
        >>> try:
        ...     mq.guards.check_optimizer("sgd")
        ... except TypeError as err:
        ...     print(err)
        optimizer must be a torch.optim.Optimizer over the model's parameters (e.g. ...), got 'sgd'
    """
    # a wrapper (Accelerate's, Lightning's) exposes the optimizer's param_groups, state and step
    wrapped = all(hasattr(optimizer, a) for a in ("param_groups", "state")) and callable(
        getattr(optimizer, "step", None)
    )
    if not (isinstance(optimizer, torch.optim.Optimizer) or wrapped):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer over the model's parameters (e.g. "
            f"torch.optim.SGD(model.parameters(), lr=0.1)), got {optimizer!r}"
        )
    return optimizer


def check_closure(closure: Any) -> Callable[[], Tensor]:
    """Return ``closure`` if it can be called, else raise a ``TypeError`` that says what ``step`` needs.

    Args:
        closure: what ``step`` was given.

    Returns:
        ``closure`` itself.

    Raises:
        TypeError: ``closure`` is not callable (e.g. None, or a loss tensor computed beforehand).

    Example:
        >>> try:
        ...     mq.guards.check_closure(None)
        ... except TypeError as err:
        ...     print(err)
        step(closure) needs a function that runs the forward pass and returns the loss, e.g. ...; got None
    """
    if not callable(closure):
        raise TypeError(
            "step(closure) needs a function that runs the forward pass and returns the loss, e.g. "
            f"lambda: F.cross_entropy(model(x), y); got {_short(closure)}"
        )
    return closure


def check_loss(loss: Any) -> Tensor:
    """Return ``loss`` if it is a scalar floating-point tensor that back-propagates, else raise.

    Args:
        loss: what the closure returned.

    Returns:
        ``loss`` itself.

    Raises:
        TypeError: not a tensor (e.g. a float from ``.item()``), or not floating point.
        ValueError: more than one element (a per-example loss: reduce it, e.g. with ``.mean()``), or it does not
            require grad (computed without autograd, e.g. under ``torch.no_grad()``).

    Example:
        >>> mq.guards.check_loss(torch.ones(3, requires_grad=True))
        Traceback (most recent call last):
        ...
        ValueError: the closure must return a scalar loss, got a tensor of shape (3,); reduce it (e.g. .mean())
        >>> mq.guards.check_loss(0.5)
        Traceback (most recent call last):
        ...
        TypeError: the closure must return the loss as a tensor, got float 0.5
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__} {_short(loss)}")
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
            "reduce it (e.g. .mean())"
        )
    if not loss.is_floating_point():
        raise TypeError(f"the closure must return a floating-point loss, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss returned by the closure does not require grad: compute it from the model's "
            "output, outside torch.no_grad()"
        )
    return loss


def check_state_shapes(records: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Tensor]) -> None:
    """Raise unless every tensor recorded per layer in a saved trainer state has its layer's weight's shape.

    ``MetaQuant.state_dict()["records"]`` holds, per quantized layer, the recorded ``g_Ŵ`` and ``W̃`` (shaped as
    the layer's weight); a state saved for another model must be refused when it is loaded, not at the next
    step.

    Args:
        records: ``{layer name: {"grad_w_hat": Tensor | None, "w_tilde": Tensor | None, ...}}``.
        weights: ``{layer name: the layer's weight}`` of the model the state is loaded into.

    Raises:
        ValueError: a layer of ``records`` is not in ``weights`` or the other way round, or a recorded tensor
            has another shape; the message names the layer and both shapes.

    Example:
        >>> weights = {"fc": torch.zeros(3, 4)}
        >>> mq.guards.check_state_shapes({"fc": {"grad_w_hat": torch.zeros(3, 4), "w_tilde": None}}, weights)
        >>> mq.guards.check_state_shapes({"fc": {"grad_w_hat": torch.zeros(5, 4), "w_tilde": None}}, weights)
        Traceback (most recent call last):
        ...
        ValueError: saved state does not fit layer fc: its grad_w_hat has shape (5, 4), the layer's weight (3, 4)
    """
    differ = sorted(set(records) ^ set(weights))
    if differ:
        raise ValueError(f"saved state does not match the model's quantized layers: {differ[:5]} differ")
    for name, record in records.items():
        for key, value in record.items():
            if key in ("grad_w_hat", "w_tilde") and isinstance(value, Tensor) and value.shape != weights[name].shape:
                raise ValueError(
                    f"saved state does not fit layer {name}: its {key} has shape {tuple(value.shape)}, "
                    f"the layer's weight {tuple(weights[name].shape)}"
                )


def check_requantization(name: str, current: Any, requested: Any) -> None:
    """Raise if a layer already quantized with ``current`` is asked to be quantized with another ``requested``.

    ``quantize_`` leaves quantized layers as they are; asking for another quantizer or bit width must not be
    silently ignored.

    Args:
        name: the layer's qualified name, for the message.
        current: the layer's ``ForwardQuantizer``.
        requested: the ``ForwardQuantizer`` asked for.

    Raises:
        ValueError: ``current != requested``; the message names the layer and both quantizers.

    Example:
        >>> mq.guards.check_requantization("fc", mq.get_quantizer("dorefa", 1), mq.get_quantizer("dorefa", 1))
        >>> try:
        ...     mq.guards.check_requantization("fc", mq.get_quantizer("dorefa", 1), mq.get_quantizer("bwn", 1))
        ... except ValueError as err:
        ...     print(err)
        layer fc is already quantized with DoReFa(bits=1), not BWN(bits=1); call dequantize_(model) first ...
    """
    if current != requested:
        raise ValueError(
            f"layer {name or '<root>'} is already quantized with {current!r}, not {requested!r}; "
            "call dequantize_(model) first to change it"
        )


def check_input_requantization(name: str, current: Any, requested: Sequence[Any]) -> None:
    """Raise if a quantized layer whose input quantizer is ``current`` (None: none) is asked for another one.

    As for the weights, ``quantize_`` leaves a quantized layer's input quantizer as it is: asking for other
    activations must not be silently ignored. ``requested`` holds what the request gives a layer (the first
    layer's and the others' input quantizer, None for none), compared by ``spec()``.

    Raises:
        ValueError: ``current`` is none of ``requested``; the message names the layer and both.
    """
    specs = [None if q is None else q.spec() for q in requested]
    if (None if current is None else current.spec()) not in specs:
        wanted = " or ".join(dict.fromkeys("no input quantizer" if q is None else repr(q) for q in requested))
        has = "no input quantizer" if current is None else f"the input quantizer {current!r}"
        raise ValueError(
            f"layer {name or '<root>'} already has {has}, not {wanted}; call dequantize_(model) first to change it"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
