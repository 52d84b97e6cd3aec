r"""Low-bit export: a quantized model as a safetensors file of bit-packed codes, or as ONNX with integer weights.

**Packed file** (``export_packed``, ``load_packed``). A quantized layer's weight ``Ŵ = Q(A(W))`` is stored as its
integer codes (``ForwardQuantizer.encode``), packed ``bits`` per weight, plus its float scale(s); every other
tensor of the model (BatchNorm, biases, layers left in full precision) is stored as it is. ``load_packed``
rebuilds an ordinary full-precision model whose quantized layers hold the decoded ``Ŵ``: the numbers the
quantized model computes with, so the logits are identical.

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: no pickle, and any
safetensors reader (``safetensors.safe_open(path, framework="np")``, in any framework) lists and loads every
tensor and the metadata without metaquant. For a quantized layer ``L``:

============================  ===========================================================================
tensor                        content
============================  ===========================================================================
``L.weight.codes``            ``uint8 [ceil(n·k / 8)]``: the ``n`` codes of ``k`` bits, bit-packed
                              (``pack_bits``: code ``i`` in bits ``i·k … i·k + k − 1`` of the stream,
                              least significant bit first, the last byte zero-padded)
``L.weight.scale``            the float scale(s) of ``Encoded.scale`` (``[1]``, or ``[C_out, 1, ...]``)
any other name                a ``state_dict`` entry, as it is
============================  ===========================================================================

The header's ``__metadata__`` (strings; the structured ones hold JSON): ``"format"`` (``FORMAT``),
``"format_version"`` (``"2"``), ``"quantizer"`` (``{"name", "bits"}``), ``"architecture"`` (``{"model",
"num_classes", "in_channels", "image_size"}`` or ``null``), ``"codes"`` (for every ``L.weight``: ``{"shape",
"offset", "signed"}``; signed codes are stored plus ``offset`` so that they are non-negative) and
``"metadata"`` (the caller's values). The weight is ``decode(codes − offset, scale)``, e.g. for BWN
``(2·code − 1)·scale``.

Files of the earlier format (version 1: an ``MQPACK`` container with a JSON header) still load.

**ONNX** (``export_onnx``). The inference model with BatchNorm folded into the convolutions, where every
quantized weight is an integer initializer (INT4 by default, INT2 with ``opset >= 25`` for codes in [−2, 1],
INT8 or INT16 for wider codes) followed by a ``DequantizeLinear`` with one scale per output channel (the
folded BatchNorm makes them differ) or one per layer: the standard "QDQ" form that ONNX runtimes and
converters recognise. Its logits equal the quantized model's up to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import logging
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from .files import atomic_write_bytes
from .layers import QuantLayer, dequantize_, quantized_layers, quantized_weight_keys
from .models import get_model
from .quantizers import Encoded, get_quantizer

__all__ = [
    "pack_bits",
    "unpack_bits",
    "export_packed",
    "read_packed",
    "load_packed",
    "materialize",
    "levels",
    "export_onnx",
    "FORMAT",
    "VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "metaquant packed model"
VERSION = 2
LEGACY_VERSION = 1
LEGACY_MAGIC = b"MQPACK\x00\x00"


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


def _offset(encoded: Encoded, bits: int) -> int:
    # Signed codes (ternary, uniform) are shifted to be non-negative: [-(2^(k-1)-1), 2^(k-1)-1] → [0, 2^k - 2].
    return 2 ** (bits - 1) - 1 if encoded.codes.dtype == torch.int8 else 0


def _single_config(layers: dict[str, QuantLayer], what: str) -> tuple[str, int]:
    if not layers:
        raise ValueError(f"{what} needs a model converted by quantize_ (no quantized layer found)")
    configs = {(layer.quantizer.name, layer.quantizer.bits) for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"{what} supports one quantizer configuration per model, found {sorted(configs)}")
    ((name, bits),) = configs
    return name, bits


def export_packed(
    model: nn.Module,
    path: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write ``model`` (converted by ``quantize_``) as a packed safetensors file; returns its size in bytes.

    The file's layout is described in the module docstring.

    Args:
        model: a quantized model; its quantized layers must share one quantizer configuration.
        path: the file to write (atomically); ``.safetensors`` is the usual suffix.
        architecture: how ``load_packed`` rebuilds the model without being given one: ``{"model": registry
            name, "num_classes", "in_channels", "image_size"}``.
        metadata: anything else to keep with it (JSON values).

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: no quantized layer, several quantizer configurations, or a ``state_dict`` entry whose name
            is that of a layer's codes or scale (``<layer>.weight.codes``, ``<layer>.weight.scale``).
        TypeError: ``architecture`` or ``metadata`` holds a value JSON cannot represent.
        OSError: the file cannot be written.

    Example:
        >>> from metaquant.export import export_packed, load_packed
        >>> def net():
        ...     return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> model = mq.quantize_(net(), mq.QuantConfig("dorefa", 1)).eval()
        >>> size = export_packed(model, "tiny.safetensors", metadata={"test_acc": 91.5})
        >>> loaded = load_packed("tiny.safetensors", net())  # the architecture to fill: plain Linear layers
        >>> x = torch.randn(3, 64)
        >>> torch.equal(loaded(x), model(x)), size < 64 * 32 * 4  # 1 bit, not 32, per quantized weight
        (True, True)

        Any safetensors reader sees the codes, the scales and the metadata:

        >>> import json
        >>> from safetensors import safe_open
        >>> with safe_open("tiny.safetensors", framework="np") as f:
        ...     print(f.get_tensor("0.weight.codes").dtype, f.get_tensor("0.weight.codes").shape,
        ...           json.loads(f.metadata()["codes"])["0.weight"])
        uint8 (256,) {'shape': [32, 64], 'offset': 0, 'signed': False}
    """

    layers = quantized_layers(model)
    name, bits = _single_config(layers, "export_packed")
    # every state_dict key of a quantized weight (a shared module's under each of its names); a weight tied to a
    # layer left in full precision is stored as it is under that layer's key
    weight_keys = quantized_weight_keys(model)
    tensors: dict[str, Tensor] = {}
    codes: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Tensor) -> None:
        if key in tensors:
            raise ValueError(
                f"export_packed: the state_dict entry {key!r} has the name of a quantized weight's codes or scale"
            )
        # safetensors refuses tensors that share memory (tied weights): each entry gets its own copy.
        tensors[key] = value.detach().cpu().contiguous().clone()

    with torch.no_grad():
        state = model.state_dict()
        for key in weight_keys:  # the codes' names first, so that a clash is reported whatever the order
            tensors[f"{key}.codes"] = tensors[f"{key}.scale"] = torch.empty(0)
        for key, value in state.items():
            layer = weight_keys.get(key)
            if layer is None:
                put(key, value)
                continue
            encoded = layer.quantizer.encode(value.detach().cpu())
            shift = _offset(encoded, bits)
            del tensors[f"{key}.codes"], tensors[f"{key}.scale"]
            put(f"{key}.codes", pack_bits(encoded.codes.to(torch.int64) + shift, bits))
            put(f"{key}.scale", encoded.scale)
            codes[key] = {
                "shape": list(encoded.codes.shape),
                "offset": shift,
                "signed": encoded.codes.dtype == torch.int8,
            }

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    header = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "quantizer": compact({"name": name, "bits": bits}),
        "architecture": compact(architecture),
        "codes": compact(codes),
        "metadata": compact(metadata or {}),
    }
    blob = save(tensors, metadata=header)
    atomic_write_bytes(Path(path), blob)
    return len(blob)


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the stored tensors of a packed file, of either format version (codes still packed).

    Args:
        path: a file written by ``export_packed`` (format version 2, safetensors) or by an earlier metaquant
            (version 1).

    Returns:
        ``(header, tensors)``. ``header`` holds ``"version"``, ``"quantizer"`` (``{"name", "bits"}``),
        ``"architecture"``, ``"metadata"`` and ``"tensors"``, one entry per stored tensor with its ``"name"``
        and ``"kind"``: ``"float"`` (a ``state_dict`` entry), ``"codes"`` (a quantized weight, under the
        weight's own name, with ``"shape"``, ``"offset_code"`` and ``"signed"``) or ``"scale"``
        (``<weight>.scale``). ``tensors`` maps those names to the stored tensors, codes as packed bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a packed file, a damaged or truncated one, or another format version.

    Example:
        >>> from metaquant.export import export_packed, read_packed
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(10, 3)), mq.QuantConfig("bwn", 1))
        >>> _ = export_packed(model, "linear.safetensors", metadata={"note": "demo"})
        >>> header, tensors = read_packed("linear.safetensors")
        >>> header["version"], header["quantizer"], header["metadata"]
        (2, {'name': 'bwn', 'bits': 1}, {'note': 'demo'})
        >>> [(e["name"], e["kind"]) for e in header["tensors"]], tensors["0.weight"].shape  # 30 bits: 4 bytes
        ([('0.bias', 'float'), ('0.weight', 'codes'), ('0.weight.scale', 'scale')], torch.Size([4]))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open("rb") as f:
        start = f.read(9)
    if start[:8] == LEGACY_MAGIC:
        return _read_legacy(path)
    if len(start) < 9 or start[8:9] != b"{":  # a safetensors file starts with its header's length, then "{"
        raise ValueError(f"{path} is not a {FORMAT} file")
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:

    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is damaged or truncated ({err})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a {FORMAT} (its metadata has no format {FORMAT!r})")
    if info.get("format_version") != str(VERSION):
        raise ValueError(
            f"{path} has format version {info.get('format_version')}; this metaquant reads versions "
            f"{LEGACY_VERSION} and {VERSION}"
        )
    try:
        quantizer, architecture, codes, metadata = (
            json.loads(info[k]) for k in ("quantizer", "architecture", "codes", "metadata")
        )
        entries: list[dict[str, Any]] = []
        tensors: dict[str, Tensor] = {}
        for key, value in stored.items():
            if key.endswith(".codes") and key[: -len(".codes")] in codes:
                weight = key[: -len(".codes")]
                spec = codes[weight]
                entries.append(
                    {
                        "name": weight,
                        "kind": "codes",
                        "shape": spec["shape"],
                        "offset_code": spec["offset"],
                        "signed": spec["signed"],
                    }
                )
                tensors[weight] = value
            elif key.endswith(".scale") and key[: -len(".scale")] in codes:
                entries.append({"name": key, "kind": "scale"})
                tensors[key] = value
            else:
                entries.append({"name": key, "kind": "float"})
                tensors[key] = value
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} has a damaged header ({type(err).__name__}: {err})") from None
    header = {
        "version": VERSION,
        "architecture": architecture,
        "quantizer": quantizer,
        "metadata": metadata,
        "tensors": entries,
    }
    return header, tensors


