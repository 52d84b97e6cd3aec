"""Quantized Conv2d/Linear layers and the in-place model surgery that installs them.

``quantize_(model, QuantConfig("dorefa", bits=1))`` swaps every ``nn.Conv2d`` and ``nn.Linear`` of any module
(first and last layer included, as in the paper) for ``QuantConv2d`` / ``QuantLinear``. The new layers share
the original ``Parameter`` objects, so an optimizer built before or after the swap trains the same tensors, and
``dequantize_`` gives back plain layers with an identical ``state_dict``.

A quantized layer's forward uses ``Ŵ = Q(A(W))`` in place of ``W``. By default ``Ŵ`` back-propagates with the
clipped STE. A training algorithm that needs other tensors in the forward pass (MetaQuant's look-ahead
weight, another classical estimator) installs a *parameter function* ``fn(layer) -> (weight, bias)`` for the
duration of one forward pass with ``forward_params_fn(model, fn)``; outside that scope the layers hold only
parameters and configuration.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .estimators import STE, fake_quantize
from .quantizers import ForwardQuantizer, get_quantizer, quantizer_names

logger = logging.getLogger(__name__)

__all__ = [
    "QuantConfig",
    "QuantLayer",
    "QuantConv2d",
    "QuantLinear",
    "quantize_",
    "dequantize_",
    "quantized_layers",
    "forward_params_fn",
]

#: ``fn(layer) -> (weight used in the forward pass, bias used in the forward pass)``
ParamFn = Callable[["QuantLayer"], tuple[Tensor, Tensor | None]]
FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize weights: a forward quantizer by name and its bit width.

    Args:
        quantizer: one of ``metaquant.quantizers.quantizer_names()`` (``dorefa``, ``bwn``, ``bwn-channel``,
            ``ternary``, ``uniform``).
        bits: the bit width; each quantizer states the widths it supports.

    Attributes:
        forward_quantizer: the ``ForwardQuantizer`` built from ``quantizer`` and ``bits`` (not an argument).

    Raises:
        ValueError: unknown quantizer or unsupported bit width; the message names the allowed values.
        TypeError: ``quantizer`` is not a string, or ``bits`` is not an ``int``.

    Example:
        >>> mq.QuantConfig("bwn-f").forward_quantizer
        BWNPerChannel(bits=1)
        >>> mq.QuantConfig("ternary")
        Traceback (most recent call last):
        ...
        ValueError: quantizer 'ternary' does not support bits=1; allowed: 2
    """

    quantizer: str = "dorefa"
    bits: int = 1
    forward_quantizer: ForwardQuantizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, str):
            raise TypeError(f"quantizer must be a name ({', '.join(quantizer_names())}), got {self.quantizer!r}")
        object.__setattr__(self, "forward_quantizer", get_quantizer(self.quantizer, self.bits))


