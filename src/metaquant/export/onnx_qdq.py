"""ONNX export in the QDQ form: every quantized weight an integer initializer followed by ``DequantizeLinear``,
and the file's content digest, checked when it is read."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..activations import check_initialized
from ..files import atomic_write_bytes
from ..integrity import DIGEST_PLACEHOLDER, seal, verify_seal
from ..layers import input_quantizers
from .onnx_activations import export_activations_, quantize_activation_op, quantize_activation_translation
from .onnx_graph import fold_batchnorm, name_weights, prune, store_levels
from .onnx_weights import QuantizedWeight, dequantize_op, dequantized_inference

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # per-axis DequantizeLinear
#: What the ONNX export needs, as messages say it.
ONNX_PACKAGES = "onnx, onnxscript and onnxruntime (the onnx extra): pip install onnx onnxscript onnxruntime"
#: The ``metadata_props`` key of an exported file's content digest (``integrity.seal``).
DIGEST_KEY = "metaquant.digest"
# The digest's metadata entry as protobuf encodes it: key (field 1, 16 bytes), value (field 2: the JSON string of
# "sha256:" and 64 hex digits, 73 bytes).
_DIGEST_ENTRY = re.compile(rb'\n\x10metaquant\.digest\x12I"(sha256:[0-9a-f]{64})"')
_DIGEST_VALUE = re.compile(rb"sha256:[0-9a-f]{64}")


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

    The network is ``materialize(model)`` in float32 (the type every ONNX runtime executes; its inputs too), in
    which every quantized weight is its integer levels (``levels``) in the smallest ONNX integer type the opset
    has (INT4 at opset 21, INT2 from opset 25 for 1-bit and ternary levels) followed by ``DequantizeLinear``,
    whatever the exporter makes of the weight (transposed, split into attention projections, reordered into an
    ONNX LSTM's gates, tied). A BatchNorm after a convolution is folded into its scales, one per output channel
    (one scale when they are all equal); per-group scales are a blocked ``DequantizeLinear`` (``block_size``). A
    layer's input quantizer is ``QuantizeLinear`` + ``DequantizeLinear`` (LSQ, PACT: levels in UINT8/INT8,
    UINT4/INT4 from opset 21, after a ``Clip`` where no type's range is the levels') or ``Where(x >= 0, 1,
    Where(x < 0, -1, x))`` (sign; NaN stays NaN). A quantized weight the forward pass does not use for ``example``
    is not in the file (a warning names it). The batch dimension is dynamic; ``metadata`` is stored as the model's
    ``metadata_props`` (JSON values), with a content digest that ``read_onnx`` checks. Needs onnx, onnxscript
    and onnxruntime (the ``onnx`` extra).

    Args:
        model: a model converted by ``quantize_`` (it is not changed).
        path: the ``.onnx`` file to write (atomically).
        example: the inputs of one forward call, for tracing: a tensor (e.g. ``torch.zeros(2, C, H, W)``; the
            ONNX input is named ``images``), or the tuple of the forward's positional arguments, each a tensor or
            a dict, list or tuple of tensors (the ONNX inputs take the argument's name, then the key or index,
            e.g. ``batch.image``). Dimension 0 of every tensor is the batch, dynamic in the file; an example
            batch of 2 or more keeps layers that treat a batch of 1 specially from fixing it.
        metadata: values to keep in the file, each stored as a JSON string under its key.
        opset: the ONNX opset, at least 13 (per-axis DequantizeLinear, INT8); 21 (the default) adds INT4 and
            INT16, 25 adds INT2 (a runtime that implements opset 25 is needed to read it; onnxruntime 1.32 does).

    Returns:
        The file's size in bytes.

    Raises:
        ImportError: onnx or onnxscript is not installed.
        ValueError: ``opset`` is below 13; levels no integer type of ``opset`` holds (8-bit DoReFa below 21);
            scales per group (``uniform-group``: ``DequantizeLinear``'s ``block_size``) below opset 21;
            ``metadata`` uses the key ``DIGEST_KEY``; an LSQ input quantizer that no training-mode batch has
            initialised (``check_initialized``).

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
    if DIGEST_KEY in (metadata or {}):
        raise ValueError(f"metadata: the key {DIGEST_KEY!r} is the file's own (its content digest)")
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ImportError(f"ONNX export needs {ONNX_PACKAGES}") from None
    check_initialized(input_quantizers(model), "export_onnx")

    inference, weights = dequantized_inference(model, opset)
    activations = export_activations_(inference)
    path = Path(path)
    proto = _run_exporter(inference, _exporter_inputs(inference, example), opset, path.with_name(f".{path.name}.tmp"))
    _check_exported(proto, opset)
    stored = _integer_weights(proto, inference, weights, opset)
    if "INT2" in stored.values():
        proto.ir_version = max(proto.ir_version, 12)  # INT2 is an IR version 12 type
    for key, value in (*(metadata or {}).items(), (DIGEST_KEY, DIGEST_PLACEHOLDER)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    data = seal(proto.SerializeToString())
    atomic_write_bytes(path, data)
    logger.debug(
        "ONNX export: %d quantized weights as integers (%s), %d quantized activations",
        len(stored),
        ", ".join(sorted(set(stored.values()))),
        len(activations),
    )
    return len(data)


def _check_exported(proto: Any, opset: int) -> None:
    """Warn about a batch size the traced forward pass made a constant, and an opset other than ``opset``."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    fixed = [name for name, d in dims.items() if d and d[0].HasField("dim_value")]
    if fixed:
        logger.warning(
            "ONNX export: the batch size of %s is fixed to the example's: the forward pass made it a constant "
            "(e.g. len(x) rather than x.shape[0])",
            ", ".join(fixed),
        )
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        logger.warning(
            "ONNX export: the exporter wrote opset %d, as it could not convert the graph to %d", written, opset
        )


