"""Meta quantizers ``M_φ``: small networks that produce the gradient through the quantizer (docs/design.md §4).

A meta quantizer maps, coordinate by coordinate, the gradient reaching the quantized weight ``g_Ŵ`` and the
pre-processed weight ``W̃`` to ``g_W̃`` (paper §3.2):

* ``FCGrad``  ``g_W̃ = FCs_φ(g_Ŵ)``
* ``MultiFC`` ``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)``
* ``LSTMFC``  ``g_W̃ = g_Ŵ ⊙ FC_φ(LSTM_φ(W̃))``, one LSTM state per weight coordinate, carried across
  iterations (the caller keeps it; see ``initial_state``)
* ``IdentityMeta`` ``g_W̃ = g_Ŵ``, no parameters: with DoReFa, MetaQuant's step then reduces to STE with the
  paper's late update (used in tests and ablations).

``init_scheme`` chooses where a learned one starts. ``"paper"``: PyTorch's default initialisation of the
layers, as the paper, so the first steps follow a random multiple of ``g_Ŵ`` (of either sign). ``"ste"``: the
learned part is a correction of the STE, ``FCGrad`` ``g_W̃ = g_Ŵ + FCs_φ(g_Ŵ)``, ``MultiFC``
``g_W̃ = g_Ŵ ⊙ (1 + FCs_φ(W̃))``, ``LSTMFC`` ``g_W̃ = g_Ŵ ⊙ (1 + FC_φ(act(LSTM_φ(W̃))))``, whose last layer starts at
zero: at step 1 ``g_W̃ = g_Ŵ`` exactly, for every input, and ``∂ℓ/∂φ`` reaches that last layer from the first
step (the others from the second), as in zero-initialised residual branches (Fixup, ReZero, LoRA). The paper's
bias-free forms cannot start at the STE: ``FCs_φ(0) = 0``, so MultiFC's multiplier is 0 at ``W̃ = 0``.

Every weight element is one sample of size 1, so inputs are flat ``[N]`` tensors; one instance is shared by all
quantized layers. Fully connected layers have no bias (the paper's setting). The modules hold only parameters
and configuration: the LSTM state is passed in and returned.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "MetaQuantizer",
    "FCGrad",
    "MultiFC",
    "LSTMFC",
    "IdentityMeta",
    "NONLINEARITIES",
    "INIT_SCHEMES",
    "CoordinateMLP",
]

NONLINEARITIES = ("none", "relu", "tanh")
#: Where a learned meta quantizer starts (see the module's description).
INIT_SCHEMES = ("paper", "ste")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

LSTMState = tuple[Tensor, Tensor]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonlinearity(value: str) -> None:
    if value not in NONLINEARITIES:
        raise ValueError(f"nonlinearity {value!r} is not supported; allowed: {', '.join(NONLINEARITIES)}")


def _check_init_scheme(value: str) -> None:
    if value not in INIT_SCHEMES:
        raise ValueError(f"init_scheme {value!r} is not supported; allowed: {', '.join(INIT_SCHEMES)}")


class CoordinateMLP(nn.Module):
    """``num_layers`` bias-free fully connected layers ``1 → hidden → … → hidden → 1`` applied to each scalar.

    The ``FCs_φ`` of ``FCGrad`` and ``MultiFC`` (docs/design.md §4): every element of the input is one sample of size 1,
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
    gradient of ``W`` (docs/design.md §3). ``MetaQuant`` creates no meta optimizer for it.

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

    The "FC-Grad" meta quantizer of docs/design.md §4, ``M_φ`` of Eq. 4-5: it sees the incoming gradient only, not the
    weight. Without a non-linearity it is one learned scale times ``g_Ŵ``.

    Args:
        hidden: width of the hidden layers.
        num_layers: number of fully connected layers (bias-free).
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the layers.
        init_scheme: ``"paper"`` (the paper's form and initialisation) or ``"ste"`` (a correction of the STE
            whose last layer starts at zero: see the module's description).

    Raises:
        ValueError: as ``CoordinateMLP``: ``hidden`` or ``num_layers`` not an integer >= 1, or an unknown
            ``nonlinearity``; an unknown ``init_scheme``.

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

    def __init__(
        self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none", init_scheme: str = "paper"
    ) -> None:
        super().__init__()
        _check_init_scheme(init_scheme)
        self.init_scheme = init_scheme
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)
        if init_scheme == "ste":
            self.net.zero_last_layer()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        out = self.net(grad_w_hat)
        return (grad_w_hat + out if self.init_scheme == "ste" else out), None


class MultiFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FCs_φ(W̃)`` (paper: two layers, hidden 100, no non-linearity).

    The "MultiFC" meta quantizer of docs/design.md §4, ``M_φ`` of Eq. 4-5: a learned function of the weight ``W̃``
    scales the incoming gradient element-wise (the original code's default had three layers).

    Args:
        hidden: width of the hidden layers.
        num_layers: number of fully connected layers (bias-free).
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the layers.
        init_scheme: ``"paper"`` (the paper's form and initialisation) or ``"ste"`` (a correction of the STE
            whose last layer starts at zero: see the module's description).

    Raises:
        ValueError: as ``CoordinateMLP``: ``hidden`` or ``num_layers`` not an integer >= 1, or an unknown
            ``nonlinearity``; an unknown ``init_scheme``.

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

    def __init__(
        self, hidden: int = 100, num_layers: int = 2, nonlinearity: str = "none", init_scheme: str = "paper"
    ) -> None:
        super().__init__()
        _check_init_scheme(init_scheme)
        self.init_scheme = init_scheme
        self.net = CoordinateMLP(hidden, num_layers, nonlinearity)
        if init_scheme == "ste":
            self.net.zero_last_layer()

    def forward(self, grad_w_hat: Tensor, w_tilde: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        multiplier = self.net(w_tilde)
        return grad_w_hat * (1 + multiplier if self.init_scheme == "ste" else multiplier), None


# --- LSTMFC: one LSTM step per coordinate, fused --------------------------------------------------------------
#
# For a network of N weights (N ≈ 270k for ResNet20) and hidden size H (100), LSTMFC's step is the largest
# piece of work in a MetaQuant iteration: the gate product h·W_hhᵀ alone is N·H·4H multiply-adds, twice a ResNet20
# forward pass on a CIFAR batch. ``nn.LSTM`` keeps, for its backward pass, the gates and more tensors of N × H.
# The functions below compute the same step block by block of rows (``chunk_size`` coordinates at a time): each
# block of gates ``[rows, 4H]`` is one matrix product (plus the input term, of size 1: an outer product) into a
# reused buffer, turned into the new state by in-place element-wise operations while it is still in cache. The
# autograd function saves tensors that exist anyway (the input, the old and the new state, the parameters) and
# the gates of a share ``keep_gates`` of the coordinates; its backward pass recomputes the other blocks of gates
# (one more matrix product) instead of keeping all N × 4H gates: time against memory, 0 (nothing kept beyond the
# new state and a few block-sized buffers) to 1 (no recomputation). Then per block: ∂/∂gates in place of the
# gates, and two products for the gradients of the weights.
#
# One sigmoid call makes all four gates: the cell gate's weights and bias are doubled and tanh(x) = 2·σ(2x) − 1
# (a CPU computes a sigmoid several times faster than a tanh; the two differ by rounding, at most 2e-7 in float32).

#: Rows of N processed at once on a CPU: a block of gates (4096 x 400 floats, 6.5 MB) stays in cache between its
#: matrix product and the element-wise work that follows. On a machine whose cores are oversubscribed (other
#: work), OpenMP threads spin at the end of every operation waiting for a descheduled peer, which made the step
#: 4x slower on 2 shared cores: ``OMP_WAIT_POLICY=PASSIVE`` in the environment cures it, and larger blocks
#: (``chunk_size=65536``: fewer operations) lessen it (benchmarks/lstmfc_time.py measures both).
CPU_CHUNK_ROWS = 4096
#: On a GPU, larger blocks: fewer kernel launches, a bounded buffer (65536 x 400 floats: 100 MB).
GPU_CHUNK_ROWS = 65536
#: The share of coordinates whose gates ``LSTMFC`` keeps for the backward pass by default (see ``keep_gates``).
KEEP_GATES = 0.5


def default_chunk_rows(device: torch.device) -> int:
    """The block size ``LSTMFC`` uses on ``device`` when its ``chunk_size`` is None."""
    return CPU_CHUNK_ROWS if device.type == "cpu" else GPU_CHUNK_ROWS


def _lstm_weights(lstm: nn.LSTM) -> list[Tensor]:
    """``weight_ih, weight_hh, bias_ih, bias_hh`` of every layer of ``lstm``, layer after layer."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [getattr(lstm, f"{kind}_l{layer}") for layer in range(lstm.num_layers) for kind in kinds]


def _cell_weights(weights: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer ``(W_ihᵀ, W_hhᵀ, b_ih + b_hh)``, the cell gate's columns doubled (``tanh(x) = 2σ(2x) − 1``)."""
    cells = []
    for layer in range(len(weights) // 4):
        w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights[4 * layer : 4 * layer + 4])
        hidden = w_hh.shape[1]
        w_ih_t, w_hh_t, bias = w_ih.t().clone(), w_hh.t().clone(), b_ih + b_hh
        for t in (w_ih_t, w_hh_t, bias):
            t[..., 2 * hidden : 3 * hidden] *= 2
        cells.append((w_ih_t, w_hh_t, bias))
    return cells


def _gates(out: Tensor, inp: Tensor, h0: Tensor | None, cell: tuple[Tensor, Tensor, Tensor]) -> list[Tensor]:
    """The activated gates ``i, f, g, o`` of one LSTM layer for a block of rows, computed into ``out`` ``[n, 4H]``.

    ``inp`` is ``[n]`` for the first layer (input size 1: an outer product with ``W_ih``) or ``[n, H]``; ``h0``
    is ``[n, H]``, or None for a zero state. The four returned tensors are views of ``out``.
    """
    w_ih_t, w_hh_t, bias = cell
    if inp.dim() == 1:
        torch.addcmul(bias, inp[:, None], w_ih_t, out=out)  # b + x·W_ihᵀ
    else:
        torch.addmm(bias, inp, w_ih_t, out=out)
    if h0 is not None:
        out.addmm_(h0, w_hh_t)
    out.sigmoid_()
    i, f, g, o = out.chunk(4, dim=1)
    g.mul_(2).sub_(1)  # g = 2σ(2x) − 1 = tanh(x)
    return [i, f, g, o]


def _tanh(x: Tensor, out: Tensor) -> Tensor:
    """``tanh(x) = 2·σ(2x) − 1`` into ``out``: a CPU computes a sigmoid several times faster than a tanh."""
    torch.mul(x, 2, out=out).sigmoid_()
    return out.mul_(2).sub_(1)


@dataclass(frozen=True)
class _HeadActivation:
    """``act`` between the LSTM and the FC head of ``LSTMFC``, as its fused step computes it and its derivative.

    ``forward(h, buffer)`` returns ``act(h)`` (``h`` itself when ``identity``, else written into ``buffer``);
    ``scale_grad(d, a)`` multiplies ``d = ∂/∂act(h)``, in place, by ``act'(h)`` given ``a = act(h)``, and may
    overwrite ``a``.
    """

    identity: bool
    forward: Callable[[Tensor, Tensor], Tensor]
    scale_grad: Callable[[Tensor, Tensor], None]


# Named functions, not lambdas, so that an LSTMFC module can be pickled whole.
def _identity(h: Tensor, buffer: Tensor) -> Tensor:
    return h


def _identity_grad(d: Tensor, a: Tensor) -> None:
    return None


def _relu(h: Tensor, buffer: Tensor) -> Tensor:
    return torch.clamp_min(h, 0, out=buffer)


def _relu_grad(d: Tensor, a: Tensor) -> None:
    d.masked_fill_(a <= 0, 0)


def _tanh_into(h: Tensor, buffer: Tensor) -> Tensor:
    return torch.tanh(h, out=buffer)


def _tanh_grad(d: Tensor, a: Tensor) -> None:
    d.addcmul_(d, a.mul_(a), value=-1)  # · (1 − tanh²)


_HEAD_ACTIVATIONS = {
    "none": _HeadActivation(True, _identity, _identity_grad),
    "relu": _HeadActivation(False, _relu, _relu_grad),
    "tanh": _HeadActivation(False, _tanh_into, _tanh_grad),
}


def _block_rows(rows: int, n_total: int) -> int:
    return max(1, min(rows, n_total))


def _kept_rows(keep: float, rows: int, n_total: int) -> int:
    """The first rows whose gates the forward pass keeps: ``keep`` of ``n_total``, rounded up to whole blocks."""
    rows = _block_rows(rows, n_total)
    return min(n_total, math.ceil(keep * n_total / rows) * rows)


def _lstmfc_forward(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    weights: list[Tensor],
    w_fc: Tensor,
    act: _HeadActivation,
    rows: int,
    kept_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``scale = FC(act(h'))`` ``[N]`` and the new state ``h', c'`` ``[L, N, H]`` of one LSTM step (no autograd).

    The fourth result holds the activated gates of the first ``kept_rows`` rows, ``[L, kept_rows, 4H]`` (None
    for 0); those of the other rows are made in a buffer of one block and not kept.
    """
    layers, n_total, hidden = len(weights) // 4, x.shape[0], w_fc.shape[-1]
    h_new = x.new_empty(layers, n_total, hidden)
    c_new = x.new_empty(layers, n_total, hidden)
    scale = x.new_empty(n_total)
    cells = _cell_weights(weights)
    w_fc = w_fc.detach().reshape(-1)
    rows = _block_rows(rows, n_total)
    kept = x.new_empty(layers, kept_rows, 4 * hidden) if kept_rows else None
    gate_buffer = x.new_empty(rows, 4 * hidden) if kept_rows < n_total else None
    act_buffer = None if act.identity else x.new_empty(rows, hidden)
    for start in range(0, n_total, rows):
        block = slice(start, min(start + rows, n_total))
        n = block.stop - start
        inp = x[block]
        for k in range(layers):
            if kept is not None and start < kept_rows:
                out = kept[k, block]
            else:
                assert gate_buffer is not None  # made whenever some rows are not kept
                out = gate_buffer[:n]
            i, f, g, o = _gates(out, inp, None if h0 is None else h0[k, block], cells[k])
            c, h = c_new[k, block], h_new[k, block]
            if c0 is None:
                torch.mul(i, g, out=c)
            else:
                torch.mul(f, c0[k, block], out=c).addcmul_(i, g)  # c' = f·c + i·g
            _tanh(c, out=h).mul_(o)  # h' = o·tanh(c')
            inp = h
        a = act.forward(inp, act_buffer[:n] if act_buffer is not None else inp)
        torch.mv(a, w_fc, out=scale[block])
    return scale, h_new, c_new, kept


class _LSTMFCStep(torch.autograd.Function):
    """``(x, h, c, W_fc, W_ih, W_hh, b_ih, b_hh, …) → (FC(act(h')), h', c')`` with a lean backward pass.

    Saves the tensors that live anyway (inputs, parameters and the new state) and the gates of the first
    ``kept_rows`` rows; the backward pass recomputes the other blocks of gates. Gradients reach every input, and
    the new state may receive gradients too (``set_materialize_grads(False)``: the usual case, none on the
    state, costs nothing).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor | None,
        c0: Tensor | None,
        w_fc: Tensor,
        act: _HeadActivation,
        rows: int,
        kept_rows: int,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        scale, h_new, c_new, kept = _lstmfc_forward(x, h0, c0, list(weights), w_fc, act, rows, kept_rows)
        ctx.act, ctx.rows, ctx.kept_rows = act, rows, kept_rows
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, w_fc, h_new, c_new, kept, *weights)
        return scale, h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_scale: Tensor | None, d_h_new: Tensor | None, d_c_new: Tensor | None) -> tuple:
        x, h0, c0, w_fc, h_new, c_new, kept, *weights = ctx.saved_tensors
        need_x, need_h0, need_c0, need_fc = ctx.needs_input_grad[:4]
        need_w = ctx.needs_input_grad[7:]
        layers, n_total, hidden = h_new.shape
        act: _HeadActivation = ctx.act
        if d_scale is None:
            d_scale = x.new_zeros(n_total)
        cells = _cell_weights(weights)
        w_fc_flat = w_fc.reshape(-1)
        g_fc = torch.zeros_like(w_fc_flat) if need_fc else None
        # per layer: d(W_ihᵀ | b) as [in + 1, 4H] (in = 1 for the first layer) and d W_hhᵀ as [H, 4H]
        any_w = any(need_w)
        # (empty lists when no weight needs a gradient: they are read only under ``if any_w``)
        g_in = [x.new_zeros((1 if k == 0 else hidden) + 1, 4 * hidden) for k in range(layers)] if any_w else []
        g_hh = [x.new_zeros(hidden, 4 * hidden) for _ in range(layers)] if any_w else []
        g_x = torch.empty_like(x) if need_x else None
        g_h0 = torch.empty_like(h0) if need_h0 else None
        g_c0 = torch.empty_like(c0) if need_c0 else None
        rows = _block_rows(ctx.rows, n_total)
        gate_buffer = x.new_empty(rows, 4 * hidden)
        dh_buffer, dc_buffer, t_buffer = (x.new_empty(rows, hidden) for _ in range(3))
        # [input | 1] of each layer, so that one product gives the gradients of W_ih and of the bias
        in_buffers = [x.new_ones(rows, (1 if k == 0 else hidden) + 1) for k in range(layers)] if any_w else []
        for start in range(0, n_total, rows):
            block = slice(start, min(start + rows, n_total))
            n = block.stop - start
            G, dh, dc, t = gate_buffer[:n], dh_buffer[:n], dc_buffer[:n], t_buffer[:n]
            ds = d_scale[block]
            # the head: scale = act(h') · w_fc
            a = act.forward(h_new[layers - 1, block], t)
            if g_fc is not None:
                g_fc.addmv_(a.t(), ds)
            torch.mul(ds[:, None], w_fc_flat, out=dh)  # ∂/∂act(h')
            act.scale_grad(dh, a)  # · act'(h')
            if d_h_new is not None:
                dh.add_(d_h_new[layers - 1, block])
            for k in reversed(range(layers)):
                inp = x[block] if k == 0 else h_new[k - 1, block]
                h_prev = None if h0 is None else h0[k, block]
                c_prev = None if c0 is None else c0[k, block]
                if start < ctx.kept_rows:  # kept by the forward pass (copied: a second backward pass needs them)
                    i, f, g, o = G.copy_(kept[k, block]).chunk(4, dim=1)
                else:
                    i, f, g, o = _gates(G, inp, h_prev, cells[k])
                # dh: ∂/∂h'. With T = tanh(c'), u = dh·o, v = u·T:
                _tanh(c_new[k, block], out=t)  # as in the forward pass, to the bit
                torch.mul(dh, o, out=dc)  # u
                torch.mul(dc, t, out=dh)  # v
                torch.addcmul(dc, dh, t, value=-1, out=dc)  # ∂/∂c' = u − v·T = dh·o·(1 − T²)
                if d_c_new is not None:
                    dc.add_(d_c_new[k, block])
                torch.addcmul(dh, dh, o, value=-1, out=o)  # o's pre-activation: v − v·o = dh·T·o(1 − o)
                if g_c0 is not None:
                    torch.mul(dc, f, out=g_c0[k, block])  # ∂/∂c = dc·f
                if c_prev is None:
                    f.zero_()
                else:
                    torch.mul(dc, c_prev, out=t).mul_(f)  # p = dc·c·f
                    torch.addcmul(t, t, f, value=-1, out=f)  # f's: p − p·f = dc·c·f(1 − f)
                torch.mul(dc, i, out=t)  # q = dc·i
                torch.mul(t, g, out=dh)  # r = q·g
                torch.addcmul(t, dh, g, value=-1, out=g)  # g's: q − r·g = dc·i·(1 − g²)
                torch.addcmul(dh, dh, i, value=-1, out=i)  # i's: r − r·i = dc·g·i(1 − i)
                # G now holds the gradient of the gates' pre-activations.
                if any_w:
                    inb = in_buffers[k][:n]
                    inb[:, :-1].copy_(inp[:, None] if k == 0 else inp)
                    g_in[k].addmm_(inb.t(), G)
                    if h_prev is not None:
                        g_hh[k].addmm_(h_prev.t(), G)
                if g_h0 is not None:
                    torch.mm(G, weights[4 * k + 1], out=g_h0[k, block])
                if k > 0:
                    torch.mm(G, weights[4 * k], out=dh)  # ∂/∂h' of the layer below
                    if d_h_new is not None:
                        dh.add_(d_h_new[k - 1, block])
                elif g_x is not None:
                    torch.mv(G, weights[0].reshape(-1), out=g_x[block])
        g_w: list[Tensor | None] = [None] * len(weights)
        if any_w:
            for k in range(layers):
                g_w[4 * k] = g_in[k][:-1].t().contiguous()
                g_w[4 * k + 1] = g_hh[k].t().contiguous()  # zeros from a zero state
                g_w[4 * k + 2] = g_in[k][-1].clone()
                g_w[4 * k + 3] = g_in[k][-1].clone()  # b_ih and b_hh enter the gates the same way
            g_w = [gw if need else None for gw, need in zip(g_w, need_w)]
        return (g_x, g_h0, g_c0, None if g_fc is None else g_fc.view_as(w_fc), None, None, None, *g_w)


class LSTMFC(MetaQuantizer):
    """``g_W̃ = g_Ŵ ⊙ FC_φ(act(LSTM_φ(W̃)))`` with a hidden state per weight coordinate.

    The "LSTMFC" meta quantizer of docs/design.md §4, ``M_φ`` of Eq. 4-5 (paper: one LSTM layer, hidden 100, one FC).
    The state of a layer with ``N`` weights is ``(h, c)``, each ``[num_lstm, N, hidden]``. Each call runs one
    LSTM time step for every coordinate (a batch of ``N`` sequences of length 1) from the given state and
    returns the new state; the caller carries it to the next iteration, detached. With ``state=None`` the call
    starts from ``initial_state`` (zeros), without materializing it.

    The parameters are those of ``self.lstm`` (an ``nn.LSTM(1, hidden, num_lstm)``, its names and shapes, so
    checkpoints load either way) and ``self.fc``; the step itself is a fused LSTM cell computed ``chunk_size``
    coordinates at a time with a custom backward pass (see the comment above ``CPU_CHUNK_ROWS``): the same values
    and gradients as ``nn.LSTM`` to rounding, in a fraction of its time and memory. Without gradients (a frozen
    meta quantizer, ``torch.no_grad``) nothing is kept for a backward pass.

    Args:
        hidden: hidden size of the LSTM (and input size of the FC layer).
        num_lstm: number of stacked LSTM layers.
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, between the LSTM and the FC layer.
        chunk_size: coordinates processed at once; None: ``default_chunk_rows(device)`` (4096 on a CPU, 65536 on
            a GPU). It changes neither values (up to rounding) nor gradients, only speed and memory.
        keep_gates: the share of the coordinates, in ``[0, 1]``, whose gates the forward pass keeps for the
            backward pass (``4·hidden·num_lstm`` floats each); the backward pass recomputes the others' with one
            more matrix product. 0 is the leanest (nothing kept beyond the new state), 1 the fastest (about a
            quarter less time than 0, for ``N·4·hidden·num_lstm`` more floats); the default 0.5 is halfway. It
            changes neither values nor gradients.
        init_scheme: ``"paper"`` or ``"ste"`` (``1 + FC_φ(·)``, the FC layer starting at zero: see the module's
            description).

    Raises:
        ValueError: ``hidden``, ``num_lstm`` or ``chunk_size`` not an integer >= 1, ``keep_gates`` not a number
            in ``[0, 1]``, or an unknown ``nonlinearity``; when called, inputs in another dtype than the
            parameters (as ``nn.LSTM``).

    Example:
        >>> meta = mq.LSTMFC(hidden=8)
        >>> g, w_tilde = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9])
        >>> out, (h, c) = meta(g, w_tilde)  # first iteration: from zeros
        >>> out.shape, h.shape, meta.stateful
        (torch.Size([3]), torch.Size([1, 3, 8]), True)
        >>> torch.allclose(out, meta(g, w_tilde, meta.initial_state(3, w_tilde.device, w_tilde.dtype))[0])
        True
        >>> torch.allclose(out, meta(g, w_tilde, (h, c))[0])  # the next iteration, from the carried state
        False
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
        init_scheme: str = "paper",
    ) -> None:
        super().__init__()
        _check_init_scheme(init_scheme)
        _check_int("hidden size", hidden, 1)
        _check_int("number of LSTM layers", num_lstm, 1)
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, 1)
        if isinstance(keep_gates, bool) or not isinstance(keep_gates, (int, float)) or not 0 <= keep_gates <= 1:
            raise ValueError(f"keep_gates must be a number in [0, 1], got {keep_gates!r}")
        _check_nonlinearity(nonlinearity)
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
