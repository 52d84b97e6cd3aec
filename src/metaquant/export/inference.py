"""The inference model of a quantized model: a full-precision copy whose layers hold ``Ŵ`` as plain weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..layers import QuantLayer, dequantize_, input_quantizers, quantized_layers
from ..layers.inputs import attach_input_quantizers


def materialize(model: nn.Module) -> nn.Module:
    """A full-precision copy of a quantized model whose quantized layers hold ``Ŵ = Q(A(W))`` as plain weights.

    The copy computes exactly what the quantized model computes (in eval mode), with ordinary ``torch.nn``
    layers: the inference model that ``export_onnx`` writes. A weight tied between quantized layers stays tied
    (one ``Ŵ``); a weight tied between a quantized layer and one left in full precision is untied in the copy, the
    first holding ``Ŵ`` and the second ``W``, as the quantized model computes.

    Args:
        model: a model converted by ``quantize_`` (it is not changed).

    Returns:
        The copy, in eval mode.

    Raises:
        TypeError: ``model`` is wrapped in DDP/DataParallel (as ``dequantize_``).

    Example:
        >>> from metaquant.export import materialize
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3)), mq.QuantConfig("dorefa", 1)).eval()
        >>> plain = materialize(model)
        >>> type(plain[0]).__name__, type(model[0]).__name__, sorted(plain[0].weight.unique().tolist())
        ('Linear', 'QuantLinear', [-1.0, 1.0])
        >>> x = torch.randn(2, 4)
        >>> torch.equal(plain(x), model(x))
        True
    """

    inference = copy.deepcopy(model)
    holders: dict[int, int] = {}  # how many modules hold each Parameter
    for module in inference.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    uses: dict[int, dict[Any, list[QuantLayer]]] = {}  # weight -> quantizer -> the layers quantizing it so
    for layer in quantized_layers(inference).values():
        uses.setdefault(id(layer.weight), {}).setdefault(layer.quantizer, []).append(layer)
    with torch.no_grad():
        for by_quantizer in uses.values():
            weight = next(iter(by_quantizer.values()))[0].weight
            in_place = len(by_quantizer) == 1 and holders[id(weight)] == len(next(iter(by_quantizer.values())))
            values = {quantizer: quantizer(weight) for quantizer in by_quantizer}  # each Ŵ from the latent W
            for quantizer, layers in by_quantizer.items():
                if in_place:
                    weight.copy_(values[quantizer])
                    continue
                own = nn.Parameter(values[quantizer], requires_grad=weight.requires_grad)
                for layer in layers:
                    setattr(*layer.weight_location, own)
    inputs = input_quantizers(inference)
    dequantize_(inference)
    attach_input_quantizers(inference, inputs)
    return inference.eval()
