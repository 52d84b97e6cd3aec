"""metaquant: train networks with low-bit weights, with a learned gradient through the quantizer.

The public API in one place; see the README for a tour.
"""

from . import models, quantizers
from .algorithm import MetaQuant
from .estimators import EWGS, STE, Identity, fake_quantize
from .layers import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    dequantize_,
    quantize_,
    quantized_layers,
    forward_params_fn,
)

from .meta import LSTMFC, FCGrad, IdentityMeta, MetaQuantizer, MultiFC
from .quantizers import get_quantizer
from .trainer import Trainer

__version__ = "0.1.0"
