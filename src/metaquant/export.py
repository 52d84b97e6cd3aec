"""Packed low-bit export: the quantizer's integer codes bit-packed, k bits per weight, in one small file.

A quantized layer's weight ``Ŵ = Q(A(W))`` is stored as its integer codes (``ForwardQuantizer.encode``), packed
``bits`` per weight, plus its float scale(s); every other tensor of the model (BatchNorm, biases, layers left in
full precision) is stored as it is. ``load_packed`` rebuilds an ordinary full-precision model whose quantized
layers hold the decoded ``Ŵ``: the numbers the quantized model computes with, so the logits are identical.

The file is plain bytes, readable without pickle or torch::

    b"MQPACK\0\0"                      8-byte magic
    uint64 little-endian                header length H
    H bytes: zlib-compressed UTF-8 JSON {"version": 1, "architecture": {...} | null,
                                         "quantizer": {"name", "bits"}, "metadata": {...},
                                         "tensors": [{"name", "kind", "dtype", "shape", "offset", "nbytes",
                                                      ("offset_code", "signed" for kind "codes")}, ...]}
    payload                             the tensors' bytes, little-endian, at their offsets

``kind`` is ``"float"`` (a state_dict entry as it is), ``"codes"`` (a quantized weight's codes, bit-packed:
code ``i`` occupies bits ``i·k … i·k + k − 1`` of the stream, least significant bit first, the last byte
zero-padded; signed codes are stored shifted by ``offset_code``) or ``"scale"`` (its scale, named
``<layer>.weight.scale``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layers import dequantize_, quantized_layers
from .quantizers import Encoded, get_quantizer
from .runs import atomic_write_bytes

__all__ = ["pack_bits", "unpack_bits", "export_packed", "load_packed", "materialize", "export_onnx", "FORMAT"]

FORMAT = "metaquant packed model"
VERSION = 1


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes ``< 2**bits`` into a flat ``uint8`` tensor, ``bits`` bits per code.

    Code ``i`` (in row-major order) occupies bits ``i·k … i·k + k − 1`` of the stream, least significant bit
    first; the last byte is zero-padded. This is the layout of a packed file's ``"codes"`` tensors.

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits)``.
        bits: 1..8.

    Returns:
        ``uint8 [ceil(codes.numel() · bits / 8)]``.

    Raises:
        ValueError: ``bits`` outside 1..8, or a code outside ``[0, 2**bits)``.

    Example:
        >>> from metaquant.export import pack_bits, unpack_bits
        >>> codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1])
        >>> pack_bits(codes, 1).tolist()  # 1 + 4 + 8 + 128 = 141, then the ninth code alone
        [141, 1]
        >>> pack_bits(torch.tensor([[3, 0], [1, 2]]), 2).tolist()  # 3 + 0·4 + 1·16 + 2·64 = 147
        [147]
        >>> torch.equal(unpack_bits(pack_bits(codes, 1), 1, codes.numel()), codes)
        True
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to pack in {bits} bits")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # [numel·bits], LSB first
    padded = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = 1 << torch.arange(8, device=flat.device)
    return (padded.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes, as ``int64 [numel]``.

    Args:
        packed: the ``uint8`` bytes made by ``pack_bits``.
        bits: the bits per code used to pack them, 1..8.
        numel: how many codes to read (the padding bits of the last byte are ignored).

    Returns:
        ``int64 [numel]``; reshape to the codes' original shape.

    Raises:
        ValueError: ``bits`` outside 1..8, or ``packed`` too short for ``numel`` codes.

    Example:
        >>> from metaquant.export import pack_bits, unpack_bits
        >>> codes = torch.randint(0, 8, (5, 7))  # 35 codes of 3 bits: ceil(105 / 8) = 14 bytes
        >>> packed = pack_bits(codes, 3)
        >>> packed.numel(), torch.equal(unpack_bits(packed, 3, codes.numel()).reshape(5, 7), codes)
        (14, True)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() * 8 < numel * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


MAGIC = b"MQPACK\0\0"
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
           torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8", torch.int8: "int8", torch.bool: "bool"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def _offset(encoded: Encoded, bits: int) -> int:
    # Signed codes (ternary, uniform) are shifted to be non-negative: [-(2^(k-1)-1), 2^(k-1)-1] → [0, 2^k - 2].
    return 2 ** (bits - 1) - 1 if encoded.codes.dtype == torch.int8 else 0


def _raw(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def export_packed(
    model: nn.Module,
    path: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write ``model`` (converted by ``quantize_``) as a packed file; returns its size in bytes.

    Args:
        model: a quantized model; its quantized layers must share one quantizer configuration.
        path: the file to write (atomically).
        architecture: how ``load_packed`` rebuilds the model without being given one: ``{"model": registry
            name, "num_classes", "in_channels", "image_size"}``.
        metadata: anything else to keep with it (JSON values).

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: no quantized layer, or several quantizer configurations.
        OSError: the file cannot be written.

    Example:
        >>> from metaquant.export import export_packed, load_packed
        >>> def net():
        ...     return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> model = mq.quantize_(net(), mq.QuantConfig("dorefa", 1)).eval()
        >>> size = export_packed(model, "tiny.mqpack", metadata={"test_acc": 91.5})
        >>> loaded = load_packed("tiny.mqpack", net())  # the architecture to fill: plain Linear layers
        >>> x = torch.randn(3, 64)
        >>> torch.equal(loaded(x), model(x)), size < 64 * 32 * 4  # 1 bit, not 32, per quantized weight
        (True, True)
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("export_packed needs a model converted by quantize_ (no quantized layer found)")
    quantizers = {(layer.quantizer.name, layer.quantizer.bits) for layer in layers.values()}
    if len(quantizers) > 1:
        raise ValueError(f"export_packed supports one quantizer configuration per model, found {sorted(quantizers)}")
    ((name, bits),) = quantizers
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0

    def add(entry: dict[str, Any], data: bytes) -> None:
        nonlocal offset
        entries.append({**entry, "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)

    weight_keys = {f"{layer_name}.weight": layer for layer_name, layer in layers.items()}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            layer = weight_keys.get(key)
            if layer is None:
                add({"name": key, "kind": "float", "dtype": _DTYPES[value.dtype], "shape": list(value.shape)},
                    _raw(value))
                continue
            encoded = layer.quantizer.encode(value.detach().cpu())
            shift = _offset(encoded, bits)
            add({"name": key, "kind": "codes", "dtype": "uint8", "shape": list(encoded.codes.shape),
                 "offset_code": shift, "signed": encoded.codes.dtype == torch.int8},
                _raw(pack_bits(encoded.codes.to(torch.int64) + shift, bits)))
            add({"name": f"{key}.scale", "kind": "scale", "dtype": _DTYPES[encoded.scale.dtype],
                 "shape": list(encoded.scale.shape)}, _raw(encoded.scale))
    header = zlib.compress(json.dumps({
        "version": VERSION, "architecture": architecture, "quantizer": {"name": name, "bits": bits},
        "metadata": metadata or {}, "tensors": entries,
    }, separators=(",", ":")).encode(), 9)
    blob = MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)
    atomic_write_bytes(Path(path), blob)
    return len(blob)


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the stored tensors of a packed file (codes still packed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a packed file, another version, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if raw[:8] != MAGIC:
        raise ValueError(f"{path} is not a {FORMAT} file")
    try:
        (length,) = struct.unpack("<Q", raw[8:16])
        header = json.loads(zlib.decompress(raw[16 : 16 + length]))
    except (struct.error, ValueError, zlib.error) as err:
        raise ValueError(f"{path} has a damaged header ({err})") from None
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has format version {header.get('version')}; this metaquant reads version {VERSION}")
    payload = memoryview(raw)[16 + length :]
    tensors = {}
    if not isinstance(header.get("tensors"), list) or not isinstance(header.get("quantizer"), dict):
        raise ValueError(f"{path} has a damaged header (no tensor index or quantizer)")
    for e in header["tensors"]:
        if e["offset"] + e["nbytes"] > len(payload):
            raise ValueError(f"{path} is truncated: {e['name']} lies beyond the end of the file")
        data = bytearray(payload[e["offset"] : e["offset"] + e["nbytes"]])
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        dtype = _FROM_NAME[e["dtype"]]
        tensors[e["name"]] = flat if e["kind"] == "codes" else flat.view(dtype).reshape(e["shape"])
    return header, tensors


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """An inference model from a packed file: plain Conv2d/Linear layers holding the decoded ``Ŵ``.

    Args:
        path: a file written by ``export_packed``.
        model: the full-precision architecture to fill (same module names as the exported model); by default
            it is rebuilt from the file's ``architecture`` with ``metaquant.models.get_model``.

    Returns:
        The model in eval mode; its logits equal the quantized model's exactly.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a damaged file or another format version, one that does not fit ``model``, or (without
            ``model``) one that does not name its architecture.

    Example:
        >>> from metaquant.export import export_packed, load_packed
        >>> arch = {"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28}
        >>> model = mq.quantize_(mq.models.get_model("resnet8", num_classes=10, in_channels=1)).eval()
        >>> _ = export_packed(model, "resnet8.mqpack", architecture=arch)
        >>> net = load_packed("resnet8.mqpack")  # rebuilt from the registry; ordinary Conv2d and Linear layers
        >>> x = torch.randn(2, 1, 28, 28)
        >>> type(net.fc).__name__, torch.equal(net(x), model(x))
        ('Linear', True)
    """
    header, tensors = read_packed(path)
    try:
        return _build_packed(path, header, tensors, model)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} has a damaged header (missing or wrong entry {err})") from None


def _build_packed(path: str | Path, header: dict[str, Any], tensors: dict[str, Tensor],
                  model: nn.Module | None) -> nn.Module:
    if model is None:
        arch = header.get("architecture")
        if not arch:
            raise ValueError(f"{path} does not name its architecture: pass the model to load_packed(path, model)")
        from .models import get_model

        model = get_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                          image_size=arch["image_size"])
    else:
        dequantize_(model)
    quantizer = get_quantizer(header["quantizer"]["name"], header["quantizer"]["bits"])
    state = {}
    for e in header["tensors"]:
        if e["kind"] == "float":
            state[e["name"]] = tensors[e["name"]].clone()
        elif e["kind"] == "codes":
            numel = math.prod(e["shape"])
            codes = unpack_bits(tensors[e["name"]], quantizer.bits, numel) - e["offset_code"]
            codes = codes.to(torch.int8 if e["signed"] else torch.uint8).reshape(e["shape"])
            state[e["name"]] = quantizer.decode(Encoded(codes, tensors[e["name"] + ".scale"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the model: {err}") from None
    return model.eval()


def materialize(model: nn.Module) -> nn.Module:
    """A full-precision copy of a quantized model whose quantized layers hold ``Ŵ = Q(A(W))`` as plain weights.

    The copy computes exactly what the quantized model computes (in eval mode), with ordinary
    ``nn.Conv2d``/``nn.Linear`` layers: the inference model that ``export_onnx`` writes.

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
    import copy

    inference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in quantized_layers(inference).values():
            layer.weight.copy_(layer.quantizer(layer.weight))
    return dequantize_(inference).eval()


def export_onnx(model: nn.Module, path: str | Path, example: Tensor, *, metadata: dict[str, Any] | None = None) -> int:
    """Write the quantized inference model (``materialize``) as ONNX; returns the file's size in bytes.

    The weights are the quantized values; the exporter folds BatchNorm into the preceding convolutions. The
    batch dimension is dynamic. ``metadata`` is stored as the model's ``metadata_props`` (JSON values).
    Needs the ``onnx`` extra (``pip install 'metaquant-torch[onnx]'``: onnx, onnxscript, onnxruntime).

    Args:
        model: a model converted by ``quantize_`` (it is not changed).
        path: the ``.onnx`` file to write (atomically).
        example: an input batch, e.g. ``torch.zeros(1, C, H, W)``, for tracing; its batch size does not matter.
        metadata: values to keep in the file, each stored as a JSON string under its key.

    Returns:
        The file's size in bytes.

    Raises:
        ImportError: the ``onnx`` extra is not installed.

    Example:
        Exporting takes seconds (``torch.export``); ``export_onnx(model, "model.onnx", torch.zeros(1, 1, 28,
        28), metadata={"test_acc": 91.5})`` writes the network ``materialize(model)`` returns, whose logits are
        the quantized model's:

        >>> from metaquant.export import materialize
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
        >>> model = mq.quantize_(torch.nn.Sequential(*conv, torch.nn.Linear(4 * 6 * 6, 10))).eval()
        >>> inference, x = materialize(model), torch.randn(2, 1, 8, 8)
        >>> torch.equal(inference(x), model(x)), mq.quantized_layers(inference)  # no quantized layer left
        (True, {})
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx extra: pip install 'metaquant-torch[onnx]'") from None
    import warnings

    inference = materialize(model).cpu()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # torch.export-based exporter (the current one); it reports its progress through warnings, prints and
    # log records, none of which concern the user of a plain CNN.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                inference, (example.cpu(),), str(tmp), input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = onnx.load(str(tmp))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    data = proto.SerializeToString()
    tmp.unlink()
    atomic_write_bytes(path, data)
    return len(data)