def _integer_weights(proto: Any, inference: nn.Module, weights: list[QuantizedWeight], opset: int) -> dict[str, str]:
    """The graph passes of ``onnx_graph``; returns ``{key: ONNX integer type}`` for every ``state_dict`` key whose
    quantized weight the file holds."""
    index = {id(w.module.levels): i for i, w in enumerate(weights)}
    buffers = {name: index[id(b)] for name, b in inference.named_buffers(remove_duplicate=False) if id(b) in index}
    found = name_weights(proto, weights, buffers)
    fold_batchnorm(proto, found)
    types = store_levels(proto, found, opset)
    prune(proto)
    stored, unused = {}, []
    for weight in weights:
        # the exporter keeps one copy of equal initializers: a weight equal to another one is stored as that one
        same = next((w for w in weights if w.keys[0] in found and w.module.same_levels(weight.module)), None)
        for key in weight.keys:
            if same is None:
                unused.append(key)
            else:
                stored[key] = types[same.keys[0]]
    if unused:
        logger.warning(
            "ONNX export: not in the file, as the forward pass did not use them for the example input: %s",
            ", ".join(unused),
        )
    return stored


def read_onnx(path: str | Path) -> bytes:
    """The bytes of an ONNX file written by ``export_onnx``, after checking its content digest.

    Load the model from the returned bytes (``onnxruntime.InferenceSession(data, onnx_session_options())``,
    ``onnx.load_from_string``), so that the bytes checked are the bytes used. A file without digest (written by
    an earlier metaquant, or by another program) is returned unchecked, with a log line that says so.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's bytes are not those that were written (its digest does not match).

    Example:
        >>> import onnxruntime
        >>> from metaquant.export import export_onnx, onnx_session_options, read_onnx
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2))).eval()
        >>> _ = export_onnx(model, "tiny.onnx", torch.zeros(2, 4))
        >>> data = read_onnx("tiny.onnx")  # the bytes checked are the bytes run
        >>> session = onnxruntime.InferenceSession(data, onnx_session_options())  # computes as the model does
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x), atol=1e-6)
        True
        >>> data = bytearray(open("tiny.onnx", "rb").read()); data[40] ^= 1  # one bit flipped
        >>> _ = open("tiny.onnx", "wb").write(data)
        >>> read_onnx("tiny.onnx")
        Traceback (most recent call last):
        ...
        ValueError: tiny.onnx is damaged: its content digest does not match its data (...)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    found = _DIGEST_ENTRY.search(data)
    if found is not None:
        verify_seal(data, found.group(1).decode(), path)
    elif DIGEST_KEY.encode() in data or _DIGEST_VALUE.search(data):
        raise ValueError(f"{path} is damaged: its content digest entry is unreadable")
    else:
        logger.warning("%s has no content digest (written before metaquant's exports carried one): not checked", path)
    return data


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


def _dequantize_linear(opset: int) -> Any:
    """The ONNX translation of ``metaquant::dequantize_linear``: one ``DequantizeLinear`` node."""
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def dequantize_linear(levels: Any, scale: Any, axis: int, block_size: int) -> Any:
        if block_size:  # an attribute from opset 21 on (dequantized_inference refuses a lower one)
            return op.DequantizeLinear(levels, scale, axis=axis, block_size=block_size)
        return op.DequantizeLinear(levels, scale, axis=axis)

    return dequantize_linear


def _run_exporter(inference: nn.Module, inputs: _ExporterInputs, opset: int, tmp: Path) -> Any:
    """The ONNX model ``torch.onnx.export`` makes of ``inference``, written to ``tmp`` (removed after) and loaded."""
    import onnx

    args, kwargs, input_names, dynamic_shapes = inputs
    # torch.export-based exporter (the current one); it reports its progress through warnings, prints and
    # log records (its optimizer's too, and a traceback when it cannot convert to an older opset, which it then
    # does not use: export_onnx says so), none of which concern the user of a plain CNN.
    loggers = {name: logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")}
    levels = {name: log.level for name, log in loggers.items()}
    for name, log in loggers.items():
        log.setLevel(logging.ERROR if name == "torch.onnx" else logging.CRITICAL)
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
                custom_translation_table={
                    dequantize_op(): _dequantize_linear(opset),
                    quantize_activation_op(): quantize_activation_translation(opset),
                },
            )
        return onnx.load(str(tmp))
    finally:
        for name, log in loggers.items():
            log.setLevel(levels[name])
        tmp.unlink(missing_ok=True)
