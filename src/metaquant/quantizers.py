"""Forward quantizers: how a latent full-precision weight ``W`` becomes the low-bit weight ``Ŵ``.

Each quantizer is a frozen dataclass of pure functions (docs/design.md §2-§3, paper §3.1):

* ``preprocess(W) -> W̃``      the differentiable pre-processing ``A``;
* ``quantize(W̃) -> Ŵ``        the step function ``Q`` (value only);
* ``relaxed(W)``              ``Q ∘ A`` without the rounding, scale statistics held constant;
* ``calibration(W) -> c(W)``  the derivative of ``relaxed``: ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1 step 1, Eq. 4-5);
* ``ste_scale(W̃)``            the STE's factor on ``dŴ/d relaxed`` (1 for DoReFa, the layer scale ``a`` for BWN);
* ``encode(W)``/``decode``    integer codes plus scale(s), exact: ``quantize`` itself is ``decode(encode)``.

They hold only their bit width (and, per channel, the output-channel axis; per group, the group size), so layers
may share them. A quantizer with learned tensors (``LSQ``'s step) declares them in ``learned``: each quantized
layer holds them as Parameters and hands them to its quantizer (``bind``) at every use, so the Parameters stay
the module's. ``get_quantizer(name, bits)`` builds one from the registry ``QUANTIZERS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .validation import check_int, is_int

__all__ = [
    "Encoded",
    "ForwardQuantizer",
    "DoReFa",
    "DoReFaPerChannel",
    "BWN",
    "BWNPerChannel",
    "Ternary",
    "UniformSymmetric",
    "UniformPerChannel",
    "UniformPerGroup",
    "LSQ",
    "LSQPerChannel",
    "expand_groups",
    "QUANTIZERS",
    "get_quantizer",
    "quantizer_names",
]


class Encoded(NamedTuple):
    """A quantized weight as integer codes (``uint8`` unsigned, ``int8`` signed) and the scale(s) that decode them.

    ``scale`` broadcasts against ``codes``: ``[1]`` per layer; per channel ``[C_out, 1, ...]``, or
    ``[1, C_out / groups, 1, ...]`` for a transposed convolution. Per group (``UniformPerGroup``) it is
    ``[C_out, ceil(C_in / group_size)]``, broadcast by ``expand_groups``. The form in which a weight is exported.
    """

    codes: Tensor
    scale: Tensor


@dataclass(frozen=True)
class ForwardQuantizer:
    """Base class: one forward quantizer at a given bit width.

    A subclass sets ``name`` (its registry key) and ``min_bits``/``max_bits``, implements ``encode_preprocessed``
    and ``decode``, and overrides ``preprocess``/``relaxed``/``calibration``/``ste_scale`` where they are not the
    identity / one.

    Raises:
        TypeError: ``bits`` is not an ``int`` (a ``bool`` is refused too).
        ValueError: ``bits`` is outside ``min_bits..max_bits``.
    """

    bits: int = 1

    name: ClassVar[str] = ""
    #: Bit widths this quantizer supports, inclusive.
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 1
    #: Whether ``preprocess_segments`` and ``backward_terms_segments`` are implemented: the quantizer depends on
    #: a weight's shape only through per-weight statistics, and ``quantize`` is element-wise, so the weights of
    #: several layers can be quantized as segments of one flat vector (``estimators.fake_quantize_many``).
    #: Only a class that declares it has it: a subclass may change the formulas the segments replace.
    segmentable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "segmentable" not in cls.__dict__:
            cls.segmentable = False

    def __post_init__(self) -> None:
        if not is_int(self.bits):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not self.min_bits <= self.bits <= self.max_bits:
            allowed = f"{self.min_bits}" if self.min_bits == self.max_bits else f"{self.min_bits}..{self.max_bits}"
            raise ValueError(f"quantizer {self.name!r} does not support bits={self.bits}; allowed: {allowed}")

    # --- the interface ------------------------------------------------------------------------------------
    def preprocess(self, w: Tensor) -> Tensor:
        """``W̃ = A(W)``, the differentiable pre-processing (docs/design.md §3); identity unless overridden.

        DoReFa's is ``tanh(W) / (2·max|tanh W|) + 1/2 ∈ [0, 1]``, its max differentiated through (unlike in
        ``relaxed`` and ``calibration``).
        """
        return w

    def quantize(self, w_tilde: Tensor) -> Tensor:
        """``Ŵ = Q(W̃)``, defined as ``decode(encode)`` so export is exact; a step function (value only, see
        ``metaquant.estimators.fake_quantize`` for a gradient).
        """
        return self.decode(self.encode_preprocessed(w_tilde))

    def relaxed(self, w: Tensor) -> Tensor:
        """``Q(A(W))`` without the rounding, scale statistics detached; identity unless overridden.

        The ``r`` that the classical estimators gate and scale, in ``Ŵ``'s units; its derivative is ``calibration``.
        DoReFa's is ``tanh(W) / max|tanh W| = 2·W̃ − 1``.
        """
        return w

    def calibration(self, w: Tensor) -> Tensor:
        """``c(W) = d relaxed(W) / dW`` element-wise, in closed form (docs/design.md §3); ones unless overridden.

        ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1 step 1, Eq. 4-5). DoReFa's is ``(1 − tanh²W) / max|tanh W|``.
        """
        return torch.ones_like(w)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        """The STE's derivative of ``Ŵ`` w.r.t. ``relaxed(W)`` beyond the clipping gate, broadcastable against ``W̃``.

        1 unless overridden; BWN's layer scale ``a = mean|W̃|`` as in XNOR-Net (per channel for ``BWNPerChannel``), 1
        where ``a = 0``. Used by the meta quantizer's ``∂ℓ/∂φ``, not by its ``g_W`` (docs/design.md §3, §5.3).
        """
        return torch.ones((), dtype=w_tilde.dtype, device=w_tilde.device)

    def backward_terms(self, w: Tensor, w_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(relaxed(W), ste_scale(W̃), c(W))`` at once (the STE's backward), equal to the three methods to the bit."""
        return self.relaxed(w), self.ste_scale(w_tilde), self.calibration(w)

    def preprocess_segments(self, x: Tensor, numels: Sequence[int]) -> Tensor:
        """``preprocess`` of each segment (lengths ``numels``) of a flat vector at once; only where ``segmentable``."""
        raise NotImplementedError(f"quantizer {self.name!r} does not process flat segments")

    def backward_terms_segments(self, x: Tensor, numels: Sequence[int]) -> tuple[Tensor, Tensor | None, Tensor]:
        """``backward_terms`` of each segment of a flat vector; only where ``segmentable`` (``ste_scale`` None: one)."""
        raise NotImplementedError(f"quantizer {self.name!r} does not process flat segments")

    def relaxed_units(self, w_hat: Tensor, w_tilde: Tensor) -> Tensor:
        """``Ŵ`` in the units of ``relaxed`` (what an estimator compares with ``r``, e.g. ``EWGS``'s ``r − Ŵ``);
        ``Ŵ`` itself unless overridden (``LSQ``'s ``r`` is ``W`` in steps of the clipping level)."""
        return w_hat

    # --- learned tensors (none unless overridden) ------------------------------------------------------
    #: The names of the tensors the quantizer learns; a quantized layer holds each as ``weight_<name>``.
    learned: ClassVar[tuple[str, ...]] = ()

    def initial_learned(self, w: Tensor) -> dict[str, Tensor]:
        """The first value of each ``learned`` tensor for the weight ``w`` (``{}`` when it learns nothing)."""
        return {}

    def bind(self, learned: dict[str, Tensor]) -> ForwardQuantizer:
        """This quantizer computing with the given ``learned`` tensors (a layer's Parameters); itself by default."""
        return self

    def unbound(self) -> ForwardQuantizer:
        """This quantizer's configuration, without learned tensors bound to it; itself by default."""
        return self

    def learned_gradient(self, w_hat: Tensor, w: Tensor) -> Tensor:
        """``Ŵ`` (its value unchanged) with the derivative of ``Ŵ`` w.r.t. the bound learned tensors added to its
        graph; ``w_hat`` itself for a quantizer that learns nothing (``fake_quantize`` calls it)."""
        return w_hat

    def encode(self, w: Tensor) -> Encoded:
        """Integer codes and scales of ``Q(A(W))``; ``decode(encode(W))`` equals ``Q(A(W))`` bit for bit."""
        return self.encode_preprocessed(self.preprocess(w))

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:  # pragma: no cover - abstract
        """Integer codes and scales of ``Q(W̃)``, from the pre-processed weight; every subclass implements it."""
        raise NotImplementedError

    def decode(self, encoded: Encoded) -> Tensor:  # pragma: no cover - abstract
        """``Ŵ`` from its codes and scale(s): the one formula by which ``quantize`` produces ``Ŵ``."""
        raise NotImplementedError

    # --- conveniences -------------------------------------------------------------------------------------
    def __call__(self, w: Tensor) -> Tensor:
        """``Ŵ = Q(A(W))`` (value only): the weight a quantized layer computes with (Algorithm 1 step 3, Eq. 7)."""
        return self.quantize(self.preprocess(w))

    @property
    def num_levels(self) -> int:
        """The largest number of distinct values ``Ŵ`` can take per scale group."""
        return 2**self.bits

    @property
    def scale_group_size(self) -> int | None:
        """How many consecutive weights along the last axis share one scale (``expand_groups``), or None: one scale
        per layer or per output channel, broadcast as it is."""
        return None

    def with_channel_axis(self, axis: int) -> ForwardQuantizer:
        """This quantizer for a weight whose output channels lie along ``axis`` (1 for transposed convolutions).

        Per-layer and per-group quantizers return themselves; the per-channel ones (``BWNPerChannel``,
        ``UniformPerChannel``) a copy. ``quantize_`` calls it for each layer.

        Raises:
            ValueError: ``axis`` is not an ``int >= 0``.
        """
        _check_axis(axis)
        return self


