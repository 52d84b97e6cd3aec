"""The quantized layer: its configuration (``QuantConfig``), the interface every quantized weight has
(``QuantLayer``), and the in-place class swap that turns a ``torch.nn`` layer into its quantized class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..activations import ActQuantConfig
from ..estimators import STE, fake_quantize
from ..quantizers import ForwardQuantizer, get_quantizer, quantizer_names

#: ``fn(layer) -> (weight used in the forward pass, bias used in the forward pass)``
ParamFn = Callable[["QuantLayer"], tuple[Tensor, Tensor | None]]
#: The child module through which a layer quantizes its input (``QuantConfig(activations=...)``).
INPUT_QUANTIZER = "input_quantizer"
#: A layer holds each tensor its quantizer learns (``ForwardQuantizer.learned``) as the Parameter ``weight_<name>``.
LEARNED_PREFIX = "weight_"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize weights (a forward quantizer by name and its bit width) and, optionally, activations.

    Args:
        quantizer: one of ``metaquant.quantizers.quantizer_names()`` (``dorefa``, ``bwn``, ``bwn-channel``,
            ``ternary``, ``uniform``, ``uniform-channel``, ``uniform-group``).
        bits: the bit width; each quantizer states the widths it supports.
        activations: the input quantizer of every converted convolution and linear layer, or None (weights only).
        group_size: the weights per scale of ``uniform-group`` (None: its default, 128); only with it.

    Attributes:
        forward_quantizer: the ``ForwardQuantizer`` built from ``quantizer`` and ``bits`` (not an argument).

    Raises:
        ValueError: unknown quantizer or unsupported bit width; the message names the allowed values. A
            ``group_size`` that is not an integer >= 1, or one given with another quantizer.
        TypeError: ``quantizer`` is not a string, ``bits`` not an ``int``, ``activations`` not an ``ActQuantConfig``.

    Example:
        >>> mq.QuantConfig("bwn-f").forward_quantizer
        BWNPerChannel(bits=1)
        >>> mq.QuantConfig("uniform-group", 4, group_size=64).forward_quantizer  # for Linear layers (filter_fn)
        UniformPerGroup(bits=4, group_size=64)
        >>> mq.QuantConfig("ternary")
        Traceback (most recent call last):
        ...
        ValueError: quantizer 'ternary' does not support bits=1; allowed: 2
    """

    quantizer: str = "dorefa"
    bits: int = 1
    activations: ActQuantConfig | None = None
    group_size: int | None = None
    forward_quantizer: ForwardQuantizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, str):
            raise TypeError(f"quantizer must be a name ({', '.join(quantizer_names())}), got {self.quantizer!r}")
        if self.activations is not None and not isinstance(self.activations, ActQuantConfig):
            raise TypeError(f"activations must be an ActQuantConfig or None, got {self.activations!r:.80}")
        quantizer = get_quantizer(self.quantizer, self.bits, group_size=self.group_size)
        object.__setattr__(self, "forward_quantizer", quantizer)


