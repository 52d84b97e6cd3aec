"""Forward quantizers: how a latent full-precision weight ``W`` becomes the low-bit weight ``Ŵ``.

Every quantizer is the same small interface of pure functions (DESIGN §2-§3, paper §3.1):

* ``preprocess(W) -> W̃``      the differentiable pre-processing ``A``;
* ``quantize(W̃) -> Ŵ``        the step function ``Q`` (its value only; it has no useful derivative);
* ``relaxed(W)``              ``Q ∘ A`` with the rounding removed and the scale statistics held constant:
                              the differentiable part of the path from ``W`` to ``Ŵ``, in ``Ŵ``'s units;
* ``calibration(W) -> c(W)``  the element-wise derivative of ``relaxed``; the meta quantizer's output
                              ``g_W̃`` becomes the weight gradient ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1, step 1);
* ``ste_scale(W̃)``            the factor the Straight-Through Estimator gives ``dŴ/d relaxed`` (1 for DoReFa,
                              the layer scale ``a`` for BWN as in XNOR-Net);
* ``encode(W) -> Encoded``    integer codes plus scale(s), and ``decode(Encoded) -> Ŵ``, exact: it is how
                              ``quantize`` itself produces ``Ŵ``, so an exported model computes the same numbers.

Quantizers are frozen dataclasses that hold only their configuration (the bit width), so they are safe to share
between layers and to pickle. ``get_quantizer(name, bits)`` builds one from the registry ``QUANTIZERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Encoded",
    "ForwardQuantizer",
    "DoReFa",
    "BWN",
    "BWNPerChannel",
    "Ternary",
    "UniformSymmetric",
    "QUANTIZERS",
    "get_quantizer",
    "quantizer_names",
]


class Encoded(NamedTuple):
    """A quantized weight as integer codes plus the float scale(s) that decode them.

    ``codes`` has the weight's shape and an integer dtype (``uint8`` for unsigned codes, ``int8`` for signed);
    ``scale`` broadcasts against ``codes`` (shape ``[1]`` per layer, ``[C_out, 1, ...]`` per channel).
    """

    codes: Tensor
    scale: Tensor


def _channel_view_shape(w: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per output channel (dim 0) against ``w``: ``[C_out, 1, 1, ...]``."""
    return (w.shape[0],) + (1,) * (w.dim() - 1)


@dataclass(frozen=True)
class ForwardQuantizer:
    """Base class: one forward quantizer at a given bit width. Subclasses implement the six pure functions."""

    bits: int = 1

    name: ClassVar[str] = ""
    #: Bit widths this quantizer supports, inclusive.
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not self.min_bits <= self.bits <= self.max_bits:
            allowed = (
                f"{self.min_bits}" if self.min_bits == self.max_bits else f"{self.min_bits}..{self.max_bits}"
            )
            raise ValueError(f"quantizer {self.name!r} does not support bits={self.bits}; allowed: {allowed}")

    # --- the interface ------------------------------------------------------------------------------------
    def preprocess(self, w: Tensor) -> Tensor:
        """``A(W)``, differentiable. Identity unless the quantizer says otherwise."""
        return w

    def quantize(self, w_tilde: Tensor) -> Tensor:
        """``Q(W̃)``: the low-bit weight. Defined as ``decode(encode)`` so export is exact by construction."""
        return self.decode(self.encode_preprocessed(w_tilde))

    def relaxed(self, w: Tensor) -> Tensor:
        """``Q(A(W))`` without the rounding, scale statistics detached. Identity unless overridden."""
        return w

    def calibration(self, w: Tensor) -> Tensor:
        """``c(W) = d relaxed(W) / dW`` element-wise, in closed form."""
        return torch.ones_like(w)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        """The STE's derivative of ``Ŵ`` w.r.t. ``relaxed(W)``, beyond the clipping gate. Broadcastable."""
        return torch.ones((), dtype=w_tilde.dtype, device=w_tilde.device)

    def encode(self, w: Tensor) -> Encoded:
        """Integer codes and scales of ``Q(A(W))``."""
        return self.encode_preprocessed(self.preprocess(w))

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, encoded: Encoded) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- conveniences -------------------------------------------------------------------------------------
    def __call__(self, w: Tensor) -> Tensor:
        """``Ŵ = Q(A(W))`` (value only)."""
        return self.quantize(self.preprocess(w))

    @property
    def num_levels(self) -> int:
        """The largest number of distinct values ``Ŵ`` can take per scale group."""
        return 2**self.bits


