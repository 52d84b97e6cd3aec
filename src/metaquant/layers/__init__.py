"""Quantized layers and the in-place model surgery that installs them.

``quantize_(model, QuantConfig("dorefa", bits=1))`` turns the weight layers of any module into quantized layers
(first and last layer included, as in the paper). The conversion is in place: each module keeps its identity,
Parameters, options, hooks and ``state_dict`` keys and only changes class, so an optimizer built before or after
it trains the same tensors, and ``dequantize_`` gives back the plain ``torch.nn`` classes with an identical
``state_dict``.

What is converted (``SUPPORTED`` lists the classes):

* by default: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear`` and its subclasses that keep
  Linear's forward (attention's ``out_proj``), ``nn.MultiheadAttention`` (its input projection; its
  ``out_proj`` is a Linear);
* on request, ``include=("recurrent", "embedding")``: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (every weight matrix)
  and ``nn.Embedding``/``nn.EmbeddingBag``.

Every other module that holds a weight matrix, and every supported layer left out (a subclass with its own
forward, a lazy layer not yet initialized, a layer of a kind not included), stays in full precision, and a
warning names it with the reason unless a ``filter_fn`` chose the layers. Normalization layers and biases
always stay in full precision, as in the paper.

A ``QuantLayer`` is one quantized weight and the bias that goes with it. A convolution, linear or embedding
layer is its own ``QuantLayer``; a module with several weights (attention, recurrent layers) holds one
parameter-free ``QuantWeight`` per quantized weight, in its ``quantized_weights`` dict, that reads the module's
own Parameter. ``quantized_layers`` lists them all: they are what training algorithms work on.

A quantizer that learns tensors (``LSQ``'s step) has them held by each layer as Parameters (``weight_step``),
listed by ``learned_weight_parameters``; build the optimizer after ``quantize_`` so that it trains them.

With ``QuantConfig(activations=ActQuantConfig(...))`` each converted convolution and linear layer also holds an
``input_quantizer`` (``metaquant.activations``) that its forward applies to its input (``input_quantizers``
lists them).

Every forward pass of a quantized model computes with ``Ŵ = Q(A(W))``. By default ``Ŵ`` back-propagates with
the clipped STE. A training algorithm that needs other tensors in the forward pass (MetaQuant's look-ahead
weight, another classical estimator) installs them for the duration of one forward pass, with
``forward_tensors`` or ``forward_params_fn``; outside that scope the layers hold only parameters and
configuration. The fused inference paths of ``torch.nn`` that read the latent weights directly
(``nn.MultiheadAttention``'s fast path, ``nn.TransformerEncoderLayer``'s fused layer, ``nn.TransformerEncoder``'s
nested tensors) are never taken by a quantized model: the quantized attention always computes through
``F.multi_head_attention_forward`` with its ``Ŵ``, and ``quantize_`` turns the other two off in the modules
that contain quantized layers (``dequantize_`` turns them back on).
"""

from .attention import QuantMultiheadAttention
from .base import ParamFn as ParamFn
from .base import QuantConfig, QuantLayer
from .conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from .convert import (
    INCLUDE,
    SUPPORTED,
    dequantize_,
    learned_quantizer_parameters,
    learned_weight_parameters,
    quantize_,
    quantized_layers,
    quantized_weight_keys,
)
from .convert import FilterFn as FilterFn
from .convert import check_weight_hooks as check_weight_hooks
from .embedding import QuantEmbedding, QuantEmbeddingBag
from .forward import forward_params_fn, forward_tensors
from .inputs import TAKES_INPUT_QUANTIZER, input_quantizers
from .linear import QuantLinear
from .recurrent import QuantGRU, QuantLSTM, QuantRNN
from .views import QuantWeight

__all__ = [
    "QuantConfig",
    "QuantLayer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "QuantEmbedding",
    "QuantEmbeddingBag",
    "QuantWeight",
    "QuantMultiheadAttention",
    "QuantRNN",
    "QuantLSTM",
    "QuantGRU",
    "SUPPORTED",
    "INCLUDE",
    "quantize_",
    "dequantize_",
    "quantized_layers",
    "quantized_weight_keys",
    "learned_weight_parameters",
    "learned_quantizer_parameters",
    "forward_params_fn",
    "forward_tensors",
    "input_quantizers",
    "TAKES_INPUT_QUANTIZER",
]

# Models saved whole (``torch.save(model)``) name their layers' classes: this path, wherever a class is defined.
for _cls in (
    QuantConfig,
    QuantLayer,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    QuantEmbedding,
    QuantEmbeddingBag,
    QuantWeight,
    QuantMultiheadAttention,
    QuantRNN,
    QuantLSTM,
    QuantGRU,
):
    _cls.__module__ = __name__
del _cls
