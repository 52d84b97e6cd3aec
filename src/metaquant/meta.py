"""Meta quantizers ``M_φ``: small networks that produce the gradient through the quantizer (docs/design.md §4).

A meta quantizer maps, coordinate by coordinate, the gradient reaching the quantized weight ``g_Ŵ`` and the
pre-processed weight ``W̃`` to ``g_W̃`` (paper §3.2; the paper's forms, which the default start below rewrites as
corrections of the STE):

* ``FCGrad``  ``g_W̃ = FCs_φ(g_Ŵ)``
* ``MultiFC`` ``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)``
* ``LSTMFC``  ``g_W̃ = g_Ŵ ⊙ FC_φ(LSTM_φ(W̃))``, one LSTM state per weight coordinate, carried by the caller
* ``IdentityMeta`` ``g_W̃ = g_Ŵ``, no parameters: with DoReFa, MetaQuant reduces to the STE, one step late.

``init_scheme="ste"`` (the default) makes the learned part a correction of the STE (``g_Ŵ + FCs_φ(g_Ŵ)``,
``g_Ŵ ⊙ (1 + FCs_φ(W̃))``, ``g_Ŵ ⊙ (1 + FC_φ(act(LSTM_φ(W̃))))``) whose last layer starts at zero, so step 1 is
exactly the STE, as in zero-initialised residual branches (Fixup, ReZero, LoRA); the paper's bias-free forms
cannot start there (``FCs_φ(0) = 0``). ``"paper"`` is the paper's form from PyTorch's default initialisation:
a random multiple of ``g_Ŵ`` at first, negative for some seeds, which then climbs the loss until ``φ`` has
learned its sign (docs/results/fashion-mnist-ste-start: under Adam it costs about a point of accuracy).

Every weight element is one sample of size 1 (inputs are flat ``[N]`` tensors); one instance serves all
quantized layers; FC layers have no bias (the paper's setting); the LSTM state is passed in and returned.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._lstm_kernel import (
    _HEAD_ACTIVATIONS,
    KEEP_GATES,
    _HeadActivation,
    _identity,
    _identity_grad,
    _kept_rows,
    _lstm_weights,
    _lstmfc_forward,
    _LSTMFCStep,
    _relu,
    _relu_grad,
    _tanh_grad,
    _tanh_into,
    default_chunk_rows,
)
from .validation import check_choice, check_int, check_number

__all__ = [
    "MetaQuantizer",
    "FCGrad",
    "MultiFC",
    "LSTMFC",
    "IdentityMeta",
    "NONLINEARITIES",
    "INIT_SCHEMES",
    "DEFAULT_INIT_SCHEME",
    "CoordinateMLP",
]

NONLINEARITIES = ("none", "relu", "tanh")
#: Where a learned meta quantizer starts (see the module's description).
INIT_SCHEMES = ("paper", "ste")
#: Where a meta quantizer starts unless told: at the STE (see the module's description).
DEFAULT_INIT_SCHEME = "ste"
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

LSTMState = tuple[Tensor, Tensor]


class CoordinateMLP(nn.Module):
    """``num_layers`` bias-free fully connected layers ``1 → hidden → … → hidden → 1`` applied to each scalar.

    The ``FCs_φ`` of ``FCGrad`` and ``MultiFC``; the non-linearity sits between layers, not after the last. Without
    one the stack is linear, ``f(x) = x·(W_L ⋯ W_1)``: the small matrices are multiplied first, the same function
    and gradients for ``O(hidden²)`` work instead of ``O(N·hidden)``.

    Raises:
        ValueError: ``hidden`` or ``num_layers`` is not an integer >= 1, or ``nonlinearity`` not in ``NONLINEARITIES``.
    """

    def __init__(self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none") -> None:
        super().__init__()
        check_int("hidden size", hidden, minimum=1)
        check_int("number of FC layers", num_layers, minimum=1)
        check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.nonlinearity = nonlinearity
        # decided once: without a non-linearity the stack collapses to one scalar (see above)
        self.collapses = nonlinearity == "none"
        sizes = [1] + [hidden] * (num_layers - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = _ACTIVATIONS[nonlinearity]() if nonlinearity != "none" else nn.Identity()

    def zero_last_layer(self) -> None:
        """Set the last layer's weights to zero: the stack's output is then 0 for every input."""
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[N]`` → ``[N]``."""
        if self.collapses:
            weights: list[Tensor] = [layer.weight for layer in self.layers]  # type: ignore[misc]
            product = weights[0]  # [hidden, 1]
            for weight in weights[1:]:
                product = weight @ product
            return x * product.reshape(())
        h = x.unsqueeze(1)  # [N, 1]
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h.squeeze(1)


