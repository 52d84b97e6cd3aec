"""Quantized recurrent layers: ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` with every weight matrix quantized."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..quantizers import ForwardQuantizer
from .base import QuantConfig
from .views import _MultiWeight, _views


class _QuantRecurrent(_MultiWeight):
    """A recurrent layer (``nn.RNNBase``) whose weight matrices are quantized, each through a ``QuantWeight``."""

    _flat_weights: list[Tensor | None]
    _flat_weights_names: list[str]

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quant_init(quantizer if quantizer is not None else QuantConfig().forward_quantizer, self.float_base)

    def _weight_names(self) -> list[tuple[str, str | None]]:
        names = set(self._flat_weights_names)
        pairs = []
        for name in self._flat_weights_names:
            if name.startswith("weight_"):
                bias = "bias_" + name[len("weight_") :]
                pairs.append((name, bias if bias in names else None))  # weight_hr (projection) has no bias
        return pairs

    def forward(self, input: Any, hx: Any = None) -> Any:
        # nn.RNNBase's forward computes with the list self._flat_weights: it gets the quantized weights (and the
        # biases they go with) for this call, and its own list back afterwards.
        flat = [getattr(self, name) for name in self._flat_weights_names]
        position = {name: i for i, name in enumerate(self._flat_weights_names)}
        for name, view in _views(self).items():
            weight, bias = view.forward_params()
            flat[position[name]] = weight
            if view.bias_name is not None:
                flat[position[view.bias_name]] = bias
        own = self.__dict__["_flat_weights"]
        self.__dict__["_flat_weights"] = flat
        try:
            return super().forward(input, hx)
        finally:
            self.__dict__["_flat_weights"] = own


class QuantRNN(_QuantRecurrent, nn.RNN):
    """``nn.RNN`` computing with quantized ``weight_ih_l*``/``weight_hh_l*`` (on request: ``include=("recurrent",)``).

    Example:
        >>> rnn = mq.layers.QuantRNN(3, 4, batch_first=True)
        >>> sorted(rnn.quantized_weights)
        ['weight_hh_l0', 'weight_ih_l0']
        >>> x = torch.randn(2, 5, 3)
        >>> expected = torch.nn.RNN(3, 4, batch_first=True)
        >>> _ = expected.load_state_dict({k: rnn.quantizer_of(k)(v) if "weight" in k else v
        ...                               for k, v in rnn.state_dict().items()})
        >>> torch.allclose(rnn(x)[0], expected(x)[0])
        True
    """

    float_base = nn.RNN


class QuantLSTM(_QuantRecurrent, nn.LSTM):
    """``nn.LSTM`` computing with its weight matrices quantized (``weight_ih``, ``weight_hh`` and, with
    ``proj_size``, ``weight_hr`` of every layer and direction; on request: ``include=("recurrent",)``).

    Example:
        >>> lstm = mq.layers.QuantLSTM(3, 4, num_layers=2, bidirectional=True)
        >>> len(lstm.quantized_weights), lstm(torch.randn(5, 2, 3))[0].shape
        (8, torch.Size([5, 2, 8]))
    """

    float_base = nn.LSTM


class QuantGRU(_QuantRecurrent, nn.GRU):
    """``nn.GRU`` computing with its weight matrices quantized (on request: ``include=("recurrent",)``).

    Example:
        >>> gru = mq.layers.QuantGRU(3, 4)
        >>> out, h = gru(torch.randn(5, 3))  # unbatched input, as nn.GRU takes it
        >>> out.shape, sorted(gru.quantized_weights)
        (torch.Size([5, 4]), ['weight_hh_l0', 'weight_ih_l0'])
    """

    float_base = nn.GRU
