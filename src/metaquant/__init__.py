"""metaquant: train networks with low-bit weights, with a learned gradient through the quantizer.

The public API in one place; see the README for a tour.
"""

from . import activations, averaging, batchnorm, data, distill, layout, models, precision, quantizers, schedules
from .activations import ActQuantConfig
from .algorithm import MetaQuant
from .averaging import ema_model
from .batchnorm import recompute_batchnorm_stats
from .distill import Distillation
from .estimators import EWGS, STE, Identity, fake_quantize
from .layers import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    dequantize_,
    forward_params_fn,
    quantize_,
    quantized_layers,
)
from .loop import Callback
from .meta import LSTMFC, FCGrad, IdentityMeta, MetaQuantizer, MultiFC
from .quantizers import get_quantizer
from .trainer import Trainer
from .training import evaluate, fit, restore_fit

__all__ = [
    "activations",
    "averaging",
    "batchnorm",
    "data",
    "distill",
    "layout",
    "models",
    "precision",
    "quantizers",
    "schedules",
    "QuantConfig",
    "ActQuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "quantize_",
    "dequantize_",
    "quantized_layers",
    "forward_params_fn",
    "get_quantizer",
    "fake_quantize",
    "STE",
    "Identity",
    "EWGS",
    "Trainer",
    "MetaQuant",
    "MetaQuantizer",
    "FCGrad",
    "MultiFC",
    "LSTMFC",
    "IdentityMeta",
    "evaluate",
    "fit",
    "restore_fit",
    "Callback",
    "recompute_batchnorm_stats",
    "ema_model",
    "Distillation",
]

__version__ = "0.1.0"
