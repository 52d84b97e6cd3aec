"""The network the ONNX export traces: ``materialize(model)`` in float32, each quantized weight computed from its
integer levels by one dequantize operator, which the exporter writes as ``DequantizeLinear``.

Computing the weight in the traced network (rather than storing ``Ŵ`` and finding it in the exported graph) keeps
every quantized weight an integer initializer whatever the exporter does with it: transposed for a Linear on 3-D
inputs, split into an attention module's projections, reordered into an ONNX LSTM's gates, tied between layers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layers import quantized_weight_keys
from ..quantizers import Encoded
from .inference import materialize

logger = logging.getLogger(__name__)

# ONNX integer types for DequantizeLinear: (name, bits, lowest, highest, first opset that has it)
ONNX_INTS = (
    ("INT2", 2, -2, 1, 25),
    ("INT4", 4, -8, 7, 21),
    ("INT8", 8, -128, 127, 13),
    ("INT16", 16, -32768, 32767, 21),
)


def levels(encoded: Encoded, bits: int) -> Tensor:
    """The quantized weight's integer levels ``q``, symmetric around 0, with ``Ŵ = q · s`` per scale group.

    Unsigned codes ``n`` of ``k`` bits (DoReFa, BWN) sit symmetrically around their midpoint, so ``q = 2n − (2^k
    − 1)`` (BWN: ``±1``; DoReFa: odd integers, ``s = 1 / (2^k − 1)``); signed codes (ternary, uniform) are
    ``q`` already. ``export_onnx`` stores ``q`` and checks ``Ŵ = q · s``.

    Args:
        encoded: a weight's codes and scale(s) (``ForwardQuantizer.encode``).
        bits: the quantizer's bit width.

    Returns:
        ``int32`` tensor of the codes' shape.

    Example:
        >>> from metaquant.export import levels
        >>> q = mq.quantizers.DoReFa(bits=2)
        >>> w = torch.tensor([-3.0, -0.1, 0.2, 3.0])
        >>> levels(q.encode(w), 2).tolist(), (q(w) * 3).round().tolist()  # Ŵ = q / 3, up to float rounding
        ([-3, -1, 1, 3], [-3.0, -1.0, 1.0, 3.0])
    """
    codes = encoded.codes.to(torch.int32)
    return codes if encoded.codes.dtype == torch.int8 else 2 * codes - (2**bits - 1)


def onnx_int_type(low: int, high: int, opset: int) -> str | None:
    """The smallest ONNX integer type of ``opset`` that holds ``[low, high]``, or None."""
    return next((name for name, _, lo, hi, since in ONNX_INTS if since <= opset and lo <= low and high <= hi), None)


#: The first opset whose ``DequantizeLinear`` takes ``block_size`` (one scale per group of weights).
BLOCK_OPSET = 21


def _dequantize(q: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
    if block_size:  # blocked: scale [..., ceil(D / B), ...] along axis, each repeated over its block of B
        scale = scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, q.shape[axis])
        return q.to(torch.float32) * scale
    shape = [1] * q.dim()
    if scale.dim():
        shape[axis] = -1
    return q.to(torch.float32) * scale.reshape(shape)


@functools.cache
def dequantize_op() -> Any:
    """``metaquant::dequantize_linear(levels, scale, axis, block_size)``: ``levels · scale`` along ``axis`` (per
    block of ``block_size`` when it is not 0), in float32; an operator of its own so that the exporter writes it as
    one ``DequantizeLinear`` (registered on first use)."""
    if hasattr(torch.ops.metaquant, "dequantize_linear"):  # registered by an earlier import of this module
        return torch.ops.metaquant.dequantize_linear.default

    @torch.library.custom_op("metaquant::dequantize_linear", mutates_args=())
    def dequantize_linear(levels: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
        return _dequantize(levels, scale, axis, block_size)

    @dequantize_linear.register_fake
    def _(levels: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
        return levels.new_empty(levels.shape, dtype=torch.float32)

    return torch.ops.metaquant.dequantize_linear.default


class _Dequantize(nn.Module):
    """A parametrization that replaces a weight by ``levels · scale`` (it ignores the tensor it is given)."""

    levels: Tensor
    scale: Tensor

    def __init__(self, q: Tensor, scale: Tensor, axis: int, block_size: int = 0) -> None:
        super().__init__()
        self.register_buffer("levels", q.to(torch.int8 if q.abs().max() <= 127 else torch.int16))
        self.register_buffer("scale", scale)
        self.axis = axis
        self.block_size = block_size

    def forward(self, _: Tensor) -> Tensor:
        return dequantize_op()(self.levels, self.scale, self.axis, self.block_size)

    def same_levels(self, other: _Dequantize) -> bool:
        same_axis = (self.axis, self.block_size) == (other.axis, other.block_size)
        return same_axis and self.holds(other.levels.numpy(), other.scale.numpy())

    def holds(self, q: Any, scale: Any) -> bool:
        """Whether the arrays ``q`` and ``scale`` (or None) are this weight's levels and scale."""
        return (
            q is not None
            and scale is not None
            and q.shape == tuple(self.levels.shape)
            and bool((q == self.levels.numpy()).all())
            and scale.shape == tuple(self.scale.shape)
            and bool((scale == self.scale.numpy()).all())
        )


