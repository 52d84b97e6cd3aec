"""Input quantizers: the activation quantizer a convolution or linear layer applies to its input, installed by
``quantize_`` (``QuantConfig(activations=...)``), removed by ``dequantize_``, and attached to the plain layers of
an inference model (``metaquant.export``) as a forward pre-hook.

Only layers whose forward reads a float activation get one: convolutions, transposed convolutions and linear
layers, not attention's ``out_proj`` (its attention module computes with its weight directly), recurrent layers
nor embeddings.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..activations import ActQuantConfig, ActQuantizer
from .base import INPUT_QUANTIZER
from .conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from .linear import QuantLinear

#: The quantized classes whose forward applies ``input_quantizer``.
TAKES_INPUT_QUANTIZER: tuple[type[nn.Module], ...] = (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
)


def install_input_quantizers(layers: list[nn.Module], config: ActQuantConfig) -> None:
    """Give each of ``layers`` (quantized, in module order) an ``input_quantizer``: the first one
    ``config.build_first()`` (none when it is None), the others ``config.build()``; on the layer's device."""
    for i, layer in enumerate(layers):
        quantizer = config.build_first() if i == 0 else config.build()
        if quantizer is None:
            continue
        weight: Tensor = layer.weight  # type: ignore[assignment]
        layer.add_module(INPUT_QUANTIZER, quantizer.to(device=weight.device, dtype=weight.dtype))


def remove_input_quantizer(module: nn.Module) -> None:
    """Remove ``module``'s input quantizer and, on a plain layer, the pre-hook that applied it."""
    module._modules.pop(INPUT_QUANTIZER, None)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _quantize_input:
            del module._forward_pre_hooks[key]


def input_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """``{layer name: its input quantizer}`` of the layers of ``model`` that have one, in module order."""
    return {
        name: module._modules[INPUT_QUANTIZER]
        for name, module in model.named_modules()
        if isinstance(module._modules.get(INPUT_QUANTIZER), ActQuantizer)
    }


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (module._modules[INPUT_QUANTIZER](args[0]), *args[1:])  # type: ignore[misc]


def attach_input_quantizers(model: nn.Module, quantizers: dict[str, ActQuantizer]) -> None:
    """Give the plain layers of ``model`` named in ``quantizers`` their input quantizer, applied to the first
    argument of their forward by a pre-hook (an inference model's layers are ``torch.nn`` classes)."""
    for name, quantizer in quantizers.items():
        layer = model.get_submodule(name)
        remove_input_quantizer(layer)
        layer.add_module(INPUT_QUANTIZER, quantizer)
        layer.register_forward_pre_hook(_quantize_input)
