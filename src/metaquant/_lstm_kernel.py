"""The fused LSTM step of ``LSTMFC``: one LSTM time step per weight coordinate and the FC head, computed block
by block of rows with a hand-written backward pass (the same values and gradients as ``nn.LSTM``, to rounding)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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
                    gates: Sequence[Tensor] = G.copy_(kept[k, block]).chunk(4, dim=1)
                else:
                    gates = _gates(G, inp, h_prev, cells[k])
                d_c = None if d_c_new is None else d_c_new[k, block]
                g_c = None if g_c0 is None else g_c0[k, block]
                _gate_grads(gates, dh, dc, t, c_new[k, block], c_prev, d_c, g_c)
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
        g_w = _weight_grads(g_in, g_hh, need_w) if any_w else [None] * len(weights)
        return (g_x, g_h0, g_c0, None if g_fc is None else g_fc.view_as(w_fc), None, None, None, *g_w)


def _gate_grads(
    gates: Sequence[Tensor],
    dh: Tensor,
    dc: Tensor,
    t: Tensor,
    c_new: Tensor,
    c_prev: Tensor | None,
    d_c_new: Tensor | None,
    g_c0: Tensor | None,
) -> None:
    """The gradient of one layer's gates' pre-activations for a block, in place of its activated gates.

    ``dh`` holds ∂/∂h' on entry; it, ``dc`` and ``t`` are overwritten (``dc`` ends as ∂/∂c'). ``c_prev`` is the
    old cell state (None: zeros), ``d_c_new`` a gradient reaching ``c'`` from outside, ``g_c0`` where ∂/∂c goes.
    """
    i, f, g, o = gates
    # With T = tanh(c'), u = dh·o, v = u·T:
    _tanh(c_new, out=t)  # as in the forward pass, to the bit
    torch.mul(dh, o, out=dc)  # u
    torch.mul(dc, t, out=dh)  # v
    torch.addcmul(dc, dh, t, value=-1, out=dc)  # ∂/∂c' = u − v·T = dh·o·(1 − T²)
    if d_c_new is not None:
        dc.add_(d_c_new)
    torch.addcmul(dh, dh, o, value=-1, out=o)  # o's pre-activation: v − v·o = dh·T·o(1 − o)
    if g_c0 is not None:
        torch.mul(dc, f, out=g_c0)  # ∂/∂c = dc·f
    if c_prev is None:
        f.zero_()
    else:
        torch.mul(dc, c_prev, out=t).mul_(f)  # p = dc·c·f
        torch.addcmul(t, t, f, value=-1, out=f)  # f's: p − p·f = dc·c·f(1 − f)
    torch.mul(dc, i, out=t)  # q = dc·i
    torch.mul(t, g, out=dh)  # r = q·g
    torch.addcmul(t, dh, g, value=-1, out=g)  # g's: q − r·g = dc·i·(1 − g²)
    torch.addcmul(dh, dh, i, value=-1, out=i)  # i's: r − r·i = dc·g·i(1 − i)


def _weight_grads(g_in: list[Tensor], g_hh: list[Tensor], need_w: tuple[bool, ...]) -> list[Tensor | None]:
    """The gradients of ``weight_ih, weight_hh, bias_ih, bias_hh`` of every layer from the accumulated
    ``d(W_ihᵀ | b)`` ``[in + 1, 4H]`` and ``d W_hhᵀ`` ``[H, 4H]``; None where no gradient is needed."""
    g_w: list[Tensor | None] = []
    for g_in_k, g_hh_k in zip(g_in, g_hh):
        g_w.append(g_in_k[:-1].t().contiguous())
        g_w.append(g_hh_k.t().contiguous())  # zeros from a zero state
        g_w.append(g_in_k[-1].clone())
        g_w.append(g_in_k[-1].clone())  # b_ih and b_hh enter the gates the same way
    return [gw if need else None for gw, need in zip(g_w, need_w)]
