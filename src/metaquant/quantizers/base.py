"""The interface every forward quantizer implements (``ForwardQuantizer``), the integer form of a quantized weight
(``Encoded``), and what the per-channel quantizers share (``_PerChannel``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..validation import is_int


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


def _max_abs(t: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = True) -> Tensor:
    """``max|t|`` over ``dim`` (all axes when None, a 0-d result), 0 over an empty reduction (an empty weight).

    ``vector_norm(·, inf)`` is ``max|t|`` without the copy that ``abs().max()`` makes of a channels-last tensor;
    it refuses an empty tensor, whose sum (0, of the reduced shape) stands for its max here.
    """
    if t.numel() == 0:
        return t.sum() if dim is None else t.sum(dim=dim, keepdim=keepdim)
    return torch.linalg.vector_norm(t, float("inf"), dim=dim, keepdim=keepdim if dim is not None else False)


def _mean_abs(t: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``mean|t|`` over ``dim`` (all axes when None, a 0-d result; kept dimensions otherwise), 0 over an empty
    reduction, where ``mean`` would give NaN: an empty weight has no scale."""
    if t.numel() == 0:
        return t.sum() if dim is None else t.sum(dim=dim, keepdim=True)
    return t.abs().mean() if dim is None else t.abs().mean(dim=dim, keepdim=True)


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
