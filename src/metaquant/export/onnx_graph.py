"""Passes over the exported ONNX graph: each quantized weight's ``DequantizeLinear`` named after the weight, its
levels in the smallest integer type of the opset, BatchNorm folded into the scales of the layer before it, and
what inference does not need removed (initializers nothing reads, the exporter's notes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .bits import pack_bits
from .onnx_weights import ONNX_INTS, QuantizedWeight, onnx_int_type


def _nodes(graph: Any) -> Any:
    """Every node of ``graph``, those of its subgraphs (a Loop's body, an If's branches) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _nodes(sub)


def _rename(graph: Any, old: str, new: str) -> None:
    for node in _nodes(graph):
        for values in (node.input, node.output):
            for i, name in enumerate(values):
                if name == old:
                    values[i] = new
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _onnx_int(name: str, q: np.ndarray, opset: int) -> Any:
    """``q`` as the smallest ONNX integer initializer of ``opset`` that holds it."""
    import onnx

    type_name = onnx_int_type(int(q.min()), int(q.max()), opset)
    bits = next(bits for candidate, bits, *_ in ONNX_INTS if candidate == type_name)
    tensor = onnx.TensorProto(name=name, data_type=getattr(onnx.TensorProto, str(type_name)), dims=list(q.shape))
    if bits < 8:
        # ONNX packs INT4 two and INT2 four to a byte, first element in the low bits: pack_bits' layout, applied
        # to the two's-complement bit patterns.
        patterns = torch.from_numpy(q.astype(np.int64) & (2**bits - 1))
        tensor.raw_data = pack_bits(patterns, bits).numpy().tobytes()
    else:
        tensor.raw_data = q.astype(f"<i{bits // 8}").tobytes()
    return tensor


