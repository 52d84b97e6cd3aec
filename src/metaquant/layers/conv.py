"""Quantized convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` computing with ``Q(A(W))``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import QuantLayer


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
        return self._conv_forward(self.quantized_input(input), *self.forward_params())


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
        return self._conv_forward(self.quantized_input(input), *self.forward_params())


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
        return self._conv_forward(self.quantized_input(input), *self.forward_params())


def _conv_transpose(layer: Any, input: Tensor, output_size: list[int] | None, dims: int, fn: Any) -> Tensor:
    """``nn.ConvTranspose{dims}d.forward`` with the layer's ``(Ŵ, bias)``."""
    if layer.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(layer).__name__}")
    output_padding = layer._output_padding(
        input, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation
    )
    weight, bias = layer.forward_params()
    return fn(
        layer.quantized_input(input),
        weight,
        bias,
        layer.stride,
        layer.padding,
        output_padding,
        layer.groups,
        layer.dilation,
    )


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