class QuantLayer(nn.Module):
    """One quantized weight: a layer whose forward uses ``Ŵ = Q(A(W))``. Holds the quantizer and the tensors it
    learns (``LSQ``'s ``weight_step``), no others of its own.

    Listed first among the bases of the quantized layer classes; ``isinstance(m, QuantLayer)`` is how the
    library finds quantized weights. ``weight`` is the latent weight ``W`` and ``bias`` the bias computed with
    it (``None`` if there is none); ``param_fn`` and ``param_override`` are ``None`` except inside
    ``forward_params_fn`` and ``forward_tensors``.

    Args:
        *args: the wrapped layer's arguments (e.g. ``in_features, out_features``).
        quantizer: the forward quantizer (default: 1-bit DoReFa); it may be shared between layers. A per-channel
            quantizer is set to the layer's output-channel axis (``channel_axis``).
        **kwargs: the wrapped layer's keyword arguments (``bias``, ``stride``, ``device``...).

    Attributes:
        float_base: (class) the ``torch.nn`` class the quantized class stands for.
        channel_axis: (class) the weight's output-channel dimension: 0, or 1 for transposed convolutions.
        float_type: the class the module had before ``quantize_`` (``dequantize_`` restores it).

    Example:
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> layer = net[0]
        >>> isinstance(layer, mq.layers.QuantLayer), layer.quantizer
        (True, DoReFa(bits=1))
        >>> w_hat, bias = layer.forward_params()
        >>> torch.equal(w_hat, layer.quantizer(layer.weight)), bias is layer.bias
        (True, True)
    """

    weight: Tensor
    _quantizer: ForwardQuantizer  # as configured; ``quantizer`` binds it to the layer's learned Parameters
    float_base: ClassVar[type[nn.Module]] = nn.Module
    channel_axis: ClassVar[int] = 0

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quant_init(quantizer, self.float_base)

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        """Set the quantized layer's attributes (construction, or a module converted in place by ``quantize_``)."""
        self.quantizer = quantizer if quantizer is not None else QuantConfig().forward_quantizer
        self.float_type: type[nn.Module] = float_type
        # Set only inside ``forward_params_fn``; None means "Q(A(W)) with the clipped STE, and the bias".
        self.param_fn: ParamFn | None = None
        # Set only inside ``forward_tensors``: tensors computed before the forward pass, used as they are. A plain
        # attribute read (no Python callable), so that a compiled forward pass keeps one graph.
        self.param_override: tuple[Tensor, Tensor | None] | None = None

    @property
    def quantizer(self) -> ForwardQuantizer:
        """The layer's forward quantizer, bound to the layer's learned Parameters (``weight_step`` for ``LSQ``)."""
        spec = self.configured_quantizer
        if not spec.learned:
            return spec
        return spec.bind({name: self._parameters[LEARNED_PREFIX + name] for name in spec.learned})  # type: ignore[misc]

    @quantizer.setter
    def quantizer(self, quantizer: ForwardQuantizer) -> None:
        """Quantize with ``quantizer``'s configuration from now on, set to the layer's channel axis. The learned
        tensors it needs keep their values for the same configuration; for another they start from the weight
        (``initial_learned``): in place where the shape is the same, so that an optimizer holding them keeps
        training them, else as new Parameters (build the optimizer again). Those it does not need are removed."""
        quantizer = quantizer.unbound().with_channel_axis(self.channel_axis)
        weight = self.weight.detach()
        first = quantizer.initial_learned(weight)
        old = self.__dict__.get("_quantizer") or self.__dict__.get("quantizer")
        for name in old.learned if old is not None else ():
            if name not in first:
                del self._parameters[LEARNED_PREFIX + name]
        for name, value in first.items():
            held = self._parameters.get(LEARNED_PREFIX + name)
            if held is None or held.shape != value.shape:
                self.register_parameter(LEARNED_PREFIX + name, nn.Parameter(value.to(weight.dtype)))
            elif old != quantizer:
                with torch.no_grad():
                    held.copy_(value)
        self.__dict__["_quantizer"] = quantizer
        self.__dict__.pop("quantizer", None)  # a layer saved whole by an earlier metaquant held it there

    @property
    def configured_quantizer(self) -> ForwardQuantizer:
        """The quantizer as configured (``quantizer`` without the layer's learned Parameters bound to it)."""
        # (a layer saved whole by an earlier metaquant holds it as ``quantizer``)
        return self.__dict__.get("_quantizer") or self.__dict__["quantizer"]

    @property
    def weight_location(self) -> tuple[nn.Module, str]:
        """``(module, attribute)`` holding the latent weight as a Parameter: ``(self, "weight")`` for a layer,
        the owner and the Parameter's name for a ``QuantWeight``."""
        return self, "weight"

    def forward_params(self) -> tuple[Tensor, Tensor | None]:
        """``(Ŵ, bias)`` for this forward pass.

        Returns:
            The tensors given to ``forward_tensors``, inside it; ``param_fn(self)`` inside ``forward_params_fn``;
            otherwise ``fake_quantize(weight, quantizer, STE())``
            (value ``Q(A(W))``, clipped-STE gradient) and the bias (``None`` if the layer has none).
        """
        if self.param_override is not None:
            return self.param_override
        if self.param_fn is not None:
            return self.param_fn(self)
        bias: Tensor | None = self.bias  # type: ignore[assignment]
        return fake_quantize(self.weight, self.quantizer, STE()), bias

    def quantized_input(self, input: Tensor) -> Tensor:
        """``input`` through the layer's ``input_quantizer`` if it has one (convolutions and linear layers)."""
        quantizer = self._modules.get(INPUT_QUANTIZER)
        return input if quantizer is None else quantizer(input)

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return f"{own + ', ' if own else ''}quantizer={self.quantizer.name}, bits={self.quantizer.bits}"


def _convert(module: nn.Module, cls: type[nn.Module], quantizer: ForwardQuantizer | None) -> None:
    """Give ``module`` the quantized class ``cls``, in place; its state, Parameters and hooks stay."""
    float_type = type(module)
    module.__class__ = cls
    try:
        module._quant_init(quantizer, float_type)  # type: ignore[operator]
    except BaseException:
        module.__class__ = float_type
        raise