@dataclass
class QuantizedWeight:
    """One quantized weight of the traced network: its ``state_dict`` keys (several when tied) and its levels."""

    keys: list[str]
    module: _Dequantize


def _scales(w_hat: Tensor, q: Tensor, axis: int | None) -> Tensor | None:
    """The float32 ``s`` (one, or one per slice along ``axis``) with ``w_hat = q · s`` to float rounding, or None."""
    w = (w_hat if axis is None else w_hat.movedim(axis, 0)).reshape(1 if axis is None else w_hat.shape[axis], -1)
    scale = _row_scales(w, (q if axis is None else q.movedim(axis, 0)).reshape(w.shape))
    if scale is None:
        return None
    return scale.reshape(-1) if axis is not None else scale.reshape(())


def _group_scales(w_hat: Tensor, q: Tensor, group_size: int) -> Tensor | None:
    """``_scales`` per group of ``group_size`` along the last axis of a 2-D weight: ``[rows, ceil(D / B)]``."""
    rows, length = w_hat.shape
    groups = -(-length // group_size)
    pad = groups * group_size - length  # zero levels pad the last group: they do not decide its scale

    def blocks(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, pad)).reshape(rows * groups, group_size)

    scale = _row_scales(blocks(w_hat), blocks(q))
    return None if scale is None else scale.reshape(rows, groups)


def _row_scales(w: Tensor, q: Tensor) -> Tensor | None:
    """One float32 scale per row of ``w`` with ``w = q · s`` to float rounding (``[rows, 1]``), or None.

    ``s`` is read where each row's level is largest; every element must then agree."""
    levels_ = q.double()
    w = w.double()
    at = levels_.abs().argmax(1, keepdim=True)
    pivot = levels_.gather(1, at)
    scale = torch.where(pivot != 0, w.gather(1, at) / pivot.where(pivot != 0, 1.0), 1.0).float()
    error = (w - levels_ * scale.double()).abs().amax(1)
    if bool((error > 1e-5 * w.abs().amax(1) + 1e-30).any()):
        return None
    return scale


def dequantized_inference(model: nn.Module, opset: int) -> tuple[nn.Module, list[QuantizedWeight]]:
    """``materialize(model)`` in float32 whose quantized weights are computed by ``metaquant::dequantize_linear``.

    A weight whose ``Ŵ`` is not integer levels times one scale per layer, per output channel or per group (a
    quantizer whose decode is not of that form) stays a float weight, named in a warning.

    Raises:
        ValueError: levels that no ONNX integer type of ``opset`` holds; scales per group below opset 21.
    """
    inference = materialize(model).cpu()
    kinds = {p.dtype for p in (*inference.parameters(), *inference.buffers()) if p.is_floating_point()}
    if kinds - {torch.float32}:
        logger.info("ONNX export: the model's %s tensors are exported as float32", ", ".join(sorted(map(str, kinds))))
        inference = inference.float()
    layers = quantized_weight_keys(model)
    params = inference.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # the inference model's Parameter holding one Ŵ -> its keys
    for key in layers:
        groups.setdefault(id(params[key]), []).append(key)
    found, floats = [], []
    for keys in groups.values():
        layer = layers[keys[0]]
        with torch.no_grad():
            encoded = layer.quantizer.encode(layer.weight.detach().cpu())
        q = levels(encoded, layer.quantizer.bits)
        block = layer.quantizer.scale_group_size or 0
        if block and opset < BLOCK_OPSET:
            raise ValueError(
                f"export_onnx: {keys[0]} has one scale per group of {block} weights, which DequantizeLinear holds "
                f"from opset {BLOCK_OPSET} on (block_size); got opset {opset}"
            )
        if block:  # along the weight's last axis, as the quantizer groups it
            axis: int | None = q.dim() - 1
            scale = _group_scales(params[keys[0]].detach(), q, block)
        else:
            axis = next((d for d, size in enumerate(encoded.scale.shape) if size > 1), None)
            scale = _scales(params[keys[0]].detach(), q, axis)
        if scale is None:
            floats += keys
            continue
        low, high = int(q.min()), int(q.max())
        if onnx_int_type(low, high, opset) is None:
            raise ValueError(
                f"export_onnx: levels in [{low}, {high}] ({keys[0]}) fit no ONNX integer type of opset {opset}"
            )
        dequantize = _Dequantize(q, scale, axis or 0, block)
        done: set[tuple[int, str]] = set()  # a module shared under several names holds the weight once
        for key in keys:
            owner, _, attr = key.rpartition(".")
            module = inference.get_submodule(owner)
            if (id(module), attr) not in done:
                done.add((id(module), attr))
                parametrize.register_parametrization(module, attr, dequantize, unsafe=True)
        found.append(QuantizedWeight(keys, dequantize))
    if floats:
        logger.warning(
            "ONNX export: stored in float: %s (their quantized weight is not integer levels times a scale per "
            "layer, per output channel or per group)",
            ", ".join(floats),
        )
    return inference, found
