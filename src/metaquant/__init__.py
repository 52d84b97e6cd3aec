"""metaquant: train networks with low-bit weights, with a learned gradient through the quantizer.

The public API in one place; see the README for a tour.
"""

from . import quantizers
from .estimators import EWGS, STE, Identity, fake_quantize
from .layers import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    dequantize_,
    quantize_,
    quantized_layers,
    quantized_weight_fn,
)

__version__ = "0.1.0"