_LEGACY_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bool": torch.bool,
}


def _read_legacy(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Format version 1: ``LEGACY_MAGIC``, a uint64 little-endian header length ``H``, ``H`` bytes of
    zlib-compressed JSON (``{"version": 1, "architecture", "quantizer", "metadata", "tensors": [{"name", "kind",
    "dtype", "shape", "offset", "nbytes", ...}]}``), then the tensors' little-endian bytes at their offsets."""
    raw = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", raw[8:16])
        header = json.loads(zlib.decompress(raw[16 : 16 + length]))
    except (struct.error, ValueError, zlib.error) as err:
        raise ValueError(f"{path} has a damaged header ({err})") from None
    if header.get("version") != LEGACY_VERSION:
        raise ValueError(
            f"{path} has format version {header.get('version')}; this metaquant reads versions "
            f"{LEGACY_VERSION} and {VERSION}"
        )
    payload = memoryview(raw)[16 + length :]
    tensors = {}
    if not isinstance(header.get("tensors"), list) or not isinstance(header.get("quantizer"), dict):
        raise ValueError(f"{path} has a damaged header (no tensor index or quantizer)")
    for e in header["tensors"]:
        if e["offset"] + e["nbytes"] > len(payload):
            raise ValueError(f"{path} is truncated: {e['name']} lies beyond the end of the file")
        data = bytearray(payload[e["offset"] : e["offset"] + e["nbytes"]])
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        dtype = _LEGACY_DTYPES[e["dtype"]]
        tensors[e["name"]] = flat if e["kind"] == "codes" else flat.view(dtype).reshape(e["shape"])
    return header, tensors


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """An inference model from a packed file: plain Conv2d/Linear layers holding the decoded ``Ŵ``.

    Reads both format versions (``read_packed``).

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
        >>> _ = export_packed(model, "resnet8.safetensors", architecture=arch)
        >>> net = load_packed("resnet8.safetensors")  # rebuilt from the registry; ordinary Conv2d and Linear
        >>> x = torch.randn(2, 1, 28, 28)
        >>> type(net.fc).__name__, torch.equal(net(x), model(x))
        ('Linear', True)
    """
    header, tensors = read_packed(path)
    try:
        return _build_packed(path, header, tensors, model)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} has a damaged header (missing or wrong entry {err})") from None


