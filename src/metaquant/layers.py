"""Quantized layers and the in-place model surgery that installs them.

``quantize_(model, QuantConfig("dorefa", bits=1))`` turns the weight layers of any module into quantized layers
(first and last layer included, as in the paper). The conversion is in place: each module keeps its identity,
Parameters, options, hooks and ``state_dict`` keys and only changes class, so an optimizer built before or after
it trains the same tensors, and ``dequantize_`` gives back the plain ``torch.nn`` classes with an identical
``state_dict``.

What is converted (``SUPPORTED`` lists the classes):

* by default: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear`` and its subclasses that keep
  Linear's forward (attention's ``out_proj``), ``nn.MultiheadAttention`` (its input projection; its
  ``out_proj`` is a Linear);
* on request, ``include=("recurrent", "embedding")``: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (every weight matrix)
  and ``nn.Embedding``/``nn.EmbeddingBag``.

Every other module that holds a weight matrix, and every supported layer left out (a subclass with its own
forward, a lazy layer not yet initialized, a layer of a kind not included), stays in full precision, and a
warning names it with the reason unless a ``filter_fn`` chose the layers. Normalization layers and biases
always stay in full precision, as in the paper.

A ``QuantLayer`` is one quantized weight and the bias that goes with it. A convolution, linear or embedding
layer is its own ``QuantLayer``; a module with several weights (attention, recurrent layers) holds one
parameter-free ``QuantWeight`` per quantized weight, in its ``quantized_weights`` dict, that reads the module's
own Parameter. ``quantized_layers`` lists them all: they are what training algorithms work on.

Every forward pass of a quantized model computes with ``Ŵ = Q(A(W))``. By default ``Ŵ`` back-propagates with
the clipped STE. A training algorithm that needs other tensors in the forward pass (MetaQuant's look-ahead
weight, another classical estimator) installs them for the duration of one forward pass, with
``forward_tensors`` or ``forward_params_fn``; outside that scope the layers hold only parameters and
configuration. The fused inference paths of ``torch.nn`` that read the latent weights directly
(``nn.MultiheadAttention``'s fast path, ``nn.TransformerEncoderLayer``'s fused layer, ``nn.TransformerEncoder``'s
nested tensors) are never taken by a quantized model: the quantized attention always computes through
``F.multi_head_attention_forward`` with its ``Ŵ``, and ``quantize_`` turns the other two off in the modules
that contain quantized layers (``dequantize_`` turns them back on).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .estimators import STE, fake_quantize
from .guards import check_requantization
from .quantizers import ForwardQuantizer, get_quantizer, quantizer_names

logger = logging.getLogger(__name__)

__all__ = [
    "QuantConfig",
    "QuantLayer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "QuantEmbedding",
    "QuantEmbeddingBag",
    "QuantWeight",
    "QuantMultiheadAttention",
    "QuantRNN",
    "QuantLSTM",
    "QuantGRU",
    "SUPPORTED",
    "INCLUDE",
    "quantize_",
    "dequantize_",
    "quantized_layers",
    "quantized_weight_keys",
    "forward_params_fn",
    "forward_tensors",
]

#: ``fn(layer) -> (weight used in the forward pass, bias used in the forward pass)``
ParamFn = Callable[["QuantLayer"], tuple[Tensor, Tensor | None]]
FilterFn = Callable[[nn.Module, str], bool]

#: The layer kinds ``quantize_`` converts only when asked, with ``include=``.
INCLUDE = ("recurrent", "embedding")
# The attribute (a ModuleDict) in which attention and recurrent modules hold their QuantWeight views.
_VIEWS = "quantized_weights"
# What quantize_ turned off in a module whose fused inference path reads its children's weights: {attr: old}.
_FUSED_OFF = "_quantized_fused_path_off"


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
    """One quantized weight: a layer whose forward uses ``Ŵ = Q(A(W))``. Holds the quantizer, no tensors of its own.

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
    float_base: ClassVar[type[nn.Module]] = nn.Module
    channel_axis: ClassVar[int] = 0

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quant_init(quantizer, self.float_base)

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        """Set the quantized layer's attributes (construction, or a module converted in place by ``quantize_``)."""
        quantizer = quantizer if quantizer is not None else QuantConfig().forward_quantizer
        self.quantizer: ForwardQuantizer = quantizer.with_channel_axis(self.channel_axis)
        self.float_type: type[nn.Module] = float_type
        # Set only inside ``forward_params_fn``; None means "Q(A(W)) with the clipped STE, and the bias".
        self.param_fn: ParamFn | None = None
        # Set only inside ``forward_tensors``: tensors computed before the forward pass, used as they are. A plain
        # attribute read (no Python callable), so that a compiled forward pass keeps one graph.
        self.param_override: tuple[Tensor, Tensor | None] | None = None

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

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return f"{own + ', ' if own else ''}quantizer={self.quantizer.name}, bits={self.quantizer.bits}"


