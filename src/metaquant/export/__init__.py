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

from .bits import pack_bits, unpack_bits
from .inference import materialize
from .onnx_qdq import MIN_OPSET as MIN_OPSET
from .onnx_qdq import export_onnx, levels
from .packed import FORMAT, VERSION, export_packed, load_packed, read_packed
from .packed import LEGACY_MAGIC as LEGACY_MAGIC
from .packed import LEGACY_VERSION as LEGACY_VERSION

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
