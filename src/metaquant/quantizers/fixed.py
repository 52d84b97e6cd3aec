"""The quantizers whose scales are statistics of the weight: DoReFa, BWN, ternary and uniform, per layer, per
output channel or per group of inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..validation import check_int
from .base import Encoded, ForwardQuantizer, _max_abs, _mean_abs, _one_if_zero, _overrides, _PerChannel


@dataclass(frozen=True)
class DoReFa(ForwardQuantizer):
    """DoReFa-Net weights (Zhou et al. 2016), k = 1..8 bits (default 1: ``Ŵ ∈ {−1, +1}``).

    ``W̃ = tanh(W) / (2·max|tanh W|) + 1/2 ∈ [0, 1]``;  ``Ŵ = 2·round((2^k − 1)·W̃)/(2^k − 1) − 1 ∈ [−1, 1]``.
    ``c(W) = (1 − tanh²W) / max|tanh W|``, the max held constant, so an identity meta quantizer gives exactly the
    STE gradient (docs/design.md §3).
    """

    name: ClassVar[str] = "dorefa"
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 8

    @staticmethod
    def _abs_max(t: Tensor) -> Tensor:
        """``max|tanh W|`` from ``t = tanh W``; 1 for an all-zero weight (docs/design.md §3)."""
        return _one_if_zero(_max_abs(t))

    # Each function computes tanh W once: it is the costly part of the quantizer on a CPU.
    def preprocess(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return t / (2 * self._abs_max(t)) + 0.5

    def relaxed(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return t / self._abs_max(t).detach()

    def calibration(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return (1 - t * t) / self._abs_max(t)

    def backward_terms(self, w: Tensor, w_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if _overrides(self, DoReFa, ("relaxed", "calibration", "ste_scale")):  # a subclass's own formulas
            return super().backward_terms(w, w_tilde)
        t = torch.tanh(w)
        peak = self._abs_max(t)
        return t / peak, torch.ones((), dtype=w.dtype, device=w.device), (1 - t * t) / peak

    # The same formulas on segments: one element-wise pass over all layers, each segment divided by its own max.
    segmentable: ClassVar[bool] = True

    @staticmethod
    def _segment_abs_max(t: Tensor, numels: Sequence[int]) -> Tensor:
        """``max|tanh W|`` of each segment: ``[L]``."""
        pieces = t.split(list(numels))
        if not all(numels):  # an empty segment (an empty weight) has no max, and the fused reductions refuse it
            return _one_if_zero(torch.stack([_max_abs(piece) for piece in pieces]))
        if t.device.type == "cpu":
            # On a CPU the inf-norm is a slow generic reduction (4x the time of |t| and a max); on CUDA it is
            # one fused kernel.
            return _one_if_zero(torch.stack(torch._foreach_max(torch._foreach_abs(pieces))))
        return _one_if_zero(torch.stack(torch._foreach_norm(pieces, float("inf"))))

    @staticmethod
    def _per_coordinate(values: Tensor, numels: Sequence[int]) -> Tensor:
        """``[L]`` per-segment values repeated over each segment's coordinates: ``[N]``."""
        return torch.cat([v.expand(n) for v, n in zip(values.unbind(), numels)])

    def preprocess_segments(self, x: Tensor, numels: Sequence[int]) -> Tensor:
        t = torch.tanh(x)
        # 2·max scaled on the [L] maxima, then spread: the same values as per weight, one pass fewer over [N]
        return t / self._per_coordinate(2 * self._segment_abs_max(t, numels), numels) + 0.5

    def backward_terms_segments(self, x: Tensor, numels: Sequence[int]) -> tuple[Tensor, Tensor | None, Tensor]:
        t = torch.tanh(x)
        peak = self._per_coordinate(self._segment_abs_max(t, numels), numels)
        return t / peak, None, (1 - t * t) / peak

    @property
    def _levels(self) -> int:
        return 2**self.bits - 1

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        codes = torch.round(w_tilde * self._levels).clamp_(0, self._levels).to(torch.uint8)
        scale = torch.full((1,), 2.0 / self._levels, dtype=w_tilde.dtype, device=w_tilde.device)
        return Encoded(codes, scale)

    def decode(self, encoded: Encoded) -> Tensor:
        # 2·n/(2^k − 1) − 1, written as n·scale − 1 with scale = 2/(2^k − 1): the single formula for Ŵ.
        return encoded.codes.to(encoded.scale.dtype) * encoded.scale - 1


