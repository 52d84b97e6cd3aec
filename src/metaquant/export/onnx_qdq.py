"""ONNX export in the QDQ form: every quantized weight an integer initializer followed by ``DequantizeLinear``."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..files import atomic_write_bytes
from ..layers import QuantLayer, quantized_weight_keys
from ..quantizers import Encoded
from .bits import pack_bits
from .inference import materialize

logger = logging.getLogger(__name__)


# ONNX integer types for DequantizeLinear: (name, bits, lowest, highest, first opset that has it)
_ONNX_INTS = (
    ("INT2", 2, -2, 1, 25),
    ("INT4", 4, -8, 7, 21),
    ("INT8", 8, -128, 127, 13),
    ("INT16", 16, -32768, 32767, 21),
)
MIN_OPSET = 13  # per-axis DequantizeLinear


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


def _channel_scales(weight: np.ndarray, q: np.ndarray) -> np.ndarray | None:
    """Per output channel (dim 0), the ``s`` with ``weight ≈ q · s``, or None if there is none.

    The exported weight may be ``Ŵ`` times a per-channel factor (a folded BatchNorm); ``s`` is read at each
    channel's largest level, and every element must then agree to float rounding.
    """
    w = weight.reshape(weight.shape[0], -1).astype(np.float64)
    levels_ = q.reshape(q.shape[0], -1).astype(np.float64)
    at = np.abs(levels_).argmax(axis=1)
    rows = np.arange(w.shape[0])
    pivot = levels_[rows, at]
    scale = np.where(pivot != 0, w[rows, at] / np.where(pivot != 0, pivot, 1.0), 1.0)
    scale = scale.astype(np.float32)  # the scale the runtime multiplies with
    error = np.abs(w - levels_ * scale.astype(np.float64)[:, None]).max(axis=1)
    if np.any(error > 1e-5 * np.abs(w).max(axis=1) + 1e-30):
        return None
    return scale


def _onnx_int(name: str, q: np.ndarray, opset: int) -> tuple[Any, str]:
    """``q`` as the smallest ONNX integer initializer that holds it, with the type's name."""
    import onnx

    lo, hi = int(q.min()), int(q.max())
    fits = [
        (candidate, bits)
        for candidate, bits, lowest, highest, since in _ONNX_INTS
        if since <= opset and lowest <= lo and hi <= highest
    ]
    if not fits:
        raise ValueError(f"levels in [{lo}, {hi}] fit no ONNX integer type of opset {opset}")
    type_name, bits = fits[0]
    tensor = onnx.TensorProto(name=name, data_type=getattr(onnx.TensorProto, type_name), dims=list(q.shape))
    if bits < 8:
        # ONNX packs INT4 two and INT2 four to a byte, first element in the low bits: pack_bits' layout, applied
        # to the two's-complement bit patterns.
        patterns = torch.from_numpy(q.astype(np.int64) & (2**bits - 1))
        tensor.raw_data = pack_bits(patterns, bits).numpy().tobytes()
    else:
        tensor.raw_data = q.astype(f"<i{bits // 8}").tobytes()
    return tensor, type_name


