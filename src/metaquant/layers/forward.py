"""What the quantized layers compute with for one forward pass: the scopes through which training algorithms
install other tensors than ``Q(A(W))`` with the clipped STE (MetaQuant's look-ahead weight, another estimator)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .base import ParamFn, QuantLayer
from .convert import quantized_layers


@contextlib.contextmanager
def forward_params_fn(model: nn.Module, fn: ParamFn) -> Iterator[None]:
    """Within this scope every quantized layer of ``model`` takes its forward weight and bias from ``fn(layer)``.

    This is the one, explicit, hook through which training algorithms change the forward pass: MetaQuant's
    look-ahead ``W^t`` (Eq. 6) enters the forward pass of step 3 (Eq. 7) through it, and ``Trainer`` installs
    ``fake_quantize`` with another classical estimator through it. The previous functions are restored on exit,
    even on error (the error propagates). The layers are those present on entry.

    Args:
        model: the module whose quantized layers take ``fn``.
        fn: ``fn(layer) -> (weight, bias)``: the tensors ``layer`` computes with, used as given (no quantizer is
            applied for you: return ``Ŵ``, e.g. ``fake_quantize(w, layer.quantizer, estimator)``).

    Yields:
        None.

    Example:
        Full-precision weights for one forward pass; outside the scope the layer quantizes again:

        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> x, layer = torch.randn(4, 3), net[0]
        >>> with mq.forward_params_fn(net, lambda m: (m.weight, m.bias)):
        ...     full = net(x)
        >>> torch.allclose(full, torch.nn.functional.linear(x, layer.weight, layer.bias)), layer.param_fn is None
        (True, True)
    """
    layers = list(quantized_layers(model).values())
    previous = [layer.param_fn for layer in layers]
    for layer in layers:
        layer.param_fn = fn
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.param_fn = prev


@contextlib.contextmanager
def forward_tensors(tensors: dict[QuantLayer, tuple[Tensor, Tensor | None]]) -> Iterator[None]:
    """Within this scope each given layer computes with the given ``(weight, bias)``, used as they are.

    The tensors are made before the forward pass (MetaQuant's ``Ŵ^t`` of Eq. 7 is computed from the look-ahead
    weight outside the model), so the forward pass itself reads attributes only: under ``torch.compile`` it is
    one graph, whatever changes from step to step. Layers not in ``tensors`` keep their usual forward. The
    previous values are restored on exit, even on error.

    Args:
        tensors: ``{layer: (weight, bias)}``, the weight already quantized (e.g. ``fake_quantize(w, ...)``).

    Yields:
        None.

    Example:
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> layer, x = net[0], torch.randn(4, 3)
        >>> with mq.layers.forward_tensors({layer: (torch.ones(2, 3), None)}):
        ...     out = net(x)
        >>> torch.allclose(out, x.sum(1, keepdim=True).expand(4, 2)), layer.param_override is None
        (True, True)
    """
    previous = [(layer, layer.param_override) for layer in tensors]
    for layer, pair in tensors.items():
        layer.param_override = pair
    try:
        yield
    finally:
        for layer, prev in previous:
            layer.param_override = prev