@dataclass(frozen=True, repr=False)  # _PerChannel's repr
class DoReFaPerChannel(_PerChannel, DoReFa):
    """DoReFa with ``max|tanh W|`` taken per output channel: ``W̃[o] = tanh(W[o]) / (2·max|tanh W[o]|) + 1/2``.

    Each channel spreads over all ``2^k`` levels, whatever its magnitude next to the others (the levels stay
    ``[−1, 1]``: a following BatchNorm absorbs the per-channel factor); at 1 bit the signs, hence ``Ŵ``, are
    DoReFa's. ``c(W) = (1 − tanh²W) / max|tanh W[o]|``; codes and scale export as ``dorefa``'s. The output channels
    lie along ``axis`` as for ``BWNPerChannel``; a 1-D weight gets one statistic.

    Raises:
        ValueError: ``axis`` is not an ``int >= 0``, or beyond the last axis of a weight of 2 or more dimensions.
    """

    name: ClassVar[str] = "dorefa-channel"

    def _abs_max(self, t: Tensor) -> Tensor:  # type: ignore[override]  # per channel, so not a staticmethod
        if t.dim() < 2:
            return DoReFa._abs_max(t)
        return _one_if_zero(_max_abs(t, dim=self._other_axes(t)))


@dataclass(frozen=True)
class BWN(ForwardQuantizer):
    """Binary-weight networks (XNOR-Net, Rastegari et al. 2016): ``Ŵ = a·sign(W)``, ``a = mean|W|`` per layer.

    ``sign(0) = +1``; codes are 1 for ``+a``, 0 for ``−a``. ``c(W) = 1`` as in the paper; the STE multiplies by ``a``
    (``ste_scale``). Only ``bits=1``.
    """

    name: ClassVar[str] = "bwn"

    def _scale(self, w: Tensor) -> Tensor:
        return _mean_abs(w).reshape(1)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        # a = 0 (an all-zero weight, or channel) would stop the STE's gradient for good: it takes 1 there
        return _one_if_zero(self._scale(w_tilde))

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        return Encoded((w_tilde >= 0).to(torch.uint8), self._scale(w_tilde))

    def decode(self, encoded: Encoded) -> Tensor:
        signs = encoded.codes.to(encoded.scale.dtype) * 2 - 1
        return signs * encoded.scale