def _dequantize_weights(proto: Any, layers: dict[str, QuantLayer], opset: int) -> dict[str, str]:
    """Replace the float initializer of every quantized weight (``{state_dict key: layer}``) by integer levels and
    DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    replaced: dict[str, str] = {}
    done: set[int] = set()  # a weight tied between layers is one initializer, under its first key
    added_initializers, added_nodes = [], []
    for key, layer in layers.items():
        if id(layer.weight) in done:
            continue
        done.add(id(layer.weight))
        stored = initializers.get(key)
        with torch.no_grad():
            q = levels(layer.quantizer.encode(layer.weight.detach().cpu()), layer.quantizer.bits).numpy()
        weight = numpy_helper.to_array(stored) if stored is not None else None
        axis = 0
        if weight is not None and weight.shape != q.shape and weight.ndim == 2 and weight.shape == q.T.shape:
            q, axis = q.T, 1  # a Linear exported as MatMul with the transposed weight
        scale = None
        if weight is not None and weight.shape == q.shape and weight.dtype == np.float32:
            # per-channel scales run along dimension 0, or 1 for a transposed convolution's [C_in, C_out / g, ...]
            for candidate in (axis, 1) if layer.channel_axis == 1 else (axis,):
                scale = _channel_scales(np.moveaxis(weight, candidate, 0), np.moveaxis(q, candidate, 0))
                if scale is not None:
                    axis = candidate
                    break
        if scale is None:
            logger.warning(
                "ONNX export: %s keeps float weights (the exporter did not keep it as the quantized "
                "weight times a per-channel scale)",
                key,
            )
            continue
        integers, type_name = _onnx_int(f"{key}_quantized", np.ascontiguousarray(q), opset)
        per_layer = bool(np.all(scale == scale[0]))
        scale_tensor = numpy_helper.from_array(np.array(scale[0]) if per_layer else scale, f"{key}_scale")
        added_initializers += [integers, scale_tensor]
        node = onnx.helper.make_node(
            "DequantizeLinear", [integers.name, scale_tensor.name], [key], name=f"{key}_dequantize"
        )
        if not per_layer:
            node.attribute.append(onnx.helper.make_attribute("axis", axis))
        added_nodes.append(node)
        replaced[key] = type_name
    kept = [t for t in proto.graph.initializer if t.name not in replaced]
    nodes = added_nodes + list(proto.graph.node)  # the weights are computed before anything uses them
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + added_initializers)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return replaced


def _onnx_inputs(model: nn.Module, args: tuple[Any, ...]) -> tuple[list[str], tuple[Any, ...]]:
    """Input names and dynamic shapes for ``args``: dimension 0 of every tensor is the batch. One tensor is named
    ``images``; otherwise each tensor takes its forward argument's name (and its key or index inside it)."""
    batch = torch.export.Dim("batch")
    if len(args) == 1 and isinstance(args[0], Tensor):
        return ["images"], ({0: batch},)
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names: list[str] = []

    def walk(value: Any, name: str) -> Any:
        if isinstance(value, Tensor):
            names.append(name)
            return {0: batch}
        if isinstance(value, dict):
            return {k: walk(v, f"{name}.{k}") for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(walk(v, f"{name}.{i}") for i, v in enumerate(value))
        return None

    shapes = tuple(walk(arg, params[i] if i < len(params) else f"input{i}") for i, arg in enumerate(args))
    return names, shapes


def _float32_cpu(value: Any) -> Any:
    """``value`` (tensors, possibly in dicts, lists and tuples) on the CPU, floating tensors as float32."""
    if isinstance(value, Tensor):
        return value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, dict):
        return {k: _float32_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_float32_cpu(v) for v in value)
    return value


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor | tuple[Any, ...],
    *,
    metadata: dict[str, Any] | None = None,
    opset: int = 21,
) -> int:
    """Write the quantized inference model as ONNX with integer weights; returns the file's size in bytes.

    The network is ``materialize(model)``; the exporter folds BatchNorm into the preceding convolutions, and
    every quantized weight is then stored as its integer levels (``levels``) in the smallest ONNX integer type
    the opset has (INT4 at opset 21, INT2 from opset 25 for 1-bit and ternary levels) followed by
    ``DequantizeLinear`` with per-output-channel scales (one scale when they are all equal). The batch dimension
    is dynamic; ``metadata`` is stored as the model's ``metadata_props`` (JSON values). A float64 or bfloat16
    model is exported in float32, the type every ONNX runtime executes, its inputs too. A weight tied between a
    quantized layer and a full-precision one is stored twice, as ``materialize`` holds it. Needs the ``onnx``
    extra (``pip install 'metaquant-torch[onnx]'``: onnx, onnxscript, onnxruntime).

    Args:
        model: a model converted by ``quantize_`` (it is not changed).
        path: the ``.onnx`` file to write (atomically).
        example: the inputs of one forward call, for tracing: a tensor (e.g. ``torch.zeros(2, C, H, W)``; the
            ONNX input is named ``images``), or the tuple of the forward's positional arguments, each a tensor or
            a dict, list or tuple of tensors (the ONNX inputs take the argument's name, then the key or index,
            e.g. ``batch.image``). Dimension 0 of every tensor is the batch, dynamic in the file; an example
            batch of 2 or more keeps layers that treat a batch of 1 specially from fixing it.
        metadata: values to keep in the file, each stored as a JSON string under its key.
        opset: the ONNX opset, at least 13 (per-axis DequantizeLinear, INT8 and wider); 21 (the default) adds
            INT4, 25 adds INT2 (a runtime that implements opset 25 is needed to read it; onnxruntime 1.32 does).

    Returns:
        The file's size in bytes.

    Raises:
        ImportError: the ``onnx`` extra is not installed.
        ValueError: ``opset`` is below 13.

    Example:
        Exporting takes seconds (``torch.export``); ``export_onnx(model, "model.onnx", torch.zeros(1, 1, 28,
        28), metadata={"test_acc": 91.5})`` writes the network ``materialize(model)`` returns, whose logits are
        the quantized model's, with each quantized weight as integer ``levels`` times scales:

        >>> from metaquant.export import levels, materialize
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
        >>> model = mq.quantize_(torch.nn.Sequential(*conv, torch.nn.Linear(4 * 6 * 6, 10))).eval()
        >>> inference, x = materialize(model), torch.randn(2, 1, 8, 8)
        >>> torch.equal(inference(x), model(x)), mq.quantized_layers(inference)  # no quantized layer left
        (True, {})
        >>> q = levels(model[0].quantizer.encode(model[0].weight), bits=1)  # 1-bit DoReFa: ±1, scale 1
        >>> torch.equal(q.float(), inference[0].weight), sorted(q.unique().tolist())
        (True, [-1, 1])
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (per-axis DequantizeLinear), got {opset}")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx extra: pip install 'metaquant-torch[onnx]'") from None

    layers = quantized_weight_keys(model)
    inference = _float32_inference(model)
    path = Path(path)
    proto = _run_exporter(inference, _exporter_inputs(inference, example), opset, path.with_name(f".{path.name}.tmp"))
    replaced = _dequantize_weights(proto, layers, opset)
    for node in proto.graph.node:
        # The exporter annotates every node with its Python stack trace and module path: a third of a small
        # model's file, and the paths of the machine that exported it. Inference needs none of it.
        del node.metadata_props[:]
        node.doc_string = ""
    if "INT2" in replaced.values():
        proto.ir_version = max(proto.ir_version, 12)  # INT2 is an IR version 12 type
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    logger.debug(
        "ONNX export: %d of %d quantized weights as integers (%s)",
        len(replaced),
        len(layers),
        ", ".join(sorted(set(replaced.values()))),
    )
    return len(data)


def _float32_inference(model: nn.Module) -> nn.Module:
    """``materialize(model)`` on the CPU in float32, the type every ONNX runtime executes."""
    inference = materialize(model).cpu()
    kinds = {p.dtype for p in (*inference.parameters(), *inference.buffers()) if p.is_floating_point()}
    if kinds - {torch.float32}:
        logger.info("ONNX export: the model's %s tensors are exported as float32", ", ".join(sorted(map(str, kinds))))
        inference = inference.float()
    return inference


#: ``torch.onnx.export``'s ``args``, ``kwargs``, input names and dynamic shapes.
_ExporterInputs = tuple[tuple[Any, ...], dict[str, Any] | None, list[str], Any]


def _exporter_inputs(inference: nn.Module, example: Tensor | tuple[Any, ...]) -> _ExporterInputs:
    """The exporter's inputs for ``example`` (floating tensors in float32, on the CPU)."""
    args = _float32_cpu(example if isinstance(example, tuple) else (example,))
    input_names, dynamic_shapes = _onnx_inputs(inference, args)
    if not (args and isinstance(args[-1], dict)):
        return args, None, input_names, dynamic_shapes
    # torch.onnx.export reads a dict at the end of the arguments as keyword arguments: name them all instead
    params = [
        p
        for p in inspect.signature(inference.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < len(args) or any(p.kind is p.POSITIONAL_ONLY for p in params[: len(args)]):
        raise ValueError(
            "export_onnx: a model whose last input is a dict needs a forward whose arguments can be "
            f"passed by name; {type(inference).__name__}.forward has {len(params)} such arguments "
            f"for {len(args)} inputs"
        )
    kwargs = {p.name: arg for p, arg in zip(params, args)}
    shapes = {p.name: shape for p, shape in zip(params, dynamic_shapes)}
    return (), kwargs, input_names, shapes


def _run_exporter(inference: nn.Module, inputs: _ExporterInputs, opset: int, tmp: Path) -> Any:
    """The ONNX model ``torch.onnx.export`` makes of ``inference``, written to ``tmp`` (removed after) and loaded."""
    import onnx

    args, kwargs, input_names, dynamic_shapes = inputs
    # torch.export-based exporter (the current one); it reports its progress through warnings, prints and
    # log records, none of which concern the user of a plain CNN.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                inference,
                args,
                str(tmp),
                kwargs=kwargs,
                input_names=input_names,
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
                opset_version=opset,
            )
        return onnx.load(str(tmp))
    finally:
        exporter_log.setLevel(level)
        tmp.unlink(missing_ok=True)
