r"""Low-bit export: a quantized model as a safetensors file of bit-packed codes, or as ONNX with integer weights.

**Packed file** (``export_packed``, ``load_packed``). A quantized layer's weight ``Ŵ = Q(A(W))`` is stored as its
integer codes (``ForwardQuantizer.encode``), packed ``bits`` per weight, plus its float scale(s); every other
tensor of the model (BatchNorm, biases, layers left in full precision) is stored as it is. ``load_packed``
rebuilds an ordinary full-precision model whose quantized layers hold the decoded ``Ŵ``: the numbers the
quantized model computes with, so the logits are the quantized model's (exactly, except where PyTorch runs
the loaded model's attention through its fused inference kernels, which round otherwise: ``load_packed``).

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: no pickle, and any
safetensors reader (``safetensors.safe_open(path, framework="np")``, in any framework) lists and loads every
tensor and the metadata without metaquant. For a quantized layer ``L``:

============================  ===========================================================================
tensor                        content
============================  ===========================================================================
``L.weight.codes``            ``uint8 [ceil(n·k / 8)]``: the ``n`` codes of ``k`` bits, bit-packed
                              (``pack_bits``: code ``i`` in bits ``i·k … i·k + k − 1`` of the stream,
                              least significant bit first, the last byte zero-padded)
``L.weight.scale``            the float scale(s) of ``Encoded.scale`` (``[1]``, ``[C_out, 1, ...]``, or per
                              group ``[C_out, ceil(C_in / g)]``)
any other name                a ``state_dict`` entry, as it is
============================  ===========================================================================

The header's ``__metadata__`` (strings; the structured ones hold JSON): ``"format"`` (``FORMAT``),
``"format_version"`` (``"2"``), ``"quantizer"`` (``{"name", "bits"}``, per group also ``"group_size"``),
``"decode"`` (``{"rule", "a", "b", "c"}``, per group also ``"group_size"``), ``"architecture"`` (``{"model",
"num_classes", "in_channels", "image_size"}`` or ``null``),
``"input_normalization"`` (how inputs are prepared, e.g. ``{"rule": "(pixels / 255 - mean) / std", "mean",
"std"}``, or ``null``), ``"codes"`` (for every ``L.weight``: ``{"shape", "offset", "signed"}``), ``"metadata"``
(the caller's values), only when activations are quantized ``"activations"`` (for every layer ``L`` with an input
quantizer: ``{"kind", "bits", ...}``, ``metaquant.activations.build_act_quantizer``'s argument; its learned tensors
are the ``state_dict`` entries ``L.input_quantizer.*``) and ``"digest"`` (``"sha256:"`` and the SHA-256 of the
file as written with 64 zeros in place of the digest's hex digits: ``integrity.seal``; every read checks it).

Decoding a weight: unpack ``prod(shape)`` codes of ``bits`` bits, subtract ``offset`` (signed codes are stored
plus ``offset`` so that they are non-negative) to get ``code``, reshape to ``shape``, and compute ``Ŵ = (a·code +
b)·scale + c`` in the scale's float type, in that order (``+ c`` only when ``c`` is not 0), the scale broadcast
against the codes. Per group (``uniform-group``; ``"decode"`` and ``"quantizer"`` then hold ``"group_size"``,
``g``) the scale is ``[C_out, ceil(C_in / g)]``: repeat each one ``g`` times along the last axis and keep the first
``C_in`` (numpy: ``np.repeat(scale, g, axis=-1)[:, :C_in]``; the last group of a row may be shorter):

===================  ==========  =====================================================  ==========================
quantizer            (a, b, c)   Ŵ                                                      scale
===================  ==========  =====================================================  ==========================
``dorefa`` k         (1, 0, −1)  ``code·scale − 1``, code in 0..2^k − 1                 ``2 / (2^k − 1)``
``bwn``              (2, −1, 0)  ``(2·code − 1)·scale``, code 0 or 1                    mean|W|, ``[1]``
``bwn-channel``      (2, −1, 0)  as ``bwn``                                             mean|W| per output channel
``ternary``          (1, 0, 0)   ``code·scale``, code in −1..1                          mean of the kept |W|
``uniform`` k        (1, 0, 0)   ``code·scale``, code in −(2^(k−1) − 1)..2^(k−1) − 1    max|W| / (2^(k−1) − 1)
``uniform-channel``  (1, 0, 0)   as ``uniform``                                         the same, per output channel
``uniform-group``    (1, 0, 0)   as ``uniform``                                         the same, per group of ``g``
``lsq`` k            (1, 0, 0)   ``code·scale``, code in −2^(k−1)..2^(k−1) − 1          the learned step, ``[1]``
``lsq-channel`` k    (1, 0, 0)   as ``lsq``                                             the learned steps, per channel
``dorefa-channel`` k (1, 0, −1)  as ``dorefa``                                          as ``dorefa``
===================  ==========  =====================================================  ==========================

A 1-bit DoReFa weight is thus ``±1`` (scale 2) and a BWN weight ``±mean|W|``. ``load_packed`` decodes the same
way; files written before the header held ``"decode"`` and ``"digest"`` decode with the quantizer's own rule
and load unchecked (a log line says so). Files of the earlier format (version 1: an ``MQPACK`` container with a
JSON header) still load.

**ONNX** (``export_onnx``). The inference model with BatchNorm folded into the convolutions, where every
quantized weight is an integer initializer (INT4 by default, INT2 with ``opset >= 25`` for codes in [−2, 1],
INT8 or INT16 for wider codes) followed by a ``DequantizeLinear`` with one scale per output channel (the
folded BatchNorm makes them differ; ``axis``), one per group (``uniform-group``: ``block_size``, from opset 21)
or one per layer: the standard "QDQ" form that ONNX runtimes and converters recognise. Run by onnxruntime with
``onnx_session_options()``, its logits equal the quantized model's up to float rounding (with quantized
activations, up to an activation that a different summation order puts across a rounding threshold; the default
options compute those in integers). Its ``metadata_props`` hold a content digest under
``DIGEST_KEY``; ``read_onnx`` checks it.
"""

from .bits import pack_bits, unpack_bits
from .inference import materialize
from .onnx_qdq import DIGEST_KEY as DIGEST_KEY
from .onnx_qdq import MIN_OPSET as MIN_OPSET
from .onnx_qdq import export_onnx, read_onnx
from .onnx_weights import levels
from .packed import DECODE_RULES as DECODE_RULES
from .packed import FORMAT, VERSION, export_packed, load_packed, read_packed
from .packed import LEGACY_MAGIC as LEGACY_MAGIC
from .packed import LEGACY_VERSION as LEGACY_VERSION
from .runtime import onnx_session_options

__all__ = [
    "pack_bits",
    "unpack_bits",
    "export_packed",
    "read_packed",
    "load_packed",
    "materialize",
    "levels",
    "export_onnx",
    "read_onnx",
    "onnx_session_options",
    "FORMAT",
    "VERSION",
]