class QuantConv1d(QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` computing with ``Q(A(W))``; every option behaves as in ``nn.Conv1d``.

    Usually made by ``quantize_``; built directly it takes ``nn.Conv1d``'s arguments plus ``quantizer=``.

    Example:
        >>> conv = mq.layers.QuantConv1d(2, 4, 3, padding=1, quantizer=mq.quantizers.BWN())
        >>> x = torch.randn(1, 2, 7)
        >>> w_hat = mq.quantizers.BWN()(conv.weight)
        >>> torch.allclose(conv(x), torch.nn.functional.conv1d(x, w_hat, conv.bias, padding=1))
        True
    """

    float_base = nn.Conv1d

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, *self.forward_params())


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

    float_base = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, *self.forward_params())


class QuantConv3d(QuantLayer, nn.Conv3d):
    """``nn.Conv3d`` computing with ``Q(A(W))``; every option behaves as in ``nn.Conv3d``.

    Usually made by ``quantize_``; built directly it takes ``nn.Conv3d``'s arguments plus ``quantizer=``.

    Example:
        >>> conv = mq.layers.QuantConv3d(1, 2, 2)
        >>> x = torch.randn(1, 1, 3, 3, 3)
        >>> torch.equal(conv(x), torch.nn.functional.conv3d(x, conv.quantizer(conv.weight), conv.bias))
        True
    """

    float_base = nn.Conv3d

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, *self.forward_params())


def _conv_transpose(layer: Any, input: Tensor, output_size: list[int] | None, dims: int, fn: Any) -> Tensor:
    """``nn.ConvTranspose{dims}d.forward`` with the layer's ``(Ŵ, bias)``."""
    if layer.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(layer).__name__}")
    output_padding = layer._output_padding(
        input, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation
    )
    weight, bias = layer.forward_params()
    return fn(input, weight, bias, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation)


class QuantConvTranspose1d(QuantLayer, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` computing with ``Q(A(W))``; every option (``output_size`` too) as in the original.

    Its weight is ``[C_in, C_out / groups, k]``: the output channels lie along axis 1 (``channel_axis``), where a
    per-channel quantizer puts its scales.

    Example:
        >>> up = mq.layers.QuantConvTranspose1d(2, 3, 4, stride=2, quantizer=mq.quantizers.BWNPerChannel())
        >>> up.quantizer, up.quantizer.encode(up.weight).scale.shape
        (BWNPerChannel(bits=1, axis=1), torch.Size([1, 3, 1]))
        >>> x = torch.randn(1, 2, 5)
        >>> torch.allclose(up(x), torch.nn.functional.conv_transpose1d(x, up.quantizer(up.weight), up.bias, stride=2))
        True
    """

    float_base = nn.ConvTranspose1d
    channel_axis = 1

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        return _conv_transpose(self, input, output_size, 1, F.conv_transpose1d)


class QuantConvTranspose2d(QuantLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computing with ``Q(A(W))``; every option (``output_size`` too) as in the original.

    Its weight is ``[C_in, C_out / groups, kH, kW]``: the output channels lie along axis 1 (``channel_axis``).

    Example:
        >>> up = mq.layers.QuantConvTranspose2d(2, 3, 2, stride=2)
        >>> x = torch.randn(1, 2, 4, 4)
        >>> expected = torch.nn.functional.conv_transpose2d(x, up.quantizer(up.weight), up.bias, stride=2)
        >>> up(x).shape, torch.equal(up(x), expected)
        (torch.Size([1, 3, 8, 8]), True)
    """

    float_base = nn.ConvTranspose2d
    channel_axis = 1

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        return _conv_transpose(self, input, output_size, 2, F.conv_transpose2d)


class QuantConvTranspose3d(QuantLayer, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computing with ``Q(A(W))``; every option (``output_size`` too) as in the original.

    Its weight is ``[C_in, C_out / groups, kD, kH, kW]``: the output channels lie along axis 1 (``channel_axis``).

    Example:
        >>> up = mq.layers.QuantConvTranspose3d(1, 2, 2, stride=2)
        >>> x = torch.randn(1, 1, 2, 2, 2)
        >>> torch.equal(up(x), torch.nn.functional.conv_transpose3d(x, up.quantizer(up.weight), up.bias, 2))
        True
    """

    float_base = nn.ConvTranspose3d
    channel_axis = 1

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        return _conv_transpose(self, input, output_size, 3, F.conv_transpose3d)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` computing with ``Q(A(W))``.

    Usually made by ``quantize_``, also from a subclass of ``nn.Linear`` that keeps Linear's forward (such as
    attention's ``out_proj``, whose class ``dequantize_`` restores); built directly it takes ``nn.Linear``'s
    arguments plus ``quantizer=``.

    Example:
        >>> layer = mq.QuantLinear(3, 2, quantizer=mq.quantizers.BWN())
        >>> layer
        QuantLinear(in_features=3, out_features=2, bias=True, quantizer=bwn, bits=1)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x @ mq.quantizers.BWN()(layer.weight).T + layer.bias)
        True
    """

    float_base = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, *self.forward_params())


def _embedding_problem(module: nn.Module) -> str | None:
    if getattr(module, "max_norm", None) is not None:
        return "max_norm renormalizes the weight in place, which a quantized weight cannot follow; use max_norm=None"
    if getattr(module, "sparse", False):
        return "sparse gradients are not supported for quantized weights; use sparse=False"
    return None


class QuantEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` looking up rows of ``Q(A(W))`` (quantized on request: ``include=("embedding",)``).

    A per-channel quantizer gives one scale per row (per embedding vector). The ``padding_idx`` row is
    quantized like the others, so it is no longer zero; its gradient stays zero as in ``nn.Embedding``.
    ``max_norm`` and ``sparse=True`` are refused: both need the latent weight itself.

    Raises:
        TypeError: ``max_norm`` is set or ``sparse=True``.

    Example:
        >>> emb = mq.layers.QuantEmbedding(10, 4)
        >>> tokens = torch.tensor([[1, 2], [3, 1]])
        >>> torch.equal(emb(tokens), emb.quantizer(emb.weight)[tokens]), emb.bias
        (True, None)
    """

    float_base = nn.Embedding
    bias = None  # an embedding has no bias; QuantLayer's interface reads one

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        problem = _embedding_problem(self)
        if problem:
            raise TypeError(f"cannot quantize an embedding: {problem}")
        super()._quant_init(quantizer, float_type)

    def forward(self, input: Tensor) -> Tensor:
        weight, _ = self.forward_params()
        return F.embedding(
            input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class QuantEmbeddingBag(QuantLayer, nn.EmbeddingBag):
    """``nn.EmbeddingBag`` reducing rows of ``Q(A(W))`` (quantized on request: ``include=("embedding",)``).

    As ``QuantEmbedding``: one scale per row for a per-channel quantizer; ``max_norm`` and ``sparse`` refused.

    Raises:
        TypeError: ``max_norm`` is set or ``sparse=True``.

    Example:
        >>> bag = mq.layers.QuantEmbeddingBag(10, 4, mode="sum")
        >>> tokens, offsets = torch.tensor([1, 2, 3, 1]), torch.tensor([0, 3])
        >>> expected = torch.stack([bag.quantizer(bag.weight)[[1, 2, 3]].sum(0), bag.quantizer(bag.weight)[1]])
        >>> torch.allclose(bag(tokens, offsets), expected)
        True
    """

    float_base = nn.EmbeddingBag
    bias = None

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        problem = _embedding_problem(self)
        if problem:
            raise TypeError(f"cannot quantize an embedding bag: {problem}")
        super()._quant_init(quantizer, float_type)

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        weight, _ = self.forward_params()
        return F.embedding_bag(
            input,
            weight,
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self.padding_idx,
        )


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

    def __init__(
        self, owner: nn.Module, weight_name: str, bias_name: str | None, quantizer: ForwardQuantizer | None = None
    ) -> None:
        super().__init__(quantizer=quantizer)
        object.__setattr__(self, "_owner", owner)  # a plain reference: the owner is not a child of its view
        self.weight_name = weight_name
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


class QuantMultiheadAttention(_MultiWeight, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computing with quantized projections, always through
    ``F.multi_head_attention_forward`` (never the fused fast path, which reads the latent weights).

    The input projection (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the
    key and value sizes differ) is quantized through ``QuantWeight`` views, the bias ``in_proj_bias`` going with
    the first; ``out_proj`` is a ``QuantLinear`` of its own. ``quantize_`` also gives this class to an attention
    module whose ``out_proj`` alone was chosen, so that its forward computes with the quantized ``out_proj``.

    Args:
        *args: ``nn.MultiheadAttention``'s arguments.
        quantizer: the forward quantizer of the projections (default: 1-bit DoReFa).
        **kwargs: ``nn.MultiheadAttention``'s keyword arguments.

    Example:
        The plain attention module holding ``Ŵ`` is the reference; under ``no_grad`` it takes its fused path, the
        quantized one cannot:

        >>> attn = mq.layers.QuantMultiheadAttention(4, 2, batch_first=True).eval()
        >>> list(attn.quantized_weights), type(attn.out_proj).__name__, attn.quantizer_of("in_proj_weight")
        (['in_proj_weight'], 'QuantLinear', DoReFa(bits=1))
        >>> plain = torch.nn.MultiheadAttention(4, 2, batch_first=True).eval()
        >>> q = mq.quantizers.DoReFa()
        >>> _ = plain.load_state_dict({k: q(v) if k.endswith("weight") else v for k, v in attn.state_dict().items()})
        >>> x = torch.randn(3, 5, 4)
        >>> with torch.no_grad():
        ...     torch.allclose(attn(x, x, x)[0], plain(x, x, x)[0], atol=1e-6)
        True
    """

    float_base = nn.MultiheadAttention

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        quantizer = quantizer if quantizer is not None else QuantConfig().forward_quantizer
        self._quant_init(quantizer, self.float_base)
        _convert(self.out_proj, QuantLinear, quantizer)

    def _weight_names(self) -> list[tuple[str, str | None]]:
        if self._qkv_same_embed_dim:
            return [("in_proj_weight", "in_proj_bias")]
        return [("q_proj_weight", "in_proj_bias"), ("k_proj_weight", None), ("v_proj_weight", None)]

    def forward(  # the slow path of nn.MultiheadAttention.forward, with the quantized projections
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            # keep the "is" relations between query, key and value, as nn.MultiheadAttention does
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out_proj = self.out_proj
        if isinstance(out_proj, QuantLayer):
            out_weight, out_bias = out_proj.forward_params()
        else:
            out_weight, out_bias = out_proj.weight, out_proj.bias
        separate: dict[str, Any] = {}
        if self._qkv_same_embed_dim:
            in_weight, in_bias = self._params("in_proj_weight", "in_proj_bias")
        else:
            q_weight, in_bias = self._params("q_proj_weight", "in_proj_bias")
            in_weight = None
            separate = dict(
                use_separate_proj_weight=True,
                q_proj_weight=q_weight,
                k_proj_weight=self._params("k_proj_weight", None)[0],
                v_proj_weight=self._params("v_proj_weight", None)[0],
            )
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_weight,
            in_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_weight,
            out_bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **separate,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights


class _QuantRecurrent(_MultiWeight):
    """A recurrent layer (``nn.RNNBase``) whose weight matrices are quantized, each through a ``QuantWeight``."""

    _flat_weights: list[Tensor | None]
    _flat_weights_names: list[str]

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quant_init(quantizer if quantizer is not None else QuantConfig().forward_quantizer, self.float_base)

    def _weight_names(self) -> list[tuple[str, str | None]]:
        names = set(self._flat_weights_names)
        pairs = []
        for name in self._flat_weights_names:
            if name.startswith("weight_"):
                bias = "bias_" + name[len("weight_") :]
                pairs.append((name, bias if bias in names else None))  # weight_hr (projection) has no bias
        return pairs

    def forward(self, input: Any, hx: Any = None) -> Any:
        # nn.RNNBase's forward computes with the list self._flat_weights: it gets the quantized weights (and the
        # biases they go with) for this call, and its own list back afterwards.
        flat = [getattr(self, name) for name in self._flat_weights_names]
        position = {name: i for i, name in enumerate(self._flat_weights_names)}
        for name, view in _views(self).items():
            weight, bias = view.forward_params()
            flat[position[name]] = weight
            if view.bias_name is not None:
                flat[position[view.bias_name]] = bias
        own = self.__dict__["_flat_weights"]
        self.__dict__["_flat_weights"] = flat
        try:
            return super().forward(input, hx)
        finally:
            self.__dict__["_flat_weights"] = own


class QuantRNN(_QuantRecurrent, nn.RNN):
    """``nn.RNN`` computing with quantized ``weight_ih_l*``/``weight_hh_l*`` (on request: ``include=("recurrent",)``).

    Example:
        >>> rnn = mq.layers.QuantRNN(3, 4, batch_first=True)
        >>> sorted(rnn.quantized_weights)
        ['weight_hh_l0', 'weight_ih_l0']
        >>> x = torch.randn(2, 5, 3)
        >>> expected = torch.nn.RNN(3, 4, batch_first=True)
        >>> _ = expected.load_state_dict({k: rnn.quantizer_of(k)(v) if "weight" in k else v
        ...                               for k, v in rnn.state_dict().items()})
        >>> torch.allclose(rnn(x)[0], expected(x)[0])
        True
    """

    float_base = nn.RNN


class QuantLSTM(_QuantRecurrent, nn.LSTM):
    """``nn.LSTM`` computing with its weight matrices quantized (``weight_ih``, ``weight_hh`` and, with
    ``proj_size``, ``weight_hr`` of every layer and direction; on request: ``include=("recurrent",)``).

    Example:
        >>> lstm = mq.layers.QuantLSTM(3, 4, num_layers=2, bidirectional=True)
        >>> len(lstm.quantized_weights), lstm(torch.randn(5, 2, 3))[0].shape
        (8, torch.Size([5, 2, 8]))
    """

    float_base = nn.LSTM


class QuantGRU(_QuantRecurrent, nn.GRU):
    """``nn.GRU`` computing with its weight matrices quantized (on request: ``include=("recurrent",)``).

    Example:
        >>> gru = mq.layers.QuantGRU(3, 4)
        >>> out, h = gru(torch.randn(5, 3))  # unbatched input, as nn.GRU takes it
        >>> out.shape, sorted(gru.quantized_weights)
        (torch.Size([5, 4]), ['weight_hh_l0', 'weight_ih_l0'])
    """

    float_base = nn.GRU


# The torch.nn classes quantize_ converts: float class -> (quantized class, kind). "default" kinds are converted
# unless a filter_fn says otherwise; the others on request (include=...).
_KINDS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.Conv1d: (QuantConv1d, "default"),
    nn.Conv2d: (QuantConv2d, "default"),
    nn.Conv3d: (QuantConv3d, "default"),
    nn.ConvTranspose1d: (QuantConvTranspose1d, "default"),
    nn.ConvTranspose2d: (QuantConvTranspose2d, "default"),
    nn.ConvTranspose3d: (QuantConvTranspose3d, "default"),
    nn.Linear: (QuantLinear, "default"),
    nn.MultiheadAttention: (QuantMultiheadAttention, "default"),
    nn.RNN: (QuantRNN, "recurrent"),
    nn.LSTM: (QuantLSTM, "recurrent"),
    nn.GRU: (QuantGRU, "recurrent"),
    nn.Embedding: (QuantEmbedding, "embedding"),
    nn.EmbeddingBag: (QuantEmbeddingBag, "embedding"),
}
#: ``{torch.nn class: (quantized class, kind)}``: what ``quantize_`` converts; ``kind`` is ``"default"`` or one
#: of ``INCLUDE``. Subclasses of these classes are converted too when they keep the class's forward.
SUPPORTED: dict[type[nn.Module], tuple[type[nn.Module], str]] = dict(_KINDS)
_QUANT_CLASSES = tuple({quant for quant, _ in _KINDS.values()})
# Modules whose own Parameters are not weights to quantize, even when they have two dimensions.
_NOT_WEIGHTS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.PReLU,
)


def _convert(module: nn.Module, cls: type[nn.Module], quantizer: ForwardQuantizer | None) -> None:
    """Give ``module`` the quantized class ``cls``, in place; its state, Parameters and hooks stay."""
    float_type = type(module)
    module.__class__ = cls
    try:
        module._quant_init(quantizer, float_type)  # type: ignore[operator]
    except BaseException:
        module.__class__ = float_type
        raise


def _restore(module: nn.Module) -> None:
    """Undo ``_convert``: the module's own class again, without the quantized layer's attributes."""
    # a module saved whole by an earlier metaquant has no float_type: its class's torch.nn class then
    module.__class__ = module.__dict__.get("float_type", type(module).float_base)  # type: ignore[attr-defined,assignment]
    for attr in ("quantizer", "float_type", "param_fn", "param_override"):
        module.__dict__.pop(attr, None)
    module._modules.pop(_VIEWS, None)


def _float_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported ``torch.nn`` class ``module`` is an instance of (its nearest), or None."""
    return next((base for base in type(module).__mro__ if base in _KINDS), None)


def _holds_weights(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds a Parameter of two or more dimensions to speak of."""
    if isinstance(module, _NOT_WEIGHTS):
        return False
    return any(p is not None and p.dim() >= 2 for p in module._parameters.values())


def _problem(module: nn.Module, base: type[nn.Module]) -> tuple[str | None, bool]:
    """Why ``module`` (an instance of the supported ``base``) cannot be converted, and whether that is an error
    even when ``quantize_`` chose it by default (rather than a reason to leave it in full precision)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "it has parametrizations (e.g. weight_norm); remove them first", True
    hook = _weight_hook(module)
    if hook:
        return hook, True
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "it is a lazy layer not initialized yet; run one forward pass before quantize_", False
    if type(module).forward is not base.forward and not isinstance(module, _MultiWeight):
        return f"its class overrides {base.__name__}.forward, which may not compute with the quantized weight", False
    if base in (nn.Embedding, nn.EmbeddingBag):
        problem = _embedding_problem(module)
        if problem:
            return problem, True
    return None, False


def _weight_hook(module: nn.Module, names: tuple[str, ...] | None = None) -> str | None:
    """Why a weight of ``module`` (any, or those in ``names``) cannot be quantized if a forward pre-hook recomputes
    it from other Parameters (``torch.nn.utils.prune``, the older ``weight_norm`` and ``spectral_norm``), else None:
    the quantized forward would read the tensor the hook made before the last update, and the optimizer would
    train the hook's inputs."""

    removals = (
        (prune.BasePruningMethod, "torch.nn.utils.prune", "torch.nn.utils.prune.remove(module, {!r})"),
        (WeightNorm, "torch.nn.utils.weight_norm", "torch.nn.utils.remove_weight_norm(module, {!r})"),
        (SpectralNorm, "torch.nn.utils.spectral_norm", "torch.nn.utils.remove_spectral_norm(module, {!r})"),
    )
    for hook in module._forward_pre_hooks.values():
        for kind, made_by, remove in removals:
            name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", "weight")
            if isinstance(hook, kind) and (names is None or name in names):
                return (
                    f"its {name} is recomputed before each forward pass by {made_by}, which a quantized layer "
                    f"cannot follow; call {remove.format(name)} first"
                )
    return None


def check_weight_hooks(model: nn.Module) -> None:
    """Refuse a model whose quantized layer has its weight recomputed by a forward pre-hook (pruning, the older
    ``weight_norm``/``spectral_norm``, applied after ``quantize_``): its training would use stale weights.

    Raises:
        TypeError: such a layer; the message names it and how to remove the hook.
    """
    for name, layer in quantized_layers(model).items():
        owner, weight_name = layer.weight_location  # an attention or recurrent weight's hook sits on its owner
        problem = _weight_hook(owner, (weight_name,))
        if problem:
            raise TypeError(f"quantized layer {name or '<root>'} ({type(layer).__name__}): {problem}")


def _check_include(include: Iterable[str]) -> set[str]:
    if isinstance(include, str):
        include = (include,)
    kinds = tuple(include) if isinstance(include, Iterable) else None
    if kinds is None or not all(isinstance(k, str) for k in kinds):
        raise TypeError(f"include must be layer kind names ({', '.join(INCLUDE)}), got {include!r:.80}")
    chosen = set(kinds)
    unknown = sorted(k for k in chosen if k not in INCLUDE)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"include: unknown layer kind(s) {names}; allowed: {', '.join(INCLUDE)}")
    return chosen


def _refuse_wrapped(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} ({model!r:.80})")
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError("quantize_/dequantize_ work on the bare model: apply them before wrapping it in DDP")


def _check_arguments(config: object, filter_fn: object) -> None:
    """``quantize_``'s arguments of the wrong type, named (typed ``object``: untyped callers pass anything)."""
    if config is not None and not isinstance(config, QuantConfig):
        hint = f", e.g. QuantConfig({config!r})" if isinstance(config, str) else ""
        raise TypeError(f"config must be a QuantConfig or None, got {type(config).__name__} {config!r:.80}{hint}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            f"filter_fn must be callable as filter_fn(module, qualified_name) -> bool, got {filter_fn!r:.80}"
        )


def _describe(entries: list[tuple[str, nn.Module, str]]) -> str:
    return "; ".join(f"{name or '<root>'} ({type(module).__name__}): {why}" for name, module, why in entries)


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    include: Iterable[str] = (),
) -> nn.Module:
    """Convert, in place, the weight layers of ``model`` into quantized layers.

    Without ``filter_fn``: every supported layer of a default kind (convolutions, transposed convolutions,
    linear layers, multi-head attention), plus the kinds named in ``include``. A module holding a weight that
    stays in full precision (an unsupported type, a layer of a kind not included, a subclass with its own
    forward, a lazy layer not initialized yet) is named in one warning, with the reason; an INFO log line
    summarizes what was converted. With ``filter_fn``, exactly the modules it chooses are converted, and
    choosing one that cannot be is an error.

    Attention modules and ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` that contain quantized
    layers never take their fused inference paths afterwards (see the module's description).

    Args:
        model: any module; its submodules are converted where they sit (same objects, same Parameters).
        config: which quantizer and bit width (default: 1-bit DoReFa). Layers that are already quantized are
            left as they are; a per-channel quantizer is set to each layer's output-channel axis.
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` chooses the layers among every module of
            ``model``, whatever its kind, first and last layer included. Attention's ``out_proj`` is a module of
            its own: choosing it alone quantizes that projection (its attention module then computes with it).
        include: kinds converted besides the default ones when there is no ``filter_fn``: ``"recurrent"``
            (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) and ``"embedding"`` (``nn.Embedding``, ``nn.EmbeddingBag``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, ``config`` not a ``QuantConfig``, ``filter_fn`` not callable or
            ``include`` not kind names; a chosen module cannot be converted (unsupported type, parametrizations,
            a weight that a forward pre-hook recomputes, a subclass with its own forward, an embedding with
            ``max_norm`` or ``sparse``), the model is wrapped in DDP/DataParallel,
            or the root module itself would need converting. Nothing is changed then.
        ValueError: ``include`` names an unknown kind or comes with a ``filter_fn``; or nothing to quantize (no
            layer chosen and no quantized layer in ``model`` already; the message says what was left and why).

    Example:
        >>> import torch.nn as nn, metaquant as mq
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> w = net[0].weight
        >>> _ = mq.quantize_(net, mq.QuantConfig("bwn"))
        >>> type(net[0]).__name__, type(net[2]).__name__, net[0].weight is w
        ('QuantConv1d', 'QuantLinear', True)
        >>> rnn = nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 4))
        >>> list(mq.quantized_layers(mq.quantize_(rnn, include=("recurrent", "embedding"))))
        ['0', '1.quantized_weights.weight_ih_l0', '1.quantized_weights.weight_hh_l0']
        >>> mq.quantize_(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: cannot swap the root module itself (Linear); wrap it in a container first
    """
    _check_arguments(config, filter_fn)
    asked = config  # an explicit config must agree with the layers quantized already
    config = config or QuantConfig()
    kinds = _check_include(include)
    if kinds and filter_fn is not None:
        raise ValueError("pass include= or filter_fn=, not both: filter_fn alone chooses among every layer kind")
    _refuse_wrapped(model)
    modules = list(model.named_modules())
    # attention's out_proj is computed by its attention module's forward: it can be quantized only if that
    # forward is nn.MultiheadAttention's (which quantize_ replaces) or already the quantized one
    attention_of = {id(m.out_proj): m for _, m in modules if isinstance(m, nn.MultiheadAttention)}
    chosen: list[tuple[str, nn.Module, type[nn.Module]]] = []
    unasked: list[tuple[str, nn.Module, str]] = []  # left in full precision without being told to
    declined: list[tuple[str, nn.Module, str]] = []  # left in full precision by filter_fn
    for name, module in modules:
        if isinstance(module, QuantLayer):
            if asked is not None and (filter_fn is None or filter_fn(module, name)):
                # quantized already: asking for another quantizer must not silently keep the first one
                # (compared as the layer would hold it: a per-channel quantizer on the layer's channel axis)
                requested = config.forward_quantizer.with_channel_axis(module.channel_axis)
                check_requantization(name or "<root>", module.quantizer, requested)
            continue
        if isinstance(module, _MultiWeight) and _views(module):
            continue  # quantized already (an attention module with a quantized out_proj only may gain views)
        base = _float_base(module)
        label = name or "<root>"
        if filter_fn is not None and not filter_fn(module, name):
            if base is not None or _holds_weights(module):
                declined.append((name, module, "not chosen by filter_fn"))
            continue
        if base is None:
            if filter_fn is not None:
                supported = ", ".join(cls.__name__ for cls in _KINDS)
                raise TypeError(
                    f"cannot quantize {label} of type {type(module).__name__}: quantize_ supports {supported} "
                    "(and their subclasses that keep their forward)"
                )
            if _holds_weights(module):
                unasked.append((name, module, "not a layer type quantize_ supports"))
            continue
        kind = _KINDS[base][1]
        if filter_fn is None and kind != "default" and kind not in kinds:
            # not asked for: left in full precision whatever would stop its conversion
            unasked.append((name, module, f"{kind} layers are quantized on request: include=({kind!r},)"))
            continue
        problem, fatal = _problem(module, base)
        attention = attention_of.get(id(module))
        if problem is None and attention is not None and not isinstance(attention, QuantMultiheadAttention):
            if type(attention).forward is not nn.MultiheadAttention.forward:
                problem = f"its attention module's class ({type(attention).__name__}) has its own forward"
        if problem is not None:
            if fatal or filter_fn is not None:
                raise TypeError(f"cannot quantize {label} ({type(module).__name__}): {problem}")
            unasked.append((name, module, problem))
            continue
        if not name:
            raise TypeError(
                f"cannot swap the root module itself ({type(module).__name__}); wrap it in a container first"
            )
        chosen.append((name, module, base))

    for _, module, base in chosen:
        if isinstance(module, _MultiWeight):
            module._quant_init(config.forward_quantizer, module.float_type)
        else:
            _convert(module, _KINDS[base][0], config.forward_quantizer)
    # An attention module whose out_proj alone was chosen must compute with it: its forward becomes the quantized
    # one, its input projection staying in full precision.
    for _, module in modules:
        if isinstance(module, QuantLayer) and id(module) in attention_of:
            attention = attention_of[id(module)]
            if not isinstance(attention, QuantMultiheadAttention):
                _convert(attention, QuantMultiheadAttention, None)
    _turn_off_fused_paths(model)

    quantized = quantized_layers(model)
    if unasked:
        logger.warning("quantize_: left in full precision: %s", _describe(unasked))
    if not chosen and not quantized:
        left = f" (left in full precision: {_describe(unasked + declined)})" if unasked or declined else ""
        raise ValueError(f"quantize_ found no layer to quantize in {type(model).__name__}{left}")
    counts: dict[str, int] = {}
    for _, module, _ in chosen:
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    logger.info(
        "quantize_: %d module(s) converted (%s), %d quantized weight(s) in the model%s",
        len(chosen),
        ", ".join(f"{n} {t}" for t, n in counts.items()) or "none",
        len(quantized),
        f"; left in full precision: {_describe(unasked + declined)}" if unasked or declined else "",
    )
    return model


def _turn_off_fused_paths(model: nn.Module) -> None:
    """In every TransformerEncoderLayer/TransformerEncoder holding quantized layers, turn off the fused path that
    would read the latent weights (the fused encoder layer; the nested-tensor encoder), remembering the values."""
    for module in model.modules():
        fused = isinstance(module, nn.TransformerEncoderLayer | nn.TransformerEncoder)
        if not fused or _FUSED_OFF in module.__dict__ or not any(isinstance(m, QuantLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            # read only by the fused path's conditions: 0 sends every call through the layer's modules
            saved = {"activation_relu_or_gelu": module.activation_relu_or_gelu}
            module.activation_relu_or_gelu = 0
        else:
            saved = {"use_nested_tensor": getattr(module, "use_nested_tensor", False)}
            module.use_nested_tensor = False  # type: ignore[assignment]
        module.__dict__[_FUSED_OFF] = saved


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: quantized layers get their own ``torch.nn`` class back (e.g. ``nn.Conv2d``,
    or attention's ``NonDynamicallyQuantizableLinear``) with the same Parameters, so ``model.state_dict()`` is
    unchanged (the latent weights ``W``, not ``Ŵ``), and the fused inference paths are allowed again.

    A model without quantized layers is left as it is.

    Args:
        model: a module, usually one given to ``quantize_``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, is wrapped in DDP/DataParallel, or is itself a quantized layer.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> before = {k: v.clone() for k, v in net.state_dict().items()}
        >>> net = mq.dequantize_(mq.quantize_(net))
        >>> type(net[0]).__name__, all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        ('Conv2d', True)
    """
    _refuse_wrapped(model)
    if isinstance(model, QuantLayer | _MultiWeight):
        raise TypeError(f"cannot swap the root module itself ({type(model).__name__}); wrap it in a container first")
    for module in list(model.modules()):
        saved = module.__dict__.pop(_FUSED_OFF, None)
        if saved:
            for attr, value in saved.items():
                setattr(module, attr, value)
        if isinstance(module, _MultiWeight) or isinstance(module, QuantLayer) and not isinstance(module, QuantWeight):
            _restore(module)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of ``model`` (one per quantized weight) by qualified name, in module order, each once.

    Args:
        model: any module.

    Returns:
        A new dict ``{qualified name: QuantLayer}``; a layer shared under several names appears once, under
        its first name. A weight of an attention or recurrent module appears as its ``QuantWeight``, named
        ``<module>.quantized_weights.<parameter name>``. Empty if there is none.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> list(mq.quantized_layers(mq.quantize_(net)))
        ['0', '2']
        >>> attn = torch.nn.Sequential(torch.nn.MultiheadAttention(4, 2))
        >>> list(mq.quantized_layers(mq.quantize_(attn)))
        ['0.out_proj', '0.quantized_weights.in_proj_weight']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantized_weight_keys(model: nn.Module) -> dict[str, QuantLayer]:
    """The ``state_dict`` keys of ``model`` that hold a quantized layer's latent weight, with the layer.

    A module reached under several names (shared) has a key under each, as in ``state_dict``; a Parameter tied
    between a quantized layer and a layer left in full precision has only the quantized layer's key here.

    Args:
        model: any module.

    Returns:
        A new dict ``{state_dict key: QuantLayer}``, in ``state_dict`` order.

    Example:
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GRU(3, 3)), include=("recurrent",))
        >>> list(mq.layers.quantized_weight_keys(net))
        ['0.weight', '1.weight_ih_l0', '1.weight_hh_l0']
    """
    found: dict[str, QuantLayer] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantWeight):
            owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
            found[f"{owner}.{module.weight_name}" if owner else module.weight_name] = module
        elif isinstance(module, QuantLayer):
            found[f"{name}.weight" if name else "weight"] = module
    order = {key: i for i, key in enumerate(model.state_dict(keep_vars=True))}
    return dict(sorted(((k, v) for k, v in found.items() if k in order), key=lambda kv: order[kv[0]]))


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
