"""Modules with several quantized weights (attention, recurrent layers): a parameter-free ``QuantWeight`` view
per weight, held by the module in its ``quantized_weights`` dict and reading the module's own Parameter."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ..quantizers import ForwardQuantizer
from .base import QuantLayer

# The attribute (a ModuleDict) in which attention and recurrent modules hold their QuantWeight views.
_VIEWS = "quantized_weights"


class QuantWeight(QuantLayer):
    """One quantized weight of a module that has several (attention's input projection, a recurrent layer's
    matrices).

    It holds no tensor: ``weight`` and ``bias`` are the owner's Parameters, read by name, so the owner's
    ``state_dict`` keeps its keys. The owner holds its views in ``owner.quantized_weights[weight_name]`` and
    computes with their ``forward_params()``; a ``QuantWeight`` is not called itself.

    Args:
        owner: the module that holds the Parameter (it is not registered as a child of the view).
        weight_name: the Parameter's attribute name in ``owner`` (e.g. ``"weight_ih_l0"``).
        bias_name: the attribute name of the bias computed with it, or ``None``.
        quantizer: the forward quantizer (default: 1-bit DoReFa).

    Example:
        >>> lstm = mq.layers.QuantLSTM(3, 4)
        >>> view = lstm.quantized_weights["weight_ih_l0"]
        >>> view.weight is lstm.weight_ih_l0, view.bias is lstm.bias_ih_l0, view.weight_location[1]
        (True, True, 'weight_ih_l0')
    """

    weight_name: str
    bias_name: str | None

    def __init__(
        self, owner: nn.Module, weight_name: str, bias_name: str | None, quantizer: ForwardQuantizer | None = None
    ) -> None:
        # set first: the quantized layer's set-up reads the weight (a quantizer with learned tensors starts from it)
        object.__setattr__(self, "_owner", owner)  # a plain reference: the owner is not a child of its view
        object.__setattr__(self, "weight_name", weight_name)
        super().__init__(quantizer=quantizer)
        self.bias_name = bias_name

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return getattr(self._owner, self.weight_name)

    @property
    def bias(self) -> Tensor | None:
        return None if self.bias_name is None else getattr(self._owner, self.bias_name)

    @property
    def weight_location(self) -> tuple[nn.Module, str]:
        owner: nn.Module = self.__dict__["_owner"]
        return owner, self.weight_name

    def extra_repr(self) -> str:
        return f"{self.weight_name}, {super().extra_repr()}"


def _views(module: nn.Module) -> dict[str, QuantWeight]:
    """The ``QuantWeight`` views of an attention or recurrent module, by weight name."""
    return module._modules[_VIEWS]._modules  # type: ignore[union-attr,return-value]


class _MultiWeight(nn.Module):
    """Base of the quantized modules with several weights: holds one ``QuantWeight`` per quantized weight."""

    float_base: ClassVar[type[nn.Module]] = nn.Module

    def _weight_names(self) -> list[tuple[str, str | None]]:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        """Set ``float_type`` and, given a quantizer, a ``QuantWeight`` for each weight that has none yet."""
        self.float_type = float_type
        if self._modules.get(_VIEWS) is None:
            self.add_module(_VIEWS, nn.ModuleDict())
        views = _views(self)
        if quantizer is not None:
            for weight_name, bias_name in self._weight_names():
                if weight_name not in views:
                    views[weight_name] = QuantWeight(self, weight_name, bias_name, quantizer)

    def quantizer_of(self, weight_name: str) -> ForwardQuantizer:
        """The quantizer of one of the module's quantized weights, by its Parameter name.

        Args:
            weight_name: e.g. ``"in_proj_weight"`` for attention, ``"weight_ih_l0"`` for a recurrent layer.

        Returns:
            That weight's ``QuantWeight``'s quantizer.

        Raises:
            KeyError: that weight is not quantized; the message lists those that are.

        Example:
            >>> mq.layers.QuantGRU(2, 3, quantizer=mq.quantizers.BWN()).quantizer_of("weight_hh_l0")
            BWN(bits=1)
        """
        views = _views(self)
        if weight_name not in views:
            raise KeyError(f"{weight_name} is not quantized; quantized: {', '.join(views) or 'none'}")
        return views[weight_name].quantizer

    def _params(self, weight_name: str, bias_name: str | None) -> tuple[Tensor, Tensor | None]:
        """``(Ŵ, bias)`` of a quantized weight, ``(W, bias)`` of one left in full precision."""
        views = _views(self)
        if weight_name in views:
            return views[weight_name].forward_params()
        return getattr(self, weight_name), None if bias_name is None else getattr(self, bias_name)
