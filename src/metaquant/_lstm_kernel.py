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
# The functions below compute the same step block by block of rows (``chunk_size`` coordinates at a time). Each
# block's operand ``A = [input | 1 | h]`` ``[rows, in + 1 + H]`` is laid out once, so that one matrix product
# with ``[W_ihᵀ; b; W_hhᵀ]`` gives the gates' pre-activations (input term and bias included) and, in the
# backward pass, one product ``Aᵀ·∂gates`` gives the gradients of all three. The gates are then activated and
# turned into the new state by in-place element-wise operations on the block, while it is still in cache: after a
# matrix product, what a CPU spends its time on is passes over blocks of N × H floats, so every operation below
# is counted. The autograd function saves tensors that exist anyway (the input, the old and the new state, the
# parameters) and the gates of a share ``keep_gates`` of the coordinates; its backward pass recomputes the other
# blocks of gates (one more matrix product) instead of keeping all N × 4H gates: time against memory, 0 (nothing
# kept beyond the new state and a few block-sized buffers) to 1 (no recomputation). Then per block: ∂/∂gates in
# place of the gates (of the kept ones too, which the first backward pass thus uses up: a second one, with
# ``retain_graph``, recomputes them), and one product for the gradients of the weights.
#
# The gates' columns are ordered ``i, f, o, g`` inside the kernel (``nn.LSTM``: ``i, f, g, o``) so that one
# sigmoid call covers the first 3H columns and one tanh the last H; the weights' gradients are put back in
# ``nn.LSTM``'s order.

#: Rows of N processed at once on a CPU. Each operation on a block costs a fixed overhead (dispatch, waking the
#: OpenMP threads), which dominates blocks of under a few thousand rows; beyond 16384 rows the blocks no longer
#: gain, and their buffers grow (16384 x 400 floats: 26 MB). On a machine whose cores are oversubscribed (other
#: work), OpenMP threads spin at the end of every operation waiting for a descheduled peer: ``OMP_WAIT_POLICY=
#: PASSIVE`` in the environment cures it (benchmarks/lstmfc_time.py measures block sizes).
CPU_CHUNK_ROWS = 16384
#: On a GPU, larger blocks: fewer kernel launches, a bounded buffer (65536 x 400 floats: 100 MB).
GPU_CHUNK_ROWS = 65536
#: The share of coordinates whose gates ``LSTMFC`` keeps for the backward pass by default (see ``keep_gates``).
#: 0, the leanest: on a CPU with glibc's defaults, the fresh pages the kept gates need at every step cost about
#: what recomputing them (one matrix product, the activations) saves; where freed memory is reused, 1 is faster
#: (docs/performance.md; not measured on a GPU).
KEEP_GATES = 0.0


def default_chunk_rows(device: torch.device) -> int:
    """The block size ``LSTMFC`` uses on ``device`` when its ``chunk_size`` is None."""
    return CPU_CHUNK_ROWS if device.type == "cpu" else GPU_CHUNK_ROWS


def _lstm_weights(lstm: nn.LSTM) -> list[Tensor]:
    """``weight_ih, weight_hh, bias_ih, bias_hh`` of every layer of ``lstm``, layer after layer."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [getattr(lstm, f"{kind}_l{layer}") for layer in range(lstm.num_layers) for kind in kinds]


#: Inside the kernel the gates' columns are ``i, f, o, g``: this permutation of blocks takes ``nn.LSTM``'s order
#: (``i, f, g, o``) to it, and back (it is its own inverse).
_SWAP_G_O = (0, 1, 3, 2)


def _gate_columns(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """``t`` ``[..., 4H]`` with its four blocks of H columns in ``order``."""
    return torch.cat([t[..., k * (t.shape[-1] // 4) : (k + 1) * (t.shape[-1] // 4)] for k in order], dim=-1)


@dataclass(frozen=True)
class _Cell:
    """One LSTM layer's weights as the kernel uses them: ``w = [W_ihᵀ; b_ih + b_hh; W_hhᵀ]`` ``[in + 1 + H, 4H]``
    in the kernel's gate order; a block's operand ``A = [input | 1 | h]`` multiplies it (``A[:, :in + 1]`` and
    ``w[:in + 1]`` for a zero state)."""

    w: Tensor
    inputs: int  # in: 1 for the first layer, H above

    @property
    def w_ih_t(self) -> Tensor:
        return self.w[: self.inputs]

    @property
    def w_hh_t(self) -> Tensor:
        return self.w[self.inputs + 1 :]

    def width(self, zero_state: bool) -> int:
        """The columns of ``A`` that count: ``[input | 1]`` for a zero state, else all."""
        return self.inputs + 1 if zero_state else self.w.shape[0]


def _cells(weights: Sequence[Tensor]) -> list[_Cell]:
    """A ``_Cell`` per layer from ``weight_ih, weight_hh, bias_ih, bias_hh`` of every layer (detached)."""
    cells = []
    for layer in range(len(weights) // 4):
        w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights[4 * layer : 4 * layer + 4])
        w = torch.cat([w_ih.t(), (b_ih + b_hh)[None], w_hh.t()])
        cells.append(_Cell(_gate_columns(w, _SWAP_G_O), w_ih.shape[1]))
    return cells


def _operand_buffer(like: Tensor, rows: int, cell: _Cell) -> Tensor:
    """A buffer for the blocks' operands ``[input | 1 | h]`` ``[rows, in + 1 + H]``, its column of ones set."""
    buffer = like.new_empty(rows, cell.w.shape[0])
    buffer[:, cell.inputs].fill_(1)
    return buffer