class QuantLayer(nn.Module):
    """Mixin for layers whose forward uses the quantized weight. Holds the quantizer, no tensors of its own.

    Listed first among the bases of ``QuantConv2d``/``QuantLinear``; ``isinstance(m, QuantLayer)`` is how the
    library finds quantized layers. The attribute ``param_fn`` is ``None`` except inside ``forward_params_fn``.

    Args:
        *args: the wrapped layer's arguments (e.g. ``in_features, out_features``).
        quantizer: the forward quantizer (default: 1-bit DoReFa); it may be shared between layers.
        **kwargs: the wrapped layer's keyword arguments (``bias``, ``stride``, ``device``...).

    Example:
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> layer = net[0]
        >>> isinstance(layer, mq.layers.QuantLayer), layer.quantizer
        (True, DoReFa(bits=1))
        >>> w_hat, bias = layer.forward_params()
        >>> torch.equal(w_hat, layer.quantizer(layer.weight)), bias is layer.bias
        (True, True)
    """

    weight: nn.Parameter

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quantizer: ForwardQuantizer = quantizer if quantizer is not None else QuantConfig().forward_quantizer
        # Set only inside ``forward_params_fn``; None means "Q(A(W)) with the clipped STE, and the bias".
        self.param_fn: ParamFn | None = None

    def forward_params(self) -> tuple[Tensor, Tensor | None]:
        """``(Ŵ, bias)`` for this forward pass.

        Returns:
            ``param_fn(self)`` inside ``forward_params_fn``; otherwise ``fake_quantize(weight, quantizer, STE())``
            (value ``Q(A(W))``, clipped-STE gradient) and the bias (``None`` if the layer has none).
        """
        if self.param_fn is not None:
            return self.param_fn(self)
        return fake_quantize(self.weight, self.quantizer, STE()), self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantizer={self.quantizer.name}, bits={self.quantizer.bits}"


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with ``Q(A(W))``; every Conv2d option (stride, padding and its mode, dilation,
    groups, bias) behaves as in ``nn.Conv2d``.

    Usually made by ``quantize_``; built directly it takes ``nn.Conv2d``'s arguments plus ``quantizer=``.

    Example:
        >>> conv = mq.QuantConv2d(2, 4, 3, padding=1, quantizer=mq.quantizers.BWN())
        >>> x = torch.randn(1, 2, 5, 5)
        >>> w_hat = mq.quantizers.BWN()(conv.weight)
        >>> torch.allclose(conv(x), torch.nn.functional.conv2d(x, w_hat, conv.bias, padding=1))
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, *self.forward_params())


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` computing with ``Q(A(W))``.

    Usually made by ``quantize_``; built directly it takes ``nn.Linear``'s arguments plus ``quantizer=``.

    Example:
        >>> layer = mq.QuantLinear(3, 2, quantizer=mq.quantizers.BWN())
        >>> layer
        QuantLinear(in_features=3, out_features=2, bias=True, quantizer=bwn, bits=1)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x @ mq.quantizers.BWN()(layer.weight).T + layer.bias)
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, *self.forward_params())


_FLOAT_TO_QUANT: dict[type[nn.Module], type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
_QUANT_TO_FLOAT: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _FLOAT_TO_QUANT.items()}


def _conv_kwargs(m: nn.Conv2d) -> dict[str, Any]:
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
        padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def _linear_kwargs(m: nn.Linear) -> dict[str, Any]:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)


def _rebuild(old: nn.Module, new_cls: type[nn.Module], **extra: Any) -> nn.Module:
    """A ``new_cls`` module with ``old``'s options, holding ``old``'s very Parameters (identity kept)."""
    kwargs = _conv_kwargs(old) if isinstance(old, nn.Conv2d) else _linear_kwargs(old)
    # Build on the meta device so no throw-away weights are allocated, then hand over the real Parameters.
    new = new_cls(**kwargs, **extra, device="meta")
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    new.train(old.training)
    return new


def _refuse_unsupported(module: nn.Module, name: str) -> None:
    """Raise if ``module`` carries something the swap would silently drop."""
    label = name or "<root>"
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise TypeError(f"cannot quantize {label}: it has parametrizations (e.g. weight_norm); remove them first")
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    if any(len(h) for h in hooks):
        raise TypeError(f"cannot quantize {label}: it has hooks registered; register them after quantize_")


def _swap(model: nn.Module, select: Callable[[nn.Module, str], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every selected submodule by ``make(old)``, in place; returns how many were replaced.

    A module reached through several names (shared) is replaced once, by the same new module everywhere.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError("quantize_/dequantize_ work on the bare model: apply them before wrapping it in DDP")
    if select(model, ""):
        raise TypeError(
            f"cannot swap the root module itself ({type(model).__name__}); wrap it in a container first"
        )
    replaced: dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # ``_modules`` rather than ``named_children()``, which would hide the second name of a shared module.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
            elif select(child, qualified):
                replaced[id(child)] = make(child)
                setattr(parent, child_name, replaced[id(child)])
    return len(replaced)


def quantize_(model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap, in place, the ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` for quantized ones.

    Args:
        model: any module; its submodules are replaced where they sit, Parameters are kept (same objects).
        config: which quantizer and bit width (default: 1-bit DoReFa). Layers that are already quantized are
            left as they are.
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` chooses the layers; by default every
            ``nn.Conv2d`` and ``nn.Linear``, first and last layer included, as in the paper. Returning True for
            a module that is not exactly ``nn.Conv2d``/``nn.Linear`` is an error.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: a selected module cannot be swapped (unsupported type, hooks or parametrizations), the model
            is wrapped in DDP/DataParallel, or the root module itself would need replacing.
        ValueError: nothing to quantize: no Conv2d/Linear selected and no quantized layer in ``model`` already.

    Example:
        >>> import torch.nn as nn, metaquant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> w = net[0].weight
        >>> _ = mq.quantize_(net, mq.QuantConfig("bwn"))
        >>> type(net[0]).__name__, type(net[2]).__name__, net[0].weight is w
        ('QuantConv2d', 'QuantLinear', True)
        >>> mq.quantize_(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: cannot swap the root module itself (Linear); wrap it in a container first
    """
    config = config or QuantConfig()

    def select(module: nn.Module, name: str) -> bool:
        if isinstance(module, QuantLayer):
            return False
        if filter_fn is not None:
            chosen = filter_fn(module, name)
        elif isinstance(module, tuple(_FLOAT_TO_QUANT)) and type(module) not in _FLOAT_TO_QUANT:
            # A subclass may compute with its weight elsewhere (e.g. attention's out_proj): swapping it would
            # silently change nothing, so leave it and say so. Parametrized layers are refused below.
            chosen = torch.nn.utils.parametrize.is_parametrized(module)
            if not chosen:
                logger.warning("quantize_: leaving %s (%s) in full precision", name, type(module).__name__)
        else:
            chosen = type(module) in _FLOAT_TO_QUANT
        if chosen:
            _refuse_unsupported(module, name)
        if chosen and type(module) not in _FLOAT_TO_QUANT:
            raise TypeError(
                f"cannot quantize {name or '<root>'} of type {type(module).__name__}: only nn.Conv2d and "
                "nn.Linear (exact types) are supported"
            )
        return chosen

    def make(old: nn.Module) -> nn.Module:
        return _rebuild(old, _FLOAT_TO_QUANT[type(old)], quantizer=config.forward_quantizer)

    if _swap(model, select, make) == 0 and not any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError(f"quantize_ found no nn.Conv2d or nn.Linear to quantize in {type(model).__name__}")
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: quantized layers become plain ``nn.Conv2d``/``nn.Linear`` with the same
    Parameters, so ``model.state_dict()`` is unchanged (the latent weights ``W``, not ``Ŵ``).

    A model without quantized layers is left as it is.

    Args:
        model: a module, usually one given to ``quantize_``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: the model is wrapped in DDP/DataParallel, or ``model`` is itself a quantized layer.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> before = {k: v.clone() for k, v in net.state_dict().items()}
        >>> net = mq.dequantize_(mq.quantize_(net))
        >>> type(net[0]).__name__, all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        ('Conv2d', True)
    """

    def select(module: nn.Module, name: str) -> bool:
        return type(module) in _QUANT_TO_FLOAT

    _swap(model, select, lambda old: _rebuild(old, _QUANT_TO_FLOAT[type(old)]))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of ``model`` by qualified name, in module order, each once.

    Args:
        model: any module.

    Returns:
        A new dict ``{qualified name: QuantLayer}``; a layer shared under several names appears once, under
        its first name. Empty if there is none.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> list(mq.quantized_layers(mq.quantize_(net)))
        ['0', '2']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


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