class MetaQuantizer(nn.Module):
    """Base class: ``forward(grad_w_hat, w_tilde, state) -> (grad_w_tilde, new_state)`` on flat ``[N]`` tensors.

    ``M_φ`` of Algorithm 1 step 1: ``g_W̃ = M_φ(g_Ŵ, W̃)`` (Eq. 4-5); ``MetaQuant`` multiplies by ``c(W)``. A
    subclass implements ``forward`` with differentiable operations (``∂ℓ/∂φ`` must reach its parameters) and sets
    ``stateful = True`` with ``initial_state`` when it keeps a state per coordinate, as ``LSTMFC``.

    Example:
        >>> class Halve(mq.MetaQuantizer):
        ...     def forward(self, grad_w_hat, w_tilde, state=None):
        ...         return 0.5 * grad_w_hat, None
        >>> grad_w_tilde, state = Halve()(torch.tensor([2.0, -4.0]), torch.tensor([0.1, 0.9]))
        >>> grad_w_tilde.tolist(), state
        ([1.0, -2.0], None)
    """

    name: ClassVar[str] = ""
    #: Whether the meta quantizer carries a state per weight coordinate across iterations.
    stateful: ClassVar[bool] = False

    def initial_state(self, numel: int, device: torch.device, dtype: torch.dtype) -> Any:
        """The state of a layer with ``numel`` weights before its first iteration (None if stateless)."""
        return None

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """``(g_W̃, new_state)`` for one layer from ``g_Ŵ`` and ``W̃`` (flat ``[N]``), Eq. 4-5; ``state=None`` starts from
        ``initial_state``; stateless ones return a None state.
        """
        raise NotImplementedError  # pragma: no cover


class IdentityMeta(MetaQuantizer):
    """``g_W̃ = g_Ŵ``, no parameters: MetaQuant with it is the STE with a one-step-late update (docs/design.md §3).

    Example:
        >>> grad_w_tilde, state = mq.IdentityMeta()(torch.tensor([0.5, -1.0]), torch.rand(2))
        >>> grad_w_tilde.tolist(), state
        ([0.5, -1.0], None)
    """

    name: ClassVar[str] = "identity-meta"

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return grad_w_hat, None


class FCGrad(MetaQuantizer):
    """``g_W̃ = FCs_φ(g_Ŵ)``, the "FC-Grad" of docs/design.md §4 (paper: two layers, hidden 100, no non-linearity).

    It sees the incoming gradient only; without a non-linearity it is one learned scale times ``g_Ŵ``.
    ``init_scheme``: ``"ste"`` (the default) or ``"paper"`` (see the module's description).

    Raises:
        ValueError: as ``CoordinateMLP``, or an unknown ``init_scheme``.

    Example:
        >>> meta = mq.FCGrad()
        >>> sum(p.numel() for p in meta.parameters())  # 1 → 100 → 1, no bias
        200
        >>> g = torch.tensor([0.5, -1.0, 2.0])
        >>> torch.equal(meta(g, torch.rand(3))[0], g)  # the STE until φ learns
        True
        >>> paper = mq.FCGrad(init_scheme="paper")
        >>> torch.allclose(paper(g, torch.rand(3))[0], g * paper.net(torch.ones(1)))  # a random multiple of g
        True
    """

    name: ClassVar[str] = "fc-grad"

    def __init__(
        self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none", init_scheme: str = DEFAULT_INIT_SCHEME
    ) -> None:
        super().__init__()
        check_choice("init_scheme", init_scheme, INIT_SCHEMES)
        self.init_scheme = init_scheme
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)
        if init_scheme == "ste":
            self.net.zero_last_layer()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        out = self.net(grad_w_hat)
        return (grad_w_hat + out if self.init_scheme == "ste" else out), None


class MultiFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)``, the "MultiFC" of docs/design.md §4 (paper: two layers, hidden 100, no non-linearity).

    A learned function of the weight scales the incoming gradient element-wise (the original code used three
    layers). ``init_scheme``: ``"ste"`` (the default) or ``"paper"`` (see the module's description).

    Raises:
        ValueError: as ``CoordinateMLP``, or an unknown ``init_scheme``.

    Example:
        >>> meta = mq.MultiFC(hidden=8, nonlinearity="tanh")
        >>> g, w_tilde = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9])
        >>> torch.allclose(meta(g, w_tilde)[0], g * (1 + meta.net(w_tilde)))
        True
        >>> paper = mq.MultiFC(hidden=8, nonlinearity="tanh", init_scheme="paper")
        >>> torch.allclose(paper(g, w_tilde)[0], g * paper.net(w_tilde))
        True
    """

    name: ClassVar[str] = "multifc"

    def __init__(
        self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none", init_scheme: str = DEFAULT_INIT_SCHEME
    ) -> None:
        super().__init__()
        check_choice("init_scheme", init_scheme, INIT_SCHEMES)
        self.init_scheme = init_scheme
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)
        if init_scheme == "ste":
            self.net.zero_last_layer()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        multiplier = self.net(w_tilde)
        return grad_w_hat * (1 + multiplier if self.init_scheme == "ste" else multiplier), None


class LSTMFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FC_φ(act(LSTM_φ(W̃)))``, the "LSTMFC" of docs/design.md §4, with a state per weight coordinate.

    Paper: one LSTM layer, hidden 100, one FC. A layer's state is ``(h, c)``, each ``[num_lstm, N, hidden]``; each
    call runs one LSTM time step per coordinate and returns the new state, which the caller carries (detached);
    ``state=None`` starts from zeros without materializing them. The parameters are ``self.lstm`` (an
    ``nn.LSTM(1, hidden, num_lstm)``'s, so checkpoints load either way) and ``self.fc``; the step is a fused cell
    with its own backward (``_lstm_kernel``): ``nn.LSTM``'s values and gradients to rounding, much faster and leaner.

    Args:
        chunk_size: coordinates processed at once (None: ``default_chunk_rows(device)``); speed and memory only.
        keep_gates: the share of coordinates in ``[0, 1]`` whose gates are kept for the backward pass (the others
            are recomputed): 0 the leanest; 1 skips one matrix product for ``N·4·hidden·num_lstm`` more floats,
            the fastest where the allocator reuses freed memory (docs/performance.md).
        init_scheme: ``"ste"`` (``1 + FC_φ(·)``, the FC starting at zero; the default) or ``"paper"``.

    Raises:
        ValueError: ``hidden``, ``num_lstm`` or ``chunk_size`` not an integer >= 1, ``keep_gates`` not in ``[0, 1]``,
            an unknown ``nonlinearity``; when called, inputs in another dtype than the parameters (as ``nn.LSTM``).

    Example:
        >>> meta = mq.LSTMFC(hidden=8)
        >>> g, w_tilde = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9])
        >>> out, (h, c) = meta(g, w_tilde)  # first iteration: from zeros
        >>> out.shape, h.shape
        (torch.Size([3]), torch.Size([1, 3, 8]))
        >>> out, (h, c) = meta(g, w_tilde, (h, c))  # the next one, from the carried state
    """

    name: ClassVar[str] = "lstmfc"
    stateful: ClassVar[bool] = True

    def __init__(
        self,
        hidden: int = 100,
        num_lstm: int = 1,
        nonlinearity: str = "none",
        chunk_size: int | None = None,
        keep_gates: float = KEEP_GATES,
        init_scheme: str = DEFAULT_INIT_SCHEME,
    ) -> None:
        super().__init__()
        check_choice("init_scheme", init_scheme, INIT_SCHEMES)
        check_int("hidden size", hidden, minimum=1)
        check_int("number of LSTM layers", num_lstm, minimum=1)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        check_number("keep_gates", keep_gates, 0, 1)
        check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.hidden, self.num_lstm, self.chunk_size, self.keep_gates = hidden, num_lstm, chunk_size, keep_gates
        self.nonlinearity = nonlinearity
        self.head_activation = _HEAD_ACTIVATIONS[nonlinearity]  # chosen once, used by the fused step
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=num_lstm)
        self.activation = _ACTIVATIONS[nonlinearity]() if nonlinearity != "none" else nn.Identity()
        self.fc = nn.Linear(hidden, 1, bias=False)
        self.init_scheme = init_scheme
        if init_scheme == "ste":
            nn.init.zeros_(self.fc.weight)

    def initial_state(self, numel: int, device: torch.device, dtype: torch.dtype) -> LSTMState:
        """Zeros ``(h, c)``, each ``[num_lstm, numel, hidden]``, on ``device`` in ``dtype``."""
        zeros = torch.zeros(self.num_lstm, numel, self.hidden, device=device, dtype=dtype)
        return zeros, zeros.clone()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, LSTMState]:
        x = w_tilde.reshape(-1)
        h0, c0 = (None, None) if state is None else (state[0].contiguous(), state[1].contiguous())
        weights = _lstm_weights(self.lstm)
        dtype = self.fc.weight.dtype
        for t in (x, h0, c0):
            if t is not None and t.dtype != dtype:  # as nn.LSTM refuses it
                raise ValueError(
                    f"LSTMFC input dtype ({t.dtype}) does not match weight dtype ({dtype}): "
                    f"convert w_tilde and the state, or the meta quantizer"
                )
        rows = self.chunk_size or default_chunk_rows(x.device)
        args = (x, h0, c0, self.fc.weight)
        with contextlib.ExitStack() as stack:
            if torch.is_autocast_enabled(x.device.type):  # the step runs in the parameters' dtype
                stack.enter_context(torch.autocast(x.device.type, enabled=False))
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*args, *weights)):
                kept_rows = _kept_rows(self.keep_gates, rows, x.shape[0])
                scale, h, c = _LSTMFCStep.apply(*args, self.head_activation, rows, kept_rows, *weights)
            else:
                scale, h, c, _ = _lstmfc_forward(x, h0, c0, weights, self.fc.weight, self.head_activation, rows)
        return grad_w_hat * (1 + scale if self.init_scheme == "ste" else scale), (h, c)


META_QUANTIZERS: dict[str, type[MetaQuantizer]] = {cls.name: cls for cls in (FCGrad, MultiFC, LSTMFC)}

# An LSTMFC module pickled whole names its head activation: this stable path, wherever the kernel lives.
for _obj in (_HeadActivation, _identity, _identity_grad, _relu, _relu_grad, _tanh_into, _tanh_grad):
    _obj.__module__ = __name__
del _obj