@dataclass(frozen=True, repr=False)  # _PerChannel's repr
class BWNPerChannel(_PerChannel, BWN):
    """BWN with one scale per output channel, ``a_o = mean|W[o]|`` (the original code's "BWN-F", also ``bwn-f``).

    The output channels lie along ``axis``: 0 for convolutions, linear, recurrent and embedding weights, 1 for
    transposed convolutions (``[C_in, C_out / groups, ...]``; with ``groups > 1`` the channels ``j``,
    ``j + C_out / groups``, ... share column ``j``'s scale); ``quantize_`` sets it. A 1-D weight gets one scale.

    Raises:
        ValueError: ``axis`` is not an ``int >= 0``, or beyond the last axis of a weight of 2 or more dimensions.
    """

    name: ClassVar[str] = "bwn-channel"

    def _scale(self, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return _mean_abs(w).reshape(1)
        return _mean_abs(w, dim=self._other_axes(w))


@dataclass(frozen=True)
class Ternary(ForwardQuantizer):
    """Ternary weights (TWN, Li et al. 2016), 2 bits: ``Ŵ = a·t``, ``t ∈ {−1, 0, +1}``, ``int8`` codes.

    ``Δ = 0.7·mean|W|``; ``t = sign(W)·1{|W| > Δ}``; ``a`` = mean of ``|W|`` over ``|W| > Δ``; ``c(W) = 1``.
    """

    name: ClassVar[str] = "ternary"
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 2

    @property
    def num_levels(self) -> int:
        return 3

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        delta = 0.7 * _mean_abs(w_tilde)
        mask = w_tilde.abs() > delta
        codes = (torch.sign(w_tilde) * mask).to(torch.int8)
        kept = mask.sum().clamp_min(1)
        scale = ((w_tilde.abs() * mask).sum() / kept).reshape(1)
        return Encoded(codes, scale)

    def decode(self, encoded: Encoded) -> Tensor:
        return encoded.codes.to(encoded.scale.dtype) * encoded.scale


@dataclass(frozen=True)
class UniformSymmetric(ForwardQuantizer):
    """Uniform symmetric k-bit weights, k = 2..8: ``Ŵ = s·clamp(round(W/s), −L, L)``, ``L = 2^(k−1) − 1``.

    ``s = max|W| / L`` per layer (``1 / L`` for an all-zero weight), so nothing is clipped and ``c(W) = 1``;
    ``2L + 1`` levels, ``int8`` codes in ``−L..L``.
    """

    name: ClassVar[str] = "uniform"
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 8

    @property
    def _half_levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def num_levels(self) -> int:
        return 2 * self._half_levels + 1

    def _peak(self, w_tilde: Tensor) -> Tensor:
        """``max|W̃|`` of each scale group, shaped as the scale: ``[1]`` per layer."""
        return _max_abs(w_tilde).reshape(1)

    def _scale(self, w_tilde: Tensor) -> Tensor:
        """``s = max|W̃| / L`` of each scale group, ``1 / L`` where the group is all zero."""
        # (a denormal peak divided by L may still underflow to 0)
        return (_one_if_zero(self._peak(w_tilde)) / self._half_levels).clamp_min(torch.finfo(w_tilde.dtype).tiny)

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        half = self._half_levels
        scale = self._scale(w_tilde)
        codes = torch.round(w_tilde / self._broadcast(scale, w_tilde)).clamp_(-half, half).to(torch.int8)
        return Encoded(codes, scale)

    def _broadcast(self, scale: Tensor, codes: Tensor) -> Tensor:
        """The scale as it multiplies ``codes``: as it is, except per group (``expand_groups``)."""
        return scale

    def decode(self, encoded: Encoded) -> Tensor:
        return encoded.codes.to(encoded.scale.dtype) * self._broadcast(encoded.scale, encoded.codes)


@dataclass(frozen=True, repr=False)  # _PerChannel's repr
class UniformPerChannel(_PerChannel, UniformSymmetric):
    """``uniform`` with one scale per output channel, ``s_o = max|W[o]| / L`` (``1 / L`` for an all-zero channel).

    The output channels lie along ``axis`` as for ``BWNPerChannel`` (0, or 1 for transposed convolutions, set by
    ``quantize_``); a 1-D weight gets one scale. ``c(W) = 1`` and the STE's factor is 1, as for ``uniform``.

    Raises:
        ValueError: ``axis`` is not an ``int >= 0``, or beyond the last axis of a weight of 2 or more dimensions.
    """

    name: ClassVar[str] = "uniform-channel"

    def _peak(self, w_tilde: Tensor) -> Tensor:
        if w_tilde.dim() < 2:
            return super()._peak(w_tilde)
        others = self._other_axes(w_tilde)
        return _max_abs(w_tilde, dim=others)


def expand_groups(scale: Tensor, group_size: int, length: int) -> Tensor:
    """Per-group scales ``[..., G]`` spread over the weights: each repeated ``group_size`` times along the last
    axis, cut to ``length`` (the last group may be shorter): ``[..., length]``."""
    return scale.repeat_interleave(group_size, dim=-1)[..., :length]


@dataclass(frozen=True)
class UniformPerGroup(UniformSymmetric):
    """``uniform`` with one scale per group of ``group_size`` consecutive inputs of each output row of a 2-D
    weight ``[C_out, C_in]`` (linear, embedding, recurrent and attention projections): ``s = max|group| / L``.

    Groups run along the last axis; when ``group_size`` does not divide ``C_in`` the last group of a row is
    shorter, as in ONNX's blocked ``DequantizeLinear``. Scales ``[C_out, ceil(C_in / group_size)]``; an all-zero
    group gets ``1 / L``. ``c(W) = 1`` and the STE's factor is 1, as for ``uniform``.

    Raises:
        ValueError: ``group_size`` is not an integer >= 1; (when quantizing) a weight that is not 2-D.
    """

    name: ClassVar[str] = "uniform-group"
    group_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("group_size", self.group_size, minimum=1)

    @property
    def scale_group_size(self) -> int:
        return self.group_size

    def _peak(self, w_tilde: Tensor) -> Tensor:
        if w_tilde.dim() != 2:
            raise ValueError(
                f"quantizer 'uniform-group' groups the inputs of 2-D weights [C_out, C_in], not a weight of shape "
                f"{tuple(w_tilde.shape)}: keep it to Linear layers with quantize_(..., filter_fn=...) (e.g. "
                "lambda m, name: isinstance(m, torch.nn.Linear)), or use 'uniform-channel'"
            )
        rows, length = w_tilde.shape
        groups = math.ceil(length / self.group_size)
        # zeros pad the last group to full size without changing its max|·|
        padded = torch.nn.functional.pad(w_tilde, (0, groups * self.group_size - length))
        return _max_abs(padded.reshape(rows, groups, self.group_size), dim=-1, keepdim=False)

    def _broadcast(self, scale: Tensor, codes: Tensor) -> Tensor:
        return expand_groups(scale, self.group_size, codes.shape[-1])
