"""The input quantizers of the network the ONNX export traces: LSQ and PACT as ``QuantizeLinear`` followed by
``DequantizeLinear`` (one operator, ``metaquant::quantize_activation``, that the exporter translates), sign as
``Where(x >= 0, 1, Where(x < 0, -1, x))`` (ONNX's ``Sign`` gives 0 at 0, ours +1; NaN stays NaN)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..activations import LSQActivation, PACTActivation, SignActivation
from ..layers import input_quantizers
from ..layers.base import INPUT_QUANTIZER

# ONNX integer types for QuantizeLinear: (name, lowest, highest, first opset that has it), smallest first
_TYPES = (("UINT4", 0, 15, 21), ("INT4", -8, 7, 21), ("UINT8", 0, 255, 10), ("INT8", -128, 127, 10))


def activation_type(q_min: int, q_max: int, opset: int) -> tuple[str, bool]:
    """The ONNX integer type of the levels ``[q_min, q_max]``: one whose range is exactly that, else UINT8/INT8
    after a ``Clip`` (onnxruntime fuses Clip with QuantizeLinear for 8-bit types only); and whether to clip."""
    exact = next((n for n, lo, hi, since in _TYPES if since <= opset and (lo, hi) == (q_min, q_max)), None)
    return (exact, False) if exact is not None else ("UINT8" if q_min >= 0 else "INT8", True)


@functools.cache
def quantize_activation_op() -> Any:
    """``metaquant::quantize_activation(x, scale, q_min, q_max)``: ``clip(round(x/scale), q_min, q_max)·scale``."""
    if hasattr(torch.ops.metaquant, "quantize_activation"):  # registered by an earlier import of this module
        return torch.ops.metaquant.quantize_activation.default

    @torch.library.custom_op("metaquant::quantize_activation", mutates_args=())
    def quantize_activation(x: Tensor, scale: Tensor, q_min: int, q_max: int) -> Tensor:
        return torch.clamp(torch.round(x / scale), q_min, q_max) * scale

    @quantize_activation.register_fake
    def _(x: Tensor, scale: Tensor, q_min: int, q_max: int) -> Tensor:
        return torch.empty_like(x)

    return torch.ops.metaquant.quantize_activation.default


def quantize_activation_translation(opset: int) -> Any:
    """The ONNX translation of ``metaquant::quantize_activation``: [``Clip``,] ``QuantizeLinear``,
    ``DequantizeLinear``, the levels in the smallest integer type of ``opset`` that holds them."""
    import onnx
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def quantize_activation(x: Any, scale: Any, q_min: int, q_max: int) -> Any:
        name, clip = activation_type(q_min, q_max, opset)
        zero = op.Constant(value=onnx.helper.make_tensor("zero_point", getattr(onnx.TensorProto, name), [], [0]))
        if clip:
            x = op.Clip(x, op.Mul(scale, float(q_min)), op.Mul(scale, float(q_max)))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)

    return quantize_activation


class _QDQ(nn.Module):
    """An LSQ or PACT input quantizer as ``quantize_activation`` (inference: its learned scale fixed)."""

    scale: Tensor

    def __init__(self, scale: float, q_min: int, q_max: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.q_min, self.q_max = q_min, q_max

    def forward(self, x: Tensor) -> Tensor:
        return quantize_activation_op()(x, self.scale, self.q_min, self.q_max)


class _Sign(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, 1.0, torch.where(x < 0, -1.0, x))  # as SignActivation: NaN stays NaN


def export_activations_(inference: nn.Module) -> dict[str, str]:
    """Replace, in place, the input quantizers of an inference model (``materialize``) by the modules the ONNX
    exporter writes as Q/DQ (LSQ, PACT) or ``Where`` (sign); returns ``{layer: kind}``.

    Raises:
        ValueError: an input quantizer of another class; the message names the layer.
    """
    done = {}
    for name, quantizer in input_quantizers(inference).items():
        layer = inference.get_submodule(name)
        if isinstance(quantizer, LSQActivation | PACTActivation):
            layer._modules[INPUT_QUANTIZER] = _QDQ(*quantizer.integer_form())
        elif isinstance(quantizer, SignActivation):
            layer._modules[INPUT_QUANTIZER] = _Sign()
        else:
            raise ValueError(
                f"export_onnx: the input quantizer of {name} ({type(quantizer).__name__}) has no ONNX form; "
                "supported: LSQActivation, PACTActivation, SignActivation"
            )
        done[name] = quantizer.name
    return done
