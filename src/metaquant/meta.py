"""Meta quantizers ``M_φ``: small networks that produce the gradient through the quantizer (DESIGN §4).

A meta quantizer maps, coordinate by coordinate, the gradient reaching the quantized weight ``g_Ŵ`` and the
pre-processed weight ``W̃`` to ``g_W̃`` (paper §3.2):

* ``FCGrad``  ``g_W̃ = FCs_φ(g_Ŵ)``
* ``MultiFC`` ``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)``
* ``LSTMFC``  ``g_W̃ = g_Ŵ ⊙ FC_φ(LSTM_φ(W̃))``, one LSTM state per weight coordinate, carried across
  iterations (the caller keeps it; see ``initial_state``)
* ``IdentityMeta`` ``g_W̃ = g_Ŵ``, no parameters: with DoReFa, MetaQuant's step then reduces to STE with the
  paper's late update (used in tests and ablations).

Every weight element is one sample of size 1, so inputs are flat ``[N]`` tensors; one instance is shared by all
quantized layers. Fully connected layers have no bias (the paper's setting). The modules hold only parameters
and configuration: the LSTM state is passed in and returned.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["MetaQuantizer", "FCGrad", "MultiFC", "LSTMFC", "IdentityMeta", "NONLINEARITIES", "CoordinateMLP"]

NONLINEARITIES = ("none", "relu", "tanh")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

LSTMState = tuple[Tensor, Tensor]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonlinearity(value: str) -> None:
    if value not in NONLINEARITIES:
        raise ValueError(f"nonlinearity {value!r} is not supported; allowed: {', '.join(NONLINEARITIES)}")


class CoordinateMLP(nn.Module):
    """``num_layers`` bias-free fully connected layers ``1 → hidden → … → hidden → 1`` applied to each scalar.

    The ``FCs_φ`` of ``FCGrad`` and ``MultiFC`` (DESIGN §4): every element of the input is one sample of size 1,
    and the non-linearity (if any) sits between two layers, not after the last one.

    Without a non-linearity the stack is linear in its input, so ``f(x) = x·(W_L ⋯ W_1)``: we multiply the
    small matrices first (``[1, 1]`` result) instead of pushing ``N × hidden`` activations through, the same
    function and the same gradients for ``O(hidden²)`` work instead of ``O(N·hidden)``.

    Args:
        hidden: width of the hidden layers.
        num_layers: number of fully connected layers (1: a single ``1 → 1`` scale).
        nonlinearity: between the layers: ``"none"`` (the paper's setting), ``"relu"`` or ``"tanh"``.

    Raises:
        ValueError: ``hidden`` or ``num_layers`` is not an integer >= 1, or ``nonlinearity`` is not one of
            ``NONLINEARITIES`` (the message lists them).

    Example:
        >>> net = mq.meta.CoordinateMLP(hidden=4, num_layers=2)
        >>> x = torch.tensor([1.0, -2.0, 0.5])
        >>> net(x).shape
        torch.Size([3])
        >>> torch.allclose(net(x), x * net(torch.ones(1)))  # no non-linearity: f(x) = x·(W_2 W_1)
        True
        >>> mq.meta.CoordinateMLP(nonlinearity="gelu")
        Traceback (most recent call last):
        ...
        ValueError: nonlinearity 'gelu' is not supported; allowed: none, relu, tanh
    """

    def __init__(self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none") -> None:
        super().__init__()
        _check_int("hidden size", hidden, 1)
        _check_int("number of FC layers", num_layers, 1)
        _check_nonlinearity(nonlinearity)
        self.nonlinearity = nonlinearity
        sizes = [1] + [hidden] * (num_layers - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = _ACTIVATIONS[nonlinearity]() if nonlinearity != "none" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[N]`` → ``[N]``."""
        if self.nonlinearity == "none":
            product = self.layers[0].weight  # [hidden, 1]
            for layer in self.layers[1:]:
                product = layer.weight @ product
            return x * product.reshape(())
        h = x.unsqueeze(1)  # [N, 1]
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h.squeeze(1)


class MetaQuantizer(nn.Module):
    """Base class: ``forward(grad_w_hat, w_tilde, state) -> (grad_w_tilde, new_state)`` on flat ``[N]`` tensors.

    A meta quantizer is ``M_φ`` of Algorithm 1, step 1: ``g_W̃ = M_φ(g_Ŵ, W̃)`` (Eq. 4-5); ``MetaQuant`` then
    multiplies by ``c(W)`` to get ``g_W``. A subclass implements ``forward`` with differentiable operations, so
    that ``∂ℓ/∂φ`` reaches its parameters, and sets ``stateful = True`` (with ``initial_state``) when it keeps a
    state per weight coordinate across iterations, as ``LSTMFC`` does.

    Example:
        A custom meta quantizer that halves the gradient (no parameters, like ``IdentityMeta``):

        >>> class Halve(mq.MetaQuantizer):
        ...     def forward(self, grad_w_hat, w_tilde, state=None):
        ...         return 0.5 * grad_w_hat, None
        >>> grad_w_tilde, state = Halve()(torch.tensor([2.0, -4.0]), torch.tensor([0.1, 0.9]))
        >>> grad_w_tilde.tolist(), state, Halve.stateful
        ([1.0, -2.0], None, False)
    """

    name: ClassVar[str] = ""
    #: Whether the meta quantizer carries a state per weight coordinate across iterations.
    stateful: ClassVar[bool] = False

    def initial_state(self, numel: int, device: torch.device, dtype: torch.dtype) -> Any:
        """The state of a layer with ``numel`` weights before its first iteration (None if stateless)."""
        return None

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """``g_W̃ = M_φ(g_Ŵ, W̃)`` (Eq. 4-5) for one layer.

        Args:
            grad_w_hat: ``g_Ŵ``, the layer's gradient w.r.t. its quantized weight, flattened: ``[N]``.
            w_tilde: ``W̃ = A(W)``, the layer's pre-processed weight, flattened: ``[N]``.
            state: the layer's state from the previous call (``None`` for stateless meta quantizers, or to
                start from ``initial_state``).

        Returns:
            ``(g_W̃, new_state)``: ``g_W̃`` is ``[N]``, ``new_state`` is ``None`` for stateless ones.

        Raises:
            NotImplementedError: in the base class; subclasses implement it.
        """
        raise NotImplementedError  # pragma: no cover


class IdentityMeta(MetaQuantizer):
    """``g_W̃ = g_Ŵ``: no parameters. MetaQuant with it is the STE with a one-step-late update.

    The trivial ``M_φ`` of Eq. 4-5: with DoReFa's ``c(W)``, ``g_W = g_Ŵ ⊙ c(W)`` is then the unclipped STE
    gradient of ``W`` (DESIGN §3). ``MetaQuant`` creates no meta optimizer for it.

    Example:
        >>> meta = mq.IdentityMeta()
        >>> g = torch.tensor([0.5, -1.0, 2.0])
        >>> grad_w_tilde, state = meta(g, torch.rand(3))
        >>> torch.equal(grad_w_tilde, g), state, list(meta.parameters())
        (True, None, [])
    """

    name: ClassVar[str] = "identity-meta"

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return grad_w_hat, None


class FCGrad(MetaQuantizer):
    """``g_W̃ = FCs_φ(g_Ŵ)`` (paper: two layers, hidden 100, no non-linearity).

    The "FC-Grad" meta quantizer of DESIGN §4, ``M_φ`` of Eq. 4-5: it sees the incoming gradient only, not the
    weight. Without a non-linearity it is one learned scale times ``g_Ŵ``.

    Args:
        hidden: width of the hidden layers.
        num_layers: number of fully connected layers (bias-free).
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the layers.

    Raises:
        ValueError: as ``CoordinateMLP``: ``hidden`` or ``num_layers`` not an integer >= 1, or an unknown
            ``nonlinearity``.

    Example:
        >>> meta = mq.FCGrad()
        >>> sum(p.numel() for p in meta.parameters())  # 1 → 100 → 1, no bias
        200
        >>> g = torch.tensor([0.5, -1.0, 2.0])
        >>> out, _ = meta(g, torch.rand(3))
        >>> torch.allclose(out, meta(g, torch.rand(3))[0]), torch.allclose(out, g * meta.net(torch.ones(1)))
        (True, True)
    """

    name: ClassVar[str] = "fc-grad"

    def __init__(self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none") -> None:
        super().__init__()
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.net(grad_w_hat), None


class MultiFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)`` (paper: two layers, hidden 100, no non-linearity).

    The "MultiFC" meta quantizer of DESIGN §4, ``M_φ`` of Eq. 4-5: a learned function of the weight ``W̃``
    scales the incoming gradient element-wise (the original code's default had three layers).

    Args:
        hidden: width of the hidden layers.
        num_layers: number of fully connected layers (bias-free).
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the layers.

    Raises:
        ValueError: as ``CoordinateMLP``: ``hidden`` or ``num_layers`` not an integer >= 1, or an unknown
            ``nonlinearity``.

    Example:
        >>> meta = mq.MultiFC(hidden=8, nonlinearity="tanh")
        >>> g, w_tilde = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9])
        >>> out, state = meta(g, w_tilde)
        >>> torch.allclose(out, g * meta.net(w_tilde)), state
        (True, None)
        >>> meta(torch.zeros(3), w_tilde)[0].tolist()  # no gradient in, no gradient out
        [0.0, 0.0, 0.0]
    """

    name: ClassVar[str] = "multifc"

    def __init__(self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none") -> None:
        super().__init__()
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return grad_w_hat * self.net(w_tilde), None


class LSTMFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FC_φ(act(LSTM_φ(W̃)))`` with a hidden state per weight coordinate.

    The "LSTMFC" meta quantizer of DESIGN §4, ``M_φ`` of Eq. 4-5 (paper: one LSTM layer, hidden 100, one FC).
    The state of a layer with ``N`` weights is ``(h, c)``, each ``[num_lstm, N, hidden]``. Each call runs one
    LSTM time step for every coordinate (a batch of ``N`` sequences of length 1) from the given state and
    returns the new state; the caller carries it to the next iteration, detached. With ``state=None`` the call
    starts from ``initial_state`` (zeros).

    Args:
        hidden: hidden size of the LSTM (and input size of the FC layer).
        num_lstm: number of stacked LSTM layers.
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the LSTM and the FC layer.

    Raises:
        ValueError: ``hidden`` or ``num_lstm`` not an integer >= 1, or an unknown ``nonlinearity``.

    Example:
        >>> meta = mq.LSTMFC(hidden=8)
        >>> g, w_tilde = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9])
        >>> out, (h, c) = meta(g, w_tilde)  # first iteration: from zeros
        >>> out.shape, h.shape, meta.stateful
        (torch.Size([3]), torch.Size([1, 3, 8]), True)
        >>> torch.equal(out, meta(g, w_tilde, meta.initial_state(3, w_tilde.device, w_tilde.dtype))[0])
        True
        >>> torch.allclose(out, meta(g, w_tilde, (h, c))[0])  # the next iteration, from the carried state
        False
    """

    name: ClassVar[str] = "lstmfc"
    stateful: ClassVar[bool] = True

    def __init__(self, hidden: int = 100, num_lstm: int = 1, nonlinearity: str = "none") -> None:
        super().__init__()
        _check_int("hidden size", hidden, 1)
        _check_int("number of LSTM layers", num_lstm, 1)
        _check_nonlinearity(nonlinearity)
        self.hidden, self.num_lstm = hidden, num_lstm
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=num_lstm)
        self.activation = _ACTIVATIONS[nonlinearity]() if nonlinearity != "none" else nn.Identity()
        self.fc = nn.Linear(hidden, 1, bias=False)

    def initial_state(self, numel: int, device: torch.device, dtype: torch.dtype) -> LSTMState:
        """Zeros ``(h, c)``, each ``[num_lstm, numel, hidden]``, on ``device`` in ``dtype``."""
        zeros = torch.zeros(self.num_lstm, numel, self.hidden, device=device, dtype=dtype)
        return zeros, zeros.clone()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, LSTMState]:
        if state is None:
            state = self.initial_state(w_tilde.numel(), w_tilde.device, w_tilde.dtype)
        out, new_state = self.lstm(w_tilde.reshape(1, -1, 1), state)  # out: [1, N, hidden]
        scale = self.fc(self.activation(out[0])).squeeze(1)  # [N]
        return grad_w_hat * scale, new_state


META_QUANTIZERS: dict[str, type[MetaQuantizer]] = {cls.name: cls for cls in (FCGrad, MultiFC, LSTMFC)}
