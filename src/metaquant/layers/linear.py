"""The quantized ``nn.Linear``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import QuantLayer


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` computing with ``Q(A(W))``.

    Usually made by ``quantize_``, also from a subclass of ``nn.Linear`` that keeps Linear's forward (such as
    attention's ``out_proj``, whose class ``dequantize_`` restores); built directly it takes ``nn.Linear``'s
    arguments plus ``quantizer=``.

    Example:
        >>> layer = mq.QuantLinear(3, 2, quantizer=mq.quantizers.BWN())
        >>> layer
        QuantLinear(in_features=3, out_features=2, bias=True, quantizer=bwn, bits=1)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x @ mq.quantizers.BWN()(layer.weight).T + layer.bias)
        True
    """

    float_base = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantized_input(input), *self.forward_params())