def _operand(buffer: Tensor, inp: Tensor, h0: Tensor | None, cell: _Cell) -> Tensor:
    """``A = [inp | 1 | h0]`` of a block in ``buffer`` (``[inp | 1]`` when ``h0`` is None, a zero state)."""
    n = inp.shape[0]
    buffer[:n, : cell.inputs].copy_(inp[:, None] if inp.dim() == 1 else inp)
    if h0 is not None:
        buffer[:n, cell.inputs + 1 :].copy_(h0)
    return buffer[:n, : cell.width(h0 is None)]


def _gates(out: Tensor, a: Tensor, cell: _Cell) -> list[Tensor]:
    """The activated gates ``i, f, o, g`` of one LSTM layer for a block, computed into ``out`` ``[n, 4H]`` from
    the block's operand ``a`` (``_operand``). The four returned tensors are views of ``out``."""
    torch.mm(a, cell.w[: a.shape[1]], out=out)
    hidden = out.shape[1] // 4
    out[:, : 3 * hidden].sigmoid_()
    out[:, 3 * hidden :].tanh_()
    return list(out.split(hidden, dim=1))


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

    The fourth result holds the activated gates (kernel order ``i, f, o, g``) of the first ``kept_rows`` rows,
    ``[L, kept_rows, 4H]`` (None for 0); those of the other rows are made in a buffer of one block and not kept.
    """
    layers, n_total, hidden = len(weights) // 4, x.shape[0], w_fc.shape[-1]
    h_new = x.new_empty(layers, n_total, hidden)
    c_new = x.new_empty(layers, n_total, hidden)
    scale = x.new_empty(n_total)
    cells = _cells(weights)
    w_fc = w_fc.detach().reshape(-1)
    rows = _block_rows(rows, n_total)
    kept = x.new_empty(layers, kept_rows, 4 * hidden) if kept_rows else None
    gate_buffer = x.new_empty(rows, 4 * hidden) if kept_rows < n_total else None
    operands = [_operand_buffer(x, rows, cell) for cell in cells]
    act_buffer = None if act.identity else x.new_empty(rows, hidden)
    for start in range(0, n_total, rows):
        block = slice(start, min(start + rows, n_total))
        n = block.stop - start
        inp = x[block]
        for k, cell in enumerate(cells):
            if kept is not None and start < kept_rows:
                out = kept[k, block]
            else:
                assert gate_buffer is not None  # made whenever some rows are not kept
                out = gate_buffer[:n]
            a = _operand(operands[k], inp, None if h0 is None else h0[k, block], cell)
            i, f, o, g = _gates(out, a, cell)
            c, h = c_new[k, block], h_new[k, block]
            if c0 is None:
                torch.mul(i, g, out=c)
            else:
                torch.mul(f, c0[k, block], out=c).addcmul_(i, g)  # c' = f·c + i·g
            torch.tanh(c, out=h).mul_(o)  # h' = o·tanh(c')
            inp = h
        a = act.forward(inp, act_buffer[:n] if act_buffer is not None else inp)
        torch.mv(a, w_fc, out=scale[block])
    return scale, h_new, c_new, kept


class _LSTMFCStep(torch.autograd.Function):
    """``(x, h, c, W_fc, W_ih, W_hh, b_ih, b_hh, …) → (FC(act(h')), h', c')`` with a lean backward pass.

    Saves the tensors that live anyway (inputs, parameters and the new state) and holds the gates of the first
    ``kept_rows`` rows, which the first backward pass turns into their gradients in place; the other blocks of
    gates, and all of them in a second backward pass, are recomputed. Gradients reach every input, and
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
        ctx.act, ctx.rows = act, rows
        ctx.kept = kept  # an intermediate, held by the context: the backward pass overwrites it
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, w_fc, h_new, c_new, *weights)
        return scale, h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_scale: Tensor | None, d_h_new: Tensor | None, d_c_new: Tensor | None) -> tuple:
        x, h0, c0, w_fc, h_new, c_new, *weights = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # used up below: a second backward pass recomputes every block
        kept_rows = 0 if kept is None else kept.shape[1]
        need_x, need_h0, need_c0, need_fc = ctx.needs_input_grad[:4]
        need_w = ctx.needs_input_grad[7:]
        layers, n_total, hidden = h_new.shape
        act: _HeadActivation = ctx.act
        if d_scale is None:
            d_scale = x.new_zeros(n_total)
        cells = _cells(weights)
        w_fc_flat = w_fc.reshape(-1)
        g_fc = torch.zeros_like(w_fc_flat) if need_fc else None
        any_w = any(need_w)
        # per layer: ∂/∂[W_ihᵀ; b; W_hhᵀ] (kernel gate order), accumulated block by block as Aᵀ·∂gates
        g_cat = [torch.zeros_like(cell.w) for cell in cells] if any_w else []
        g_x = torch.empty_like(x) if need_x else None
        g_h0 = torch.empty_like(h0) if need_h0 else None
        g_c0 = torch.empty_like(c0) if need_c0 else None
        rows = _block_rows(ctx.rows, n_total)
        gate_buffer = x.new_empty(rows, 4 * hidden) if kept_rows < n_total else None
        dh_buffer, dc_buffer, t_buffer = (x.new_empty(rows, hidden) for _ in range(3))
        operands = [_operand_buffer(x, rows, cell) for cell in cells]
        for start in range(0, n_total, rows):
            block = slice(start, min(start + rows, n_total))
            n = block.stop - start
            dh, dc, t = dh_buffer[:n], dc_buffer[:n], t_buffer[:n]
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
                cell = cells[k]
                inp = x[block] if k == 0 else h_new[k - 1, block]
                h_prev = None if h0 is None else h0[k, block]
                c_prev = None if c0 is None else c0[k, block]
                operand = _operand(operands[k], inp, h_prev, cell) if any_w or start >= kept_rows else None
                if start < kept_rows:  # kept by the forward pass: their gradients replace them
                    assert kept is not None
                    G = kept[k, block]
                    gates: Sequence[Tensor] = G.split(hidden, dim=1)
                else:
                    assert gate_buffer is not None  # made whenever some rows are not kept
                    G = gate_buffer[:n]
                    assert operand is not None
                    gates = _gates(G, operand, cell)
                d_c = None if d_c_new is None else d_c_new[k, block]
                g_c = None if g_c0 is None else g_c0[k, block]
                _gate_grads(gates, dh, dc, t, c_new[k, block], c_prev, d_c, g_c)
                # G now holds the gradient of the gates' pre-activations.
                if any_w:
                    assert operand is not None
                    g_cat[k][: operand.shape[1]].addmm_(operand.t(), G)
                if g_h0 is not None:
                    torch.mm(G, cell.w_hh_t.t(), out=g_h0[k, block])
                if k > 0:
                    torch.mm(G, cell.w_ih_t.t(), out=dh)  # ∂/∂h' of the layer below
                    if d_h_new is not None:
                        dh.add_(d_h_new[k - 1, block])
                elif g_x is not None:
                    torch.mv(G, cell.w_ih_t.reshape(-1), out=g_x[block])
        g_w = _weight_grads(g_cat, cells, need_w) if any_w else [None] * len(weights)
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
    """The gradient of one layer's gates' pre-activations for a block, in place of its activated gates
    (``i, f, o, g``).

    ``dh`` holds ∂/∂h' on entry; it, ``dc`` and ``t`` are overwritten (``dc`` ends as ∂/∂c'). ``c_prev`` is the
    old cell state (None: zeros), ``d_c_new`` a gradient reaching ``c'`` from outside, ``g_c0`` where ∂/∂c goes.
    """
    i, f, o, g = gates
    # With T = tanh(c'), u = dh·o, v = u·T:
    torch.tanh(c_new, out=t)  # as in the forward pass, to the bit
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


def _weight_grads(g_cat: list[Tensor], cells: list[_Cell], need_w: tuple[bool, ...]) -> list[Tensor | None]:
    """The gradients of ``weight_ih, weight_hh, bias_ih, bias_hh`` of every layer from the accumulated
    ``∂/∂[W_ihᵀ; b; W_hhᵀ]`` (kernel gate order); None where no gradient is needed."""
    g_w: list[Tensor | None] = []
    for g, cell in zip(g_cat, cells):
        g = _gate_columns(g, _SWAP_G_O)
        g_w.append(g[: cell.inputs].t().contiguous())
        g_w.append(g[cell.inputs + 1 :].t().contiguous())  # zeros from a zero state
        g_w.append(g[cell.inputs].clone())
        g_w.append(g[cell.inputs].clone())  # b_ih and b_hh enter the gates the same way
    return [gw if need else None for gw, need in zip(g_w, need_w)]
