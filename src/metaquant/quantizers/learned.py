"""The quantizers whose scale is learned: LSQ's step, per layer or per output channel, a Parameter of each layer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Encoded, ForwardQuantizer, _mean_abs, _PerChannel
from .fixed import UniformSymmetric

#: The smallest step ``LSQ`` quantizes with (its Parameter may be trained past zero; the gradient still reaches it),
#: or the dtype's smallest normal number where that is larger (float16).
LSQ_STEP_FLOOR = 1e-8


@dataclass(frozen=True, eq=False, repr=False)  # equal and hashed by bit width and the identity of its step
class LSQ(UniformSymmetric):
    """k-bit weights with a learned step (LSQ, Esser et al. 2020), k = 2..8: ``Ŵ = s·clamp(round(W/s), −Q_N,
    Q_P)`` with LSQ's signed range ``Q_N = 2^(k−1)``, ``Q_P = 2^(k−1) − 1`` (``2^k`` levels), ``int8`` codes.

    ``s`` is a Parameter of each quantized layer (``weight_step``, ``[1]``), first set to LSQ's ``2·mean|W|/√Q_P``
    and trained by the optimizer with LSQ's gradient (Eq. 3) ``Σ g_Ŵ ⊙ ∂Ŵ/∂s``, ``∂Ŵ/∂s = round(W/s) − W/s``
    inside the range, ``−Q_N`` or ``Q_P`` outside, scaled by ``1/√(N·Q_P)`` (Eq. 5, ``N`` weights). A quantizer
    not bound to a layer (``step`` None) uses the first value.

    ``r = (W/s − m)/h`` maps the range onto ``[−1, 1]`` (``m = −1/2`` its midpoint, ``h = (2^k − 1)/2`` its half
    width), so the clipped STE's gate ``|r| ≤ 1`` is LSQ's: ``ste_scale = s·h`` and ``c(W) = 1/(s·h)`` give the
    STE ``g_W = g_Ŵ ⊙ 1{−Q_N ≤ W/s ≤ Q_P}`` (LSQ's, but for the two ends, which the clipped STE lets through and
    LSQ's step gradient counts as outside), and a meta quantizer ``M_φ(g_Ŵ, W̃)/(s·h)``, ``W̃ = W``.
    """

    name: ClassVar[str] = "lsq"
    learned: ClassVar[tuple[str, ...]] = ("step",)
    step: Tensor | None = dataclasses.field(default=None, kw_only=True)  # bound by a layer (``bind``)

    def __repr__(self) -> str:
        return f"LSQ(bits={self.bits})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.bits == self.bits and other.step is self.step

    def __hash__(self) -> int:
        return hash((type(self), self.bits, id(self.step)))

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    @property
    def _range(self) -> tuple[int, int]:
        """``(Q_N, Q_P)``: the codes run from ``−Q_N`` to ``Q_P``."""
        return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1

    def initial_learned(self, w: Tensor) -> dict[str, Tensor]:
        return {"step": self._first_step(w.detach())}

    def bind(self, learned: dict[str, Tensor]) -> ForwardQuantizer:
        return dataclasses.replace(self, step=learned["step"])

    def unbound(self) -> ForwardQuantizer:
        return self if self.step is None else dataclasses.replace(self, step=None)

    def _first_step(self, w: Tensor) -> Tensor:
        """LSQ's ``2·mean|W| / √Q_P``, ``[1]``; ``1/h`` for an all-zero weight (then ``c(W) = 1``, the rule of the
        other quantizers for a statistic of 0)."""
        first = 2 * self._mean_abs(w) / math.sqrt(self._range[1])
        return torch.where(first == 0, 1 / self._half_width, first).clamp_min(_step_floor(w.dtype))

    def _scale(self, w_tilde: Tensor) -> Tensor:
        if self.step is None:
            return self._first_step(w_tilde.detach())  # a statistic held constant, as the other scales
        step = self._shaped(self.step.detach(), w_tilde).to(w_tilde.device, w_tilde.dtype)
        return step.clamp_min(_step_floor(w_tilde.dtype))

    def _mean_abs(self, w: Tensor) -> Tensor:
        """``mean|W|`` of each step's weights, shaped as the step: ``[1]``."""
        return _mean_abs(w).reshape(1)

    def _shaped(self, step: Tensor, w: Tensor) -> Tensor:
        """The step as it broadcasts against ``w``: ``[1]``."""
        return step.reshape(1)

    @property
    def _half_width(self) -> float:
        """``h = (Q_N + Q_P)/2``; the range's midpoint is ``(Q_P − Q_N)/2 = −1/2``."""
        return (self.num_levels - 1) / 2

    def _to_relaxed(self, v: Tensor, scale: Tensor) -> Tensor:
        """``(v/s + 1/2)/h``: a weight or level in the units of ``r``."""
        return (v / scale + 0.5) / self._half_width

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        q_n, q_p = self._range
        scale = self._scale(w_tilde)
        return Encoded(torch.round(w_tilde / scale).clamp_(-q_n, q_p).to(torch.int8), scale)

    def relaxed(self, w: Tensor) -> Tensor:
        return self._to_relaxed(w, self._scale(w))

    def calibration(self, w: Tensor) -> Tensor:
        return torch.ones_like(w) / (self._scale(w) * self._half_width)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        return self._scale(w_tilde) * self._half_width

    def relaxed_units(self, w_hat: Tensor, w_tilde: Tensor) -> Tensor:
        return self._to_relaxed(w_hat, self._scale(w_tilde))  # the level, mapped as r is

    def learned_gradient(self, w_hat: Tensor, w: Tensor) -> Tensor:
        if self.step is None or not (self.step.requires_grad and torch.is_grad_enabled()):
            return w_hat
        q_n, q_p = self._range
        with torch.no_grad():
            steps = w / self._scale(w)
            # ∂Ŵ/∂s (LSQ Eq. 3): round(W/s) − W/s strictly inside, −Q_N at and below the range, Q_P at and above
            # (as LSQActivation); times g = 1/√(N·Q_P) (Eq. 5)
            inside = (steps > -q_n) & (steps < q_p)
            slope = torch.where(inside, steps.round() - steps, steps.round().clamp(-q_n, q_p))
            slope /= math.sqrt(w.numel() // self.step.numel() * q_p)  # N: the weights of one step
        step = self._shaped(self.step, w).to(w_hat.device, w_hat.dtype)
        return w_hat + (step - step.detach()) * slope  # adds zero: the value is Ŵ's to the bit


@dataclass(frozen=True, eq=False, repr=False)  # _PerChannel's repr; equal by bit width, axis and step
class LSQPerChannel(_PerChannel, LSQ):
    """``lsq`` with a learned step per output channel, ``Ŵ[o] = s_o·clamp(round(W[o]/s_o), −Q_N, Q_P)``.

    The layer's ``weight_step`` is ``[C_out, 1, …]`` (``[1, C_out / groups, 1, …]`` for a transposed
    convolution), first ``2·mean|W[o]|/√Q_P``; each step's gradient is scaled by ``1/√(N_o·Q_P)``, ``N_o`` the
    weights of its channel. The output channels lie along ``axis`` as for ``BWNPerChannel``; a 1-D weight gets
    one step. Exported with one scale per channel (``DequantizeLinear``'s ``axis``).

    Raises:
        ValueError: ``axis`` is not an ``int >= 0``, or beyond the last axis of a weight of 2 or more dimensions.
    """

    name: ClassVar[str] = "lsq-channel"

    def __eq__(self, other: object) -> bool:
        return LSQ.__eq__(self, other) and other.axis == self.axis  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((LSQ.__hash__(self), self.axis))

    def _mean_abs(self, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return super()._mean_abs(w)
        return _mean_abs(w, dim=self._other_axes(w))

    def _shaped(self, step: Tensor, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return step.reshape(1)
        return step.reshape([size if d == self.axis else 1 for d, size in enumerate(w.shape)])


def _step_floor(dtype: torch.dtype) -> float:
    return max(LSQ_STEP_FLOOR, torch.finfo(dtype).tiny)