def _overrides(quantizer: object, base: type, names: Sequence[str]) -> bool:
    """Whether the class of ``quantizer`` replaces any of ``base``'s methods ``names``."""
    return any(getattr(type(quantizer), name) is not getattr(base, name) for name in names)


def _one_if_zero(statistic: Tensor) -> Tensor:
    """A per-layer (or per-channel) statistic, with 0 replaced by 1: a weight that is all zero has no scale."""
    return torch.where(statistic == 0, torch.ones_like(statistic), statistic)


def _check_axis(axis: object) -> None:
    if not (is_int(axis) and axis >= 0):
        raise ValueError(f"the output-channel axis must be an int >= 0, got {axis!r}")


@dataclass(frozen=True)
class _PerChannel:
    """The output-channel ``axis`` of a per-channel quantizer (``BWNPerChannel``, ``UniformPerChannel``): listed
    before the quantizer among the bases, so that ``axis`` follows its ``bits``."""

    axis: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the quantizer's own checks
        _check_axis(self.axis)

    def __repr__(self) -> str:
        shown = f", axis={self.axis}" if self.axis else ""  # the usual axis 0 is not shown
        return f"{type(self).__name__}(bits={self.bits}{shown})"  # type: ignore[attr-defined]

    def with_channel_axis(self, axis: int) -> ForwardQuantizer:
        _check_axis(axis)
        return self if axis == self.axis else dataclasses.replace(self, axis=axis)  # type: ignore[return-value]

    def _other_axes(self, w: Tensor) -> tuple[int, ...]:
        """The axes of ``w`` (2 or more dimensions) other than ``axis``: those a per-channel statistic reduces."""
        if self.axis >= w.dim():
            raise ValueError(
                f"{type(self).__name__}(axis={self.axis}) cannot quantize a weight of shape {tuple(w.shape)}: "
                f"its axes are 0..{w.dim() - 1}"
            )
        return tuple(d for d in range(w.dim()) if d != self.axis)


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
        # vector_norm(·, inf) is max|t| without the copy that abs().max() makes of a channels-last tensor
        return _one_if_zero(torch.linalg.vector_norm(t, float("inf")))

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
        if t.device.type == "cpu" and all(numels):
            # On a CPU the inf-norm is a slow generic reduction (4x the time of |t| and a max); on CUDA it is
            # one fused kernel. An empty segment has no max: the norm's 0 stands for it.
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
        return _one_if_zero(torch.linalg.vector_norm(t, float("inf"), dim=self._other_axes(t), keepdim=True))