def name_weights(proto: Any, weights: list[QuantizedWeight], buffers: dict[str, int]) -> dict[str, Any]:
    """Name each weight's ``DequantizeLinear`` output after the weight's first key, give it initializers of its own,
    ``<key>_quantized`` and ``<key>_scale`` (the exporter shares equal ones between weights), and keep one such
    node per weight; returns ``{key: node}`` for the weights in the graph.

    ``buffers`` maps each name of a levels buffer in the traced network to its weight's index in ``weights``."""
    import onnx

    graph = proto.graph
    initializers = _initializers(graph)
    found: dict[str, Any] = {}
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in buffers:
            continue
        # the exporter keeps one initializer of equal ones: the levels may be another weight's, the scale tells
        q, scale = _array(graph, node.input[0]), _array(graph, node.input[1])
        candidates = [w for w in weights if w.module.holds(q, scale)]
        named = weights[buffers[node.input[0]]]
        weight = named if named in candidates else next((w for w in candidates if w.keys[0] not in found), named)
        key = weight.keys[0]
        _rename(graph, node.output[0], key)
        if key in found:  # the same weight dequantized twice: one node is enough
            graph.node.remove(node)
            continue
        for i, suffix in ((0, "_quantized"), (1, "_scale")):
            own = onnx.TensorProto()
            own.CopyFrom(initializers[node.input[i]])
            own.name = node.input[i] = f"{key}{suffix}"
            graph.initializer.append(own)
        node.name = f"{key}_dequantize"
        found[key] = node
    return found


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _array(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    tensor = _initializers(graph).get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _set_array(graph: Any, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(value, name)
    for i, old in enumerate(graph.initializer):
        if old.name == name:
            graph.initializer[i].CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


def _attribute(node: Any, name: str, default: Any) -> Any:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_axis(node: Any, axis: int | None, block_size: int = 0) -> None:
    import onnx

    del node.attribute[:]  # the others (output_dtype) at their defaults
    if axis is not None:
        node.attribute.append(onnx.helper.make_attribute("axis", axis))
    if axis is not None and block_size:
        node.attribute.append(onnx.helper.make_attribute("block_size", block_size))


def _output_axis(layer: Any) -> int | None:
    """The axis of the output channels in the weight of a Conv, ConvTranspose or Gemm node, or None where one
    scale per output channel cannot say it (a grouped transposed convolution)."""
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1 if _attribute(layer, "group", 1) == 1 else None
    if layer.op_type == "Gemm" and _attribute(layer, "alpha", 1.0) == 1.0 and _attribute(layer, "beta", 1.0) == 1.0:
        return 0 if _attribute(layer, "transB", 0) else 1
    return None


def fold_batchnorm(proto: Any, weights: dict[str, Any]) -> None:
    """Fold each inference ``BatchNormalization`` that follows a Conv, ConvTranspose or Gemm whose weight is one
    of ``weights`` (``{key: DequantizeLinear node}``) into that weight's scales and the layer's bias:
    ``s' = s·γ/√(σ² + ε)`` per output channel, ``b' = (b − μ)·γ/√(σ² + ε) + β``."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for norm in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        layer = producer.get(norm.input[0])
        if layer is None or len(norm.output) != 1 or readers.get(norm.input[0]) != 1 or len(layer.input) < 2:
            continue
        dequantize = weights.get(layer.input[1])
        axis = _output_axis(layer)
        stats = [_array(graph, name) for name in norm.input[1:5]]
        if dequantize is None or axis is None or readers.get(layer.input[1]) != 1 or any(s is None for s in stats):
            continue
        scale = _array(graph, dequantize.input[1])
        blocked = _attribute(dequantize, "block_size", 0)  # per-group scales: not folded, the BatchNorm stays
        if scale is None or blocked or (scale.ndim and _attribute(dequantize, "axis", 1) != axis):
            continue
        gamma, beta, mean, var = (np.asarray(s, dtype=np.float64) for s in stats)
        factor = gamma / np.sqrt(var + _attribute(norm, "epsilon", 1e-5))
        bias = _array(graph, layer.input[2]) if len(layer.input) > 2 and layer.input[2] else 0.0
        if bias is None:
            continue
        _set_array(graph, dequantize.input[1], (scale.astype(np.float64) * factor).astype(np.float32))
        _set_axis(dequantize, axis)
        bias_name = f"{dequantize.output[0]}_bias"
        _set_array(graph, bias_name, ((bias - mean) * factor + beta).astype(np.float32))
        del layer.input[2:]
        layer.input.append(bias_name)
        layer.output[0] = norm.output[0]
        graph.node.remove(norm)


def store_levels(proto: Any, weights: dict[str, Any], opset: int) -> dict[str, str]:
    """Store each weight's levels in the smallest integer type of ``opset`` and its scale as one value where all
    are equal; returns ``{key: ONNX type name}``."""
    graph = proto.graph
    types = {}
    for key, node in weights.items():
        q = _array(graph, node.input[0])
        scale = _array(graph, node.input[1])
        assert q is not None and scale is not None  # the exporter stores the levels and scales as initializers
        integers = _onnx_int(node.input[0], q.astype(np.int64), opset)
        types[key] = onnx_type_name(integers.data_type)
        for i, old in enumerate(graph.initializer):
            if old.name == node.input[0]:
                graph.initializer[i].CopyFrom(integers)
        if scale.ndim and np.all(scale == scale.reshape(-1)[0]):
            _set_array(graph, node.input[1], np.array(scale.reshape(-1)[0], dtype=np.float32))
            scale = scale.reshape(-1)[0]
        blocked = _attribute(node, "block_size", 0)
        _set_axis(node, _attribute(node, "axis", 1) if np.ndim(scale) else None, blocked)
        if len(node.input) > 2:  # no zero point: the levels are symmetric around 0
            del node.input[2:]
    return types


def onnx_type_name(data_type: int) -> str:
    import onnx

    return str(onnx.TensorProto.DataType.Name(data_type))


def prune(proto: Any) -> None:
    """Remove the initializers no node reads (e.g. the buffers of BatchNorm folded away), the type annotations of
    values no node makes, and the exporter's notes: its graph signature, and on every node its Python stack trace
    and module path (a third of a small model's file, and the paths of the machine that exported it)."""
    graph = proto.graph
    for node in _nodes(graph):
        del node.metadata_props[:]
        node.doc_string = ""
    used = {name for node in _nodes(graph) for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    made = {name for node in _nodes(graph) for name in node.output}
    annotations = [v for v in graph.value_info if v.name in made]
    for value in annotations:
        del value.metadata_props[:]
    del graph.value_info[:]
    graph.value_info.extend(annotations)
    del graph.metadata_props[:]