def _build_packed(
    path: str | Path, header: dict[str, Any], tensors: dict[str, Tensor], model: nn.Module | None
) -> nn.Module:
    if model is None:
        arch = header.get("architecture")
        if not arch:
            raise ValueError(f"{path} does not name its architecture: pass the model to load_packed(path, model)")
        model = get_model(
            arch["model"],
            num_classes=arch["num_classes"],
            in_channels=arch["in_channels"],
            image_size=arch["image_size"],
        )
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
    _untie(model, {e["name"]: state[e["name"]] for e in header["tensors"] if e["kind"] == "codes"})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the model: {err}") from None
    return model.eval()


def _untie(model: nn.Module, quantized: dict[str, Tensor]) -> None:
    """Give the ``state_dict`` keys in ``quantized`` (key: its decoded ``Ŵ``) a Parameter of their own where
    ``model`` ties them to keys that are not, or to quantized keys with another ``Ŵ``: a quantized use holds
    ``Ŵ``, a full-precision use ``W``, and one Parameter cannot hold both; nor two ``Ŵ``, which a weight tied
    between layers with a per-channel quantizer along different axes (a convolution and its transpose) has."""
    keys_of: dict[int, list[str]] = {}
    params = model.state_dict(keep_vars=True)
    for key, value in params.items():
        keys_of.setdefault(id(value), []).append(key)
    for keys in keys_of.values():
        groups: list[list[str]] = []  # the quantized uses with the same Ŵ stay tied among themselves
        for key in (key for key in keys if key in quantized):
            same = next((g for g in groups if torch.equal(quantized[g[0]], quantized[key])), None)
            if same is None:
                groups.append([key])
            else:
                same.append(key)
        if not groups or (len(groups) == 1 and len(groups[0]) == len(keys)):
            continue
        old = params[groups[0][0]]
        for group in groups:
            own = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
            for key in group:
                owner, _, attr = key.rpartition(".")
                setattr(model.get_submodule(owner), attr, own)


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
    return dequantize_(inference).eval()


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
    args = _float32_cpu(example if isinstance(example, tuple) else (example,))
    inference = materialize(model).cpu()
    kinds = {p.dtype for p in (*inference.parameters(), *inference.buffers()) if p.is_floating_point()}
    if kinds - {torch.float32}:
        logger.info("ONNX export: the model's %s tensors are exported as float32", ", ".join(sorted(map(str, kinds))))
        inference = inference.float()
    input_names, dynamic_shapes = _onnx_inputs(inference, args)
    kwargs = None
    if args and isinstance(args[-1], dict):
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
        shapes: Any = {p.name: shape for p, shape in zip(params, dynamic_shapes)}
        dynamic_shapes, args = shapes, ()
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
        proto = onnx.load(str(tmp))
    finally:
        exporter_log.setLevel(level)
        tmp.unlink(missing_ok=True)
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