@dataclass(frozen=True)
class BWN(ForwardQuantizer):
    """Binary-weight networks (XNOR-Net, Rastegari et al. 2016): ``Ŵ = a·sign(W)``, ``a = mean|W|`` per layer.

    ``sign(0) = +1``; codes are 1 for ``+a``, 0 for ``−a``. ``c(W) = 1`` as in the paper; the STE multiplies by ``a``
    (``ste_scale``). Only ``bits=1``.
    """

    name: ClassVar[str] = "bwn"

    def _scale(self, w: Tensor) -> Tensor:
        return w.abs().mean().reshape(1)

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
            return w.abs().mean().reshape(1)
        return w.abs().mean(dim=self._other_axes(w), keepdim=True)


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
        delta = 0.7 * w_tilde.abs().mean()
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
        return torch.linalg.vector_norm(w_tilde, float("inf")).reshape(1)  # without a channels-last copy

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
        return torch.linalg.vector_norm(w_tilde, float("inf"), dim=others, keepdim=True)


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
        return torch.linalg.vector_norm(padded.reshape(rows, groups, self.group_size), float("inf"), dim=-1)

    def _broadcast(self, scale: Tensor, codes: Tensor) -> Tensor:
        return expand_groups(scale, self.group_size, codes.shape[-1])


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
        return w.abs().mean().reshape(1)

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
        return w.abs().mean(dim=self._other_axes(w), keepdim=True)

    def _shaped(self, step: Tensor, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return step.reshape(1)
        return step.reshape([size if d == self.axis else 1 for d, size in enumerate(w.shape)])


def _step_floor(dtype: torch.dtype) -> float:
    return max(LSQ_STEP_FLOOR, torch.finfo(dtype).tiny)


QUANTIZERS: dict[str, type[ForwardQuantizer]] = {
    cls.name: cls
    for cls in (
        DoReFa,
        BWN,
        BWNPerChannel,
        Ternary,
        UniformSymmetric,
        UniformPerChannel,
        UniformPerGroup,
        LSQ,
        LSQPerChannel,
        DoReFaPerChannel,
    )
}
# The original code's spellings, accepted on input.
_ALIASES = {"bwn-f": "bwn-channel", "bwn_f": "bwn-channel", "twn": "ternary"}


def quantizer_names() -> list[str]:
    """Registered quantizer names in registration order (the keys of ``QUANTIZERS``, without aliases)."""
    return list(QUANTIZERS)


def get_quantizer(name: str, bits: int = 1, *, group_size: int | None = None) -> ForwardQuantizer:
    """Build a forward quantizer by name (``dorefa``, ``bwn``, ``bwn-channel``, ``ternary``, ``uniform``,
    ``uniform-channel``, ``uniform-group``, ``lsq``, ``lsq-channel``, ``dorefa-channel``).

    Names are case-insensitive; the original spellings ``bwn-f``/``bwn_f`` and ``twn`` are accepted too. ``bits``:
    ``ternary`` needs 2, ``uniform*`` and ``lsq*`` 2..8, ``dorefa*`` 1..8. ``group_size``: the weights per scale of
    ``uniform-group`` (None: its default, 128); no other quantizer takes one.

    Raises:
        ValueError: unknown name (the message lists the registered ones), unsupported bit width, a ``group_size``
            that is not an integer >= 1, or one given to a quantizer without groups.
        TypeError: ``bits`` is not an ``int``.

    Example:
        >>> mq.get_quantizer("DoReFa", bits=2), mq.get_quantizer("twn", bits=2)
        (DoReFa(bits=2), Ternary(bits=2))
        >>> mq.get_quantizer("uniform-group", 4, group_size=64)
        UniformPerGroup(bits=4, group_size=64)
        >>> mq.get_quantizer("sign")
        Traceback (most recent call last):
        ...
        ValueError: unknown quantizer 'sign'; allowed: dorefa, bwn, bwn-channel, ternary, uniform, ...
    """
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[key]
    if group_size is None:
        return cls(bits=bits)
    grouped = [n for n, c in QUANTIZERS.items() if "group_size" in {f.name for f in dataclasses.fields(c)}]
    if key not in grouped:
        raise ValueError(f"group_size={group_size!r} applies to quantizer {', '.join(grouped)}, not to {key!r}")
    return cls(bits=bits, group_size=group_size)  # type: ignore[call-arg]  # a field of the grouped classes only