@dataclass(frozen=True)
class DoReFa(ForwardQuantizer):
    """DoReFa-Net weights (Zhou et al. 2016), k = 1..8 bits.

    ``W̃ = tanh(W) / (2·max|tanh W|) + 1/2 ∈ [0, 1]``;  ``Ŵ = 2·round((2^k − 1)·W̃)/(2^k − 1) − 1 ∈ [−1, 1]``.
    ``c(W) = (1 − tanh²W) / max|tanh W|``, the max held constant: the derivative of ``2·W̃ − 1``. With it an
    identity meta quantizer gives exactly the STE gradient (DESIGN §3).
    """

    name: ClassVar[str] = "dorefa"
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 8

    @staticmethod
    def _tanh_max(w: Tensor) -> Tensor:
        # Guard the all-zero weight: tanh(0) = 0 everywhere would divide by zero.
        return torch.tanh(w).abs().max().clamp_min(torch.finfo(w.dtype).tiny)

    def preprocess(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return t / (2 * self._tanh_max(w)) + 0.5

    def relaxed(self, w: Tensor) -> Tensor:
        return torch.tanh(w) / self._tanh_max(w).detach()

    def calibration(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return (1 - t * t) / self._tanh_max(w)

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


@dataclass(frozen=True)
class BWN(ForwardQuantizer):
    """Binary-weight networks (XNOR-Net, Rastegari et al. 2016): ``Ŵ = a·sign(W)``, ``a = mean|W|`` per layer.

    ``sign(0)`` is taken as +1 so that exactly two values occur. ``c(W) = 1`` as in the paper; the STE multiplies
    by ``a`` (``ste_scale``), so STE and an identity meta quantizer differ by the factor ``a`` and the gate.
    """

    name: ClassVar[str] = "bwn"

    def _scale(self, w: Tensor) -> Tensor:
        return w.abs().mean().reshape(1)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        return self._scale(w_tilde)

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        return Encoded((w_tilde >= 0).to(torch.uint8), self._scale(w_tilde))

    def decode(self, encoded: Encoded) -> Tensor:
        signs = encoded.codes.to(encoded.scale.dtype) * 2 - 1
        return signs * encoded.scale


@dataclass(frozen=True)
class BWNPerChannel(BWN):
    """BWN with one scale per output channel (dim 0): ``a_o = mean|W[o]|`` (the original code's "BWN-F")."""

    name: ClassVar[str] = "bwn-channel"

    def _scale(self, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return w.abs().mean().reshape(1)
        return w.abs().mean(dim=tuple(range(1, w.dim()))).reshape(_channel_view_shape(w))


@dataclass(frozen=True)
class Ternary(ForwardQuantizer):
    """Ternary weights (TWN, Li et al. 2016): ``Ŵ = a·t``, ``t ∈ {−1, 0, +1}``, 2 bits.

    Threshold ``Δ = 0.7·mean|W|``; ``t = sign(W)·1{|W| > Δ}``; ``a`` = mean of ``|W|`` over ``|W| > Δ``.
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

    ``s = max|W| / L`` per layer, so no weight is clipped and ``c(W) = 1``. Uses ``2L + 1 = 2^k − 1`` levels.
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

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:
        half = self._half_levels
        scale = (w_tilde.abs().max() / half).clamp_min(torch.finfo(w_tilde.dtype).tiny).reshape(1)
        codes = torch.round(w_tilde / scale).clamp_(-half, half).to(torch.int8)
        return Encoded(codes, scale)

    def decode(self, encoded: Encoded) -> Tensor:
        return encoded.codes.to(encoded.scale.dtype) * encoded.scale


QUANTIZERS: dict[str, type[ForwardQuantizer]] = {
    cls.name: cls for cls in (DoReFa, BWN, BWNPerChannel, Ternary, UniformSymmetric)
}
# The original code's spellings, accepted on input.
_ALIASES = {"bwn-f": "bwn-channel", "bwn_f": "bwn-channel", "twn": "ternary"}


def quantizer_names() -> list[str]:
    """Registered quantizer names."""
    return list(QUANTIZERS)


def get_quantizer(name: str, bits: int = 1) -> ForwardQuantizer:
    """Build a forward quantizer by name (``dorefa``, ``bwn``, ``bwn-channel``, ``ternary``, ``uniform``).

    Raises:
        ValueError: unknown name (the message lists the registered ones) or unsupported bit width.
    """
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[key](bits=bits)

