"""The packed file: a quantized model as a safetensors file of bit-packed codes and scales, and back.

The layout is described in ``metaquant.export``'s docstring.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from ..activations import build_act_quantizer, check_initialized
from ..files import atomic_write_bytes
from ..integrity import DIGEST_PLACEHOLDER, seal, verify_seal
from ..layers import (
    QuantLayer,
    dequantize_,
    input_quantizers,
    learned_weight_parameters,
    quantized_layers,
    quantized_weight_keys,
)
from ..layers.inputs import attach_input_quantizers
from ..models import get_model
from ..quantizers import Encoded, expand_groups, get_quantizer
from .bits import pack_bits, unpack_bits

FORMAT = "metaquant packed model"
VERSION = 2
LEGACY_VERSION = 1
LEGACY_MAGIC = b"MQPACK\x00\x00"
#: Each quantizer's decode rule ``Ŵ = (a·code + b)·scale + c``, as ``(a, b, c)``; the header's ``"decode"``.
DECODE_RULES: dict[str, tuple[int, int, int]] = {
    "dorefa": (1, 0, -1),
    "bwn": (2, -1, 0),
    "bwn-channel": (2, -1, 0),
    "ternary": (1, 0, 0),
    "uniform": (1, 0, 0),
    "uniform-channel": (1, 0, 0),
    "uniform-group": (1, 0, 0),
    "lsq": (1, 0, 0),
    "lsq-channel": (1, 0, 0),
    "dorefa-channel": (1, 0, -1),
}

logger = logging.getLogger(__name__)


def decode(codes: Tensor, scale: Tensor, rule: dict[str, Any]) -> Tensor:
    """``(a·codes + b)·scale + c`` in the scale's dtype, in this order (``+ c`` only when ``c`` is not 0), for
    ``rule`` = the header's ``{"a", "b", "c"}`` and, per group, ``"group_size"`` (each scale repeated that many
    times along the last axis, ``expand_groups``): the quantized weight, bit for bit."""
    if rule.get("group_size"):
        scale = expand_groups(scale, rule["group_size"], codes.shape[-1])
    w = (rule["a"] * codes.to(torch.int64) + rule["b"]).to(scale.dtype) * scale
    return w + rule["c"] if rule["c"] else w


def _offset(encoded: Encoded, num_levels: int) -> int:
    # Signed codes are shifted to be non-negative: ternary and uniform [-(2^(k-1)-1), 2^(k-1)-1] → [0, 2^k - 2],
    # lsq [-2^(k-1), 2^(k-1)-1] → [0, 2^k - 1]; half the number of levels, rounded down, in both cases.
    return num_levels // 2 if encoded.codes.dtype == torch.int8 else 0


def _single_config(layers: dict[str, QuantLayer], what: str) -> tuple[str, int, int | None]:
    """The quantizer name, bit width and group size (None: no groups) that every quantized layer shares."""
    if not layers:
        raise ValueError(f"{what} needs a model converted by quantize_ (no quantized layer found)")
    configs = {(q.name, q.bits, q.scale_group_size) for q in (layer.quantizer for layer in layers.values())}
    if len(configs) > 1:
        found = sorted((name, bits) + ((group,) if group else ()) for name, bits, group in configs)
        raise ValueError(f"{what} supports one quantizer configuration per model, found {found}")
    ((name, bits, group_size),) = configs
    return name, bits, group_size


def export_packed(
    model: nn.Module,
    path: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    input_normalization: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write ``model`` (converted by ``quantize_``) as a packed safetensors file; returns its size in bytes.

    The file's layout is described in ``metaquant.export``'s docstring.

    Args:
        model: a quantized model; its quantized layers must share one quantizer configuration.
        path: the file to write (atomically); ``.safetensors`` is the usual suffix.
        architecture: how ``load_packed`` rebuilds the model without being given one: ``{"model": registry
            name, "num_classes", "in_channels", "image_size"}``.
        input_normalization: how the model's inputs are prepared, e.g. ``{"rule": "(pixels / 255 - mean) /
            std", "mean": [...], "std": [...]}`` (JSON values), stored in the header as it is.
        metadata: anything else to keep with it (JSON values).

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: no quantized layer, several quantizer configurations, a quantizer whose decode is not one of
            ``DECODE_RULES``, a ``state_dict`` entry whose name is that of a layer's codes or scale
            (``<layer>.weight.codes``, ``<layer>.weight.scale``), or an LSQ input quantizer that no training-mode
            batch has initialised (``check_initialized``).
        TypeError: ``architecture``, ``input_normalization`` or ``metadata`` holds a value JSON cannot represent.
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

    name, bits, group_size = _single_config(quantized_layers(model), "export_packed")
    check_initialized(input_quantizers(model), "export_packed")
    if name not in DECODE_RULES:
        raise ValueError(
            f"export_packed: quantizer {name!r} has no decode rule of the format; allowed: {', '.join(DECODE_RULES)}"
        )
    rule: dict[str, int] = dict(zip("abc", DECODE_RULES[name]))
    groups = {"group_size": group_size} if group_size else {}  # only per group: the other files stay as they were
    rule.update(groups)
    tensors, codes = _packed_tensors(model, bits, rule)
    header = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "quantizer": _compact({"name": name, "bits": bits, **groups}),
        "decode": _compact({"rule": "(a * code + b) * scale + c", **rule}),
        "architecture": _compact(architecture),
        "input_normalization": _compact(input_normalization),
        "codes": _compact(codes),
        "metadata": _compact(metadata or {}),
        "digest": DIGEST_PLACEHOLDER,
    }
    activations = {name: q.spec() for name, q in input_quantizers(model).items()}
    if activations:  # their learned tensors are state_dict entries, stored as they are
        header["activations"] = _compact(activations)
    blob = seal(save(tensors, metadata=header))
    atomic_write_bytes(Path(path), blob)
    return len(blob)


def _packed_tensors(
    model: nn.Module, bits: int, rule: dict[str, int]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The file's tensors (each quantized weight as ``<key>.codes`` and ``<key>.scale``, every other ``state_dict``
    entry as it is) and the ``"codes"`` header entry: ``{key: {"shape", "offset", "signed"}}``."""
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
        for key in weight_keys:  # the codes' names first, so that a clash is reported whatever the order
            tensors[f"{key}.codes"] = tensors[f"{key}.scale"] = torch.empty(0)
        folded = {id(p) for p in learned_weight_parameters(model).values()}  # in the scales: not stored again
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) in folded:
                continue
            layer = weight_keys.get(key)
            if layer is None:
                put(key, value)
                continue
            encoded = layer.quantizer.encode(value.detach().cpu())
            if not torch.equal(decode(encoded.codes, encoded.scale, rule), layer.quantizer.decode(encoded)):
                raise ValueError(
                    f"export_packed: the quantizer of {key} ({type(layer.quantizer).__name__}) does not decode as "
                    f"its name's rule (a * code + b) * scale + c with {rule}"
                )
            shift = _offset(encoded, layer.quantizer.num_levels)
            del tensors[f"{key}.codes"], tensors[f"{key}.scale"]
            put(f"{key}.codes", pack_bits(encoded.codes.to(torch.int64) + shift, bits))
            put(f"{key}.scale", encoded.scale)
            signed = encoded.codes.dtype == torch.int8
            codes[key] = {"shape": list(encoded.codes.shape), "offset": shift, "signed": signed}
    return tensors, codes


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


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
        (``<weight>.scale``); version 2 also ``"decode"``, ``"input_normalization"``, ``"activations"``
        (``{layer: its input quantizer's spec}``) and ``"digest"`` (None in files without them). ``tensors``
        maps those names to the stored tensors, codes as packed bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a packed file, a damaged or truncated one (its content digest does not match its bytes),
            or another format version. A file without digest (written by an earlier metaquant) is read
            unchecked, with a log line that says so.

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
    raw = path.read_bytes()  # read once: the bytes checked are the bytes used
    if raw[:8] == LEGACY_MAGIC:
        logger.warning("%s has no content digest (format version %d): its data is not checked", path, LEGACY_VERSION)
        return _read_legacy(path, raw)
    if raw[8:9] != b"{":  # a safetensors file starts with its header's length, then "{"
        raise ValueError(f"{path} is not a {FORMAT} file")
    return _read_safetensors(path, raw)


def _open_safetensors(path: Path, raw: bytes) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The header's ``__metadata__`` and the tensors of a packed safetensors file, its content digest checked."""
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        info = json.loads(raw[8 : 8 + length]).get("__metadata__") or {}
        stored = load(raw)
    except (struct.error, ValueError, AttributeError, SafetensorError) as err:
        raise ValueError(f"{path} is damaged or truncated ({type(err).__name__}: {err})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a {FORMAT} (its metadata has no format {FORMAT!r})")
    if info.get("format_version") != str(VERSION):
        raise ValueError(
            f"{path} has format version {info.get('format_version')}; this metaquant reads versions "
            f"{LEGACY_VERSION} and {VERSION}"
        )
    if "digest" in info:
        verify_seal(raw, info["digest"], path)
    else:
        logger.warning("%s has no content digest (written by an earlier metaquant): its data is not checked", path)
    return info, stored


def _read_safetensors(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    info, stored = _open_safetensors(path, raw)
    try:
        quantizer, architecture, codes, metadata = (
            json.loads(info[k]) for k in ("quantizer", "architecture", "codes", "metadata")
        )
        extra = {
            k: json.loads(info[k]) if k in info else None for k in ("decode", "input_normalization", "activations")
        }
        entries: list[dict[str, Any]] = []
        tensors: dict[str, Tensor] = {}
        for key, value in sorted(stored.items()):  # in name order, as safetensors lists them
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
        **extra,
        "metadata": metadata,
        "tensors": entries,
        "digest": info.get("digest"),
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


def _read_legacy(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Format version 1: ``LEGACY_MAGIC``, a uint64 little-endian header length ``H``, ``H`` bytes of
    zlib-compressed JSON (``{"version": 1, "architecture", "quantizer", "metadata", "tensors": [{"name", "kind",
    "dtype", "shape", "offset", "nbytes", ...}]}``), then the tensors' little-endian bytes at their offsets."""
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
        The model in eval mode. Its logits equal the quantized model's bit for bit, with one exception: under
        ``torch.no_grad()`` PyTorch runs the loaded model's self-attention ``nn.MultiheadAttention`` and
        ``nn.TransformerEncoderLayer`` through fused kernels (the quantized model's attention never takes them),
        which round otherwise: there the logits agree to float rounding (in the tests, within 1e-6 of the largest
        logit for one attention layer, 2e-4 for a 4-layer 1-bit encoder) and bit for bit with gradients enabled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a damaged file (its content digest does not match) or another format version, one that
            does not fit ``model``, or (without ``model``) one that does not name its architecture.

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
    spec = header["quantizer"]
    quantizer = get_quantizer(spec["name"], spec["bits"], group_size=spec.get("group_size"))
    rule = header.get("decode")  # files written before the header held the rule: the quantizer's own decode
    state = {}
    for e in header["tensors"]:
        if e["kind"] == "float":
            state[e["name"]] = tensors[e["name"]].clone()
        elif e["kind"] == "codes":
            numel = math.prod(e["shape"])
            codes = unpack_bits(tensors[e["name"]], quantizer.bits, numel) - e["offset_code"]
            codes = codes.to(torch.int8 if e["signed"] else torch.uint8).reshape(e["shape"])
            scale = tensors[e["name"] + ".scale"]
            state[e["name"]] = decode(codes, scale, rule) if rule else quantizer.decode(Encoded(codes, scale))
    _untie(model, {e["name"]: state[e["name"]] for e in header["tensors"] if e["kind"] == "codes"})
    activations = header.get("activations") or {}
    try:
        attach_input_quantizers(model, {name: build_act_quantizer(spec) for name, spec in activations.items()})
    except AttributeError as err:
        raise ValueError(f"{path} does not fit the model: {err}") from None
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
