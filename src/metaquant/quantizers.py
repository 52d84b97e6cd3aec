"""Forward quantizers: how a latent full-precision weight ``W`` becomes the low-bit weight ``Ŵ``.

Every quantizer is the same small interface of pure functions (docs/design.md §2-§3, paper §3.1):

* ``preprocess(W) -> W̃``      the differentiable pre-processing ``A``;
* ``quantize(W̃) -> Ŵ``        the step function ``Q`` (its value only; it has no useful derivative);
* ``relaxed(W)``              ``Q ∘ A`` with the rounding removed and the scale statistics held constant:
                              the differentiable part of the path from ``W`` to ``Ŵ``, in ``Ŵ``'s units;
* ``calibration(W) -> c(W)``  the element-wise derivative of ``relaxed``; the meta quantizer's output
                              ``g_W̃`` becomes the weight gradient ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1 step 1,
                              Eq. 4-5);
* ``ste_scale(W̃)``            the factor the Straight-Through Estimator gives ``dŴ/d relaxed`` (1 for DoReFa,
                              the layer scale ``a`` for BWN as in XNOR-Net);
* ``encode(W) -> Encoded``    integer codes plus scale(s), and ``decode(Encoded) -> Ŵ``, exact: it is how
                              ``quantize`` itself produces ``Ŵ``, so an exported model computes the same numbers.

Quantizers are frozen dataclasses that hold only their configuration (the bit width; for the per-channel
variant also the weight's output-channel axis), so they are safe to share between layers and to pickle.
``get_quantizer(name, bits)`` builds one from the registry ``QUANTIZERS``; ``with_channel_axis`` gives the
variant for a layer whose output channels lie along another axis of its weight (``nn.ConvTranspose*``: 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .validation import is_int

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
    ``scale``, in the weight's dtype, broadcasts against ``codes`` (shape ``[1]`` per layer; per channel, the
    weight's size along its output-channel axis there and 1 elsewhere: ``[C_out, 1, ...]``, or
    ``[1, C_out / groups, 1, ...]`` for a transposed convolution). Produced by ``ForwardQuantizer.encode`` and
    turned back into ``Ŵ`` by ``ForwardQuantizer.decode``; it is the form in which a quantized weight is exported.

    Example:
        >>> q = mq.quantizers.DoReFa(bits=2)
        >>> w = torch.tensor([-1.0, 0.1, 2.0])
        >>> enc = q.encode(w)
        >>> enc.codes.tolist(), enc.codes.dtype, enc.scale.shape
        ([0, 2, 3], torch.uint8, torch.Size([1]))
        >>> torch.equal(q.decode(enc), q.quantize(q.preprocess(w)))
        True
    """

    codes: Tensor
    scale: Tensor


@dataclass(frozen=True)
class ForwardQuantizer:
    """Base class: one forward quantizer at a given bit width. Subclasses implement the six pure functions.

    A subclass sets ``name`` (its registry key), ``min_bits``/``max_bits`` and overrides ``encode_preprocessed``
    and ``decode`` (always), ``preprocess``/``relaxed``/``calibration``/``ste_scale`` (where they are not the
    identity / one). Instances are frozen and hold only ``bits``.

    Args:
        bits: the bit width, an ``int`` in ``min_bits..max_bits`` of the subclass.

    Raises:
        TypeError: ``bits`` is not an ``int`` (a ``bool`` is refused too).
        ValueError: ``bits`` is outside the range the quantizer supports; the message gives the range.

    Example:
        Two properties every registered quantizer keeps: export is exact, and ``c(W)`` is autograd's derivative
        of ``relaxed``:

        >>> w = torch.randn(4, 3, requires_grad=True)
        >>> for name, cls in mq.quantizers.QUANTIZERS.items():
        ...     q = cls(bits=cls.min_bits)
        ...     (grad,) = torch.autograd.grad(q.relaxed(w).sum(), w)
        ...     exact = torch.equal(q.decode(q.encode(w)), q.quantize(q.preprocess(w)))
        ...     print(name, exact, torch.allclose(grad, q.calibration(w)))
        dorefa True True
        bwn True True
        bwn-channel True True
        ternary True True
        uniform True True
        >>> mq.quantizers.DoReFa(bits=9)
        Traceback (most recent call last):
        ...
        ValueError: quantizer 'dorefa' does not support bits=9; allowed: 1..8
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
        """``W̃ = A(W)``, the differentiable pre-processing (docs/design.md §3). Identity unless overridden.

        DoReFa maps to ``tanh(W) / (2·max|tanh W|) + 1/2 ∈ [0, 1]``; its max is differentiated through here, unlike
        in ``relaxed`` and ``calibration``. ``W̃`` has the shape and dtype of the latent weight ``w``.

        Example:
            >>> w = torch.tensor([-2.0, 0.0, 2.0])
            >>> mq.quantizers.DoReFa().preprocess(w).tolist()
            [0.0, 0.5, 1.0]
            >>> mq.quantizers.BWN().preprocess(w) is w
            True
        """
        return w

    def quantize(self, w_tilde: Tensor) -> Tensor:
        """``Ŵ = Q(W̃)``: the low-bit weight. Defined as ``decode(encode)`` so export is exact by construction.

        A step function: use its value only (see ``metaquant.estimators.fake_quantize`` for a gradient).

        Args:
            w_tilde: the pre-processed weight ``W̃ = preprocess(W)``.

        Returns:
            ``Ŵ``, same shape and dtype as ``w_tilde``, with at most ``num_levels`` distinct values per scale group.

        Example:
            >>> q = mq.quantizers.DoReFa(bits=2)
            >>> w = torch.randn(3, 4)
            >>> w_hat = q.quantize(q.preprocess(w))
            >>> torch.equal(w_hat, q.decode(q.encode(w))), w_hat.unique().numel() <= q.num_levels
            (True, True)
        """
        return self.decode(self.encode_preprocessed(w_tilde))

    def relaxed(self, w: Tensor) -> Tensor:
        """``Q(A(W))`` without the rounding, scale statistics detached. Identity unless overridden.

        The differentiable part of the path from ``W`` to ``Ŵ``, in ``Ŵ``'s units: the ``r`` that the classical
        estimators gate and scale (``metaquant.estimators``); its derivative is ``calibration``. DoReFa's is
        ``tanh(W) / max|tanh W| = 2·W̃ − 1 ∈ [−1, 1]``. Same shape and dtype as the latent weight ``w``.

        Example:
            For 2-bit DoReFa, ``r`` and ``Ŵ`` differ by the rounding only, at most half a step (``1/3``):

            >>> q = mq.quantizers.DoReFa(bits=2)
            >>> w = torch.randn(3, 4)
            >>> torch.allclose(q.relaxed(w), 2 * q.preprocess(w) - 1)
            True
            >>> bool((q.quantize(q.preprocess(w)) - q.relaxed(w)).abs().max() <= 1 / 3)
            True
        """
        return w

    def calibration(self, w: Tensor) -> Tensor:
        """``c(W) = d relaxed(W) / dW`` element-wise, in closed form (docs/design.md §3). Ones unless overridden.

        It turns the gradient w.r.t. ``W̃`` into the weight gradient: ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1 step 1,
        Eq. 4-5). DoReFa's is ``(1 − tanh²W) / max|tanh W|``, the max held constant. Same shape and dtype as the
        latent weight ``w``; no graph to ``w`` is needed.

        Example:
            >>> q = mq.quantizers.DoReFa()
            >>> w = torch.randn(3, 4, requires_grad=True)
            >>> (autograd_c,) = torch.autograd.grad(q.relaxed(w).sum(), w)
            >>> torch.allclose(q.calibration(w), autograd_c)
            True
        """
        return torch.ones_like(w)

    def ste_scale(self, w_tilde: Tensor) -> Tensor:
        """The STE's derivative of ``Ŵ`` w.r.t. ``relaxed(W)``, beyond the clipping gate. Broadcastable.

        1 unless overridden (DoReFa, ternary, uniform); BWN's layer scale ``a = mean|W̃|``, as in XNOR-Net
        (``BWNPerChannel``: one ``a`` per output channel), or 1 where ``a = 0``. The meta quantizer's ``g_W``
        does not use it; its ``∂ℓ/∂φ`` does (docs/design.md §3, §5.3).

        Args:
            w_tilde: the pre-processed weight ``W̃``.

        Returns:
            A tensor that broadcasts against ``w_tilde`` (a 0-d one, shape ``[1]``, or one value per output
            channel, as ``Encoded.scale``).

        Example:
            >>> w = torch.tensor([[0.5, -1.5], [0.0, -0.2]])
            >>> mq.quantizers.DoReFa().ste_scale(w).item()
            1.0
            >>> [round(a, 4) for a in mq.quantizers.BWN().ste_scale(w).tolist()]  # mean|W|
            [0.55]
        """
        return torch.ones((), dtype=w_tilde.dtype, device=w_tilde.device)

    def backward_terms(self, w: Tensor, w_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(relaxed(W), ste_scale(W̃), c(W))`` at once: the three terms of the STE's backward pass.

        ``fake_quantize``'s backward needs all three; a subclass whose terms share work (DoReFa's ``tanh W``)
        overrides this to compute them together. The values equal the three methods' to the bit.

        Args:
            w: latent weight ``W``.
            w_tilde: ``preprocess(W)``, as the forward pass computed it.

        Example:
            >>> q, w = mq.quantizers.DoReFa(), torch.randn(3, 4)
            >>> r, s, c = q.backward_terms(w, q.preprocess(w))
            >>> torch.equal(r, q.relaxed(w)), torch.equal(c, q.calibration(w)), s.item()
            (True, True, 1.0)
        """
        return self.relaxed(w), self.ste_scale(w_tilde), self.calibration(w)

    def preprocess_segments(self, x: Tensor, numels: Sequence[int]) -> Tensor:
        """``preprocess`` of each segment of a flat vector, all at once (only where ``segmentable``).

        Args:
            x: ``[N]``, the weights of several layers one after the other, ``N = sum(numels)``.
            numels: the segments' lengths.

        Returns:
            ``[N]``: segment ``i`` equals ``preprocess`` of segment ``i`` alone, to the bit.

        Example:
            >>> q, a, b = mq.quantizers.DoReFa(), torch.randn(6), torch.randn(4)
            >>> one_by_one = torch.cat([q.preprocess(a), q.preprocess(b)])
            >>> torch.equal(q.preprocess_segments(torch.cat([a, b]), [6, 4]), one_by_one)
            True
        """
        raise NotImplementedError(f"quantizer {self.name!r} does not process flat segments")

    def backward_terms_segments(self, x: Tensor, numels: Sequence[int]) -> tuple[Tensor, Tensor | None, Tensor]:
        """``backward_terms`` of each segment of a flat vector, all at once (only where ``segmentable``).

        Args:
            x: ``[N]``, the latent weights of several layers one after the other.
            numels: the segments' lengths.

        Returns:
            ``(relaxed, ste_scale, calibration)``, each ``[N]`` and equal segment by segment to
            ``backward_terms``; ``ste_scale`` is None where it is one.

        Example:
            >>> q, a, b = mq.quantizers.DoReFa(), torch.randn(6), torch.randn(4)
            >>> r, s, c = q.backward_terms_segments(torch.cat([a, b]), [6, 4])
            >>> torch.equal(r, torch.cat([q.relaxed(a), q.relaxed(b)])), s
            (True, None)
        """
        raise NotImplementedError(f"quantizer {self.name!r} does not process flat segments")

    def encode(self, w: Tensor) -> Encoded:
        """Integer codes and scales of ``Q(A(W))``: ``encode_preprocessed(preprocess(W))``, with
        ``decode(encode(W))`` equal to ``Q(A(W))``, bit for bit.

        Example:
            >>> q = mq.quantizers.UniformSymmetric(bits=3)
            >>> w = torch.randn(2, 5)
            >>> enc = q.encode(w)
            >>> enc.codes.dtype, torch.equal(q.decode(enc), q.quantize(q.preprocess(w)))
            (torch.int8, True)
        """
        return self.encode_preprocessed(self.preprocess(w))

    def encode_preprocessed(self, w_tilde: Tensor) -> Encoded:  # pragma: no cover - abstract
        """Integer codes and scales of ``Q(W̃)``, from the pre-processed weight; every subclass implements it."""
        raise NotImplementedError

    def decode(self, encoded: Encoded) -> Tensor:  # pragma: no cover - abstract
        """``Ŵ`` from its codes and scale(s): the one formula by which ``quantize`` produces ``Ŵ``.

        Args:
            encoded: codes and scale(s), as ``encode`` returns them.

        Returns:
            ``Ŵ`` in the scale's dtype, the codes' shape.

        Example:
            BWN's codes are 1 for ``+a`` and 0 for ``−a``:

            >>> codes = torch.tensor([1, 0, 1], dtype=torch.uint8)
            >>> mq.quantizers.BWN().decode(mq.quantizers.Encoded(codes, torch.tensor([0.5]))).tolist()
            [0.5, -0.5, 0.5]
        """
        raise NotImplementedError

    # --- conveniences -------------------------------------------------------------------------------------
    def __call__(self, w: Tensor) -> Tensor:
        """``Ŵ = Q(A(W))`` (value only): the weight a quantized layer computes with (Algorithm 1 step 3, Eq. 7).

        Same shape and dtype as the latent weight ``w``; for a gradient use ``metaquant.estimators.fake_quantize``.

        Example:
            >>> q = mq.quantizers.DoReFa()
            >>> w = torch.randn(2, 3)
            >>> torch.equal(q(w), q.quantize(q.preprocess(w))), sorted(q(w).unique().tolist())
            (True, [-1.0, 1.0])
        """
        return self.quantize(self.preprocess(w))

    @property
    def num_levels(self) -> int:
        """The largest number of distinct values ``Ŵ`` can take per scale group.

        Example:
            >>> mq.quantizers.DoReFa(bits=2).num_levels, mq.quantizers.Ternary(bits=2).num_levels
            (4, 3)
        """
        return 2**self.bits

    def with_channel_axis(self, axis: int) -> ForwardQuantizer:
        """This quantizer (same kind and bit width) for a weight whose output channels lie along ``axis``.

        A quantizer with one scale per layer does not depend on the axis and returns itself; the per-channel
        one (``BWNPerChannel``) returns a copy whose scales run along ``axis``. ``quantize_`` calls it for each
        layer: 0 for convolutions, linear, recurrent and embedding weights, 1 for transposed convolutions,
        whose weight is ``[C_in, C_out / groups, ...]``.

        Args:
            axis: the output-channel dimension of the weight, an ``int >= 0``.

        Raises:
            ValueError: ``axis`` is not an ``int >= 0``.

        Example:
            >>> mq.quantizers.DoReFa().with_channel_axis(1)
            DoReFa(bits=1)
            >>> mq.quantizers.BWNPerChannel().with_channel_axis(1)
            BWNPerChannel(bits=1, axis=1)
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
class DoReFa(ForwardQuantizer):
    """DoReFa-Net weights (Zhou et al. 2016), k = 1..8 bits.

    ``W̃ = tanh(W) / (2·max|tanh W|) + 1/2 ∈ [0, 1]``;  ``Ŵ = 2·round((2^k − 1)·W̃)/(2^k − 1) − 1 ∈ [−1, 1]``.
    ``c(W) = (1 − tanh²W) / max|tanh W|``, the max held constant: the derivative of ``2·W̃ − 1``. With it an
    identity meta quantizer gives exactly the STE gradient (docs/design.md §3).

    Args:
        bits: k, 1..8 (default 1: ``Ŵ ∈ {−1, +1}``).

    Example:
        ``Ŵ`` by hand from the two formulas above, for k = 2 (levels ``−1, −1/3, 1/3, 1``):

        >>> q = mq.quantizers.DoReFa(bits=2)
        >>> w = torch.tensor([-1.0, -0.2, 0.1, 0.5, 2.0])
        >>> t = torch.tanh(w)
        >>> n = torch.round(3 * (t / (2 * t.abs().max()) + 0.5))
        >>> torch.allclose(q(w), 2 * n / 3 - 1), q.encode(w).codes.tolist()
        (True, [0, 1, 2, 2, 3])
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
        return _one_if_zero(torch.stack(torch._foreach_norm(t.split(list(numels)), float("inf"))))

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


@dataclass(frozen=True)
class BWN(ForwardQuantizer):
    """Binary-weight networks (XNOR-Net, Rastegari et al. 2016): ``Ŵ = a·sign(W)``, ``a = mean|W|`` per layer.

    ``sign(0)`` is taken as +1 so that exactly two values occur. ``c(W) = 1`` as in the paper; the STE multiplies
    by ``a`` (``ste_scale``), so STE and an identity meta quantizer differ by the factor ``a`` and the gate.

    Args:
        bits: must be 1.

    Example:
        >>> q = mq.quantizers.BWN()
        >>> w = torch.tensor([[0.5, -1.5], [0.0, -0.2]])
        >>> torch.allclose(q(w), w.abs().mean() * torch.where(w >= 0, 1.0, -1.0))
        True
        >>> q.encode(w).codes.tolist(), [round(a, 4) for a in q.encode(w).scale.tolist()]
        ([[1, 0], [1, 0]], [0.55])
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


@dataclass(frozen=True)
class BWNPerChannel(BWN):
    """BWN with one scale per output channel: ``a_o = mean|W[o]|`` (the original code's "BWN-F").

    The output channels lie along ``axis`` of the weight: 0 (the default) for convolutions, linear, recurrent
    and embedding weights (for an embedding: one scale per embedding vector), 1 for transposed convolutions,
    whose weight is ``[C_in, C_out / groups, ...]`` (with ``groups > 1``, the output channels ``j``,
    ``j + C_out / groups``, ... share the scale of column ``j``). ``quantize_`` sets it per layer through
    ``with_channel_axis``. A 1-D weight gets one scale, as in ``BWN``; ``ste_scale`` is per channel as well.
    ``get_quantizer`` also accepts the names ``bwn-f`` and ``bwn_f``.

    Args:
        bits: must be 1.
        axis: the weight's output-channel dimension, an ``int >= 0`` (default 0).

    Raises:
        ValueError: ``axis`` is not an ``int >= 0``; quantizing a weight of 2 or more dimensions with ``axis``
            beyond its last one.

    Example:
        >>> q = mq.quantizers.BWNPerChannel()
        >>> w = torch.tensor([[0.5, -1.5], [0.0, -0.2]])
        >>> torch.allclose(q(w), w.abs().mean(dim=1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0))
        True
        >>> q.encode(torch.randn(8, 3, 3, 3)).scale.shape
        torch.Size([8, 1, 1, 1])
        >>> q.with_channel_axis(1).encode(torch.randn(8, 3, 3, 3)).scale.shape  # a ConvTranspose2d(8, 3, 3)
        torch.Size([1, 3, 1, 1])
    """

    name: ClassVar[str] = "bwn-channel"
    axis: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_axis(self.axis)

    def __repr__(self) -> str:
        axis = f", axis={self.axis}" if self.axis else ""  # the usual axis 0 is not shown
        return f"BWNPerChannel(bits={self.bits}{axis})"

    def with_channel_axis(self, axis: int) -> ForwardQuantizer:
        _check_axis(axis)
        return self if axis == self.axis else dataclasses.replace(self, axis=axis)

    def _scale(self, w: Tensor) -> Tensor:
        if w.dim() < 2:
            return w.abs().mean().reshape(1)
        if self.axis >= w.dim():
            raise ValueError(
                f"BWNPerChannel(axis={self.axis}) cannot quantize a weight of shape {tuple(w.shape)}: "
                f"its axes are 0..{w.dim() - 1}"
            )
        others = tuple(d for d in range(w.dim()) if d != self.axis)
        return w.abs().mean(dim=others, keepdim=True)


@dataclass(frozen=True)
class Ternary(ForwardQuantizer):
    """Ternary weights (TWN, Li et al. 2016): ``Ŵ = a·t``, ``t ∈ {−1, 0, +1}``, 2 bits.

    Threshold ``Δ = 0.7·mean|W|``; ``t = sign(W)·1{|W| > Δ}``; ``a`` = mean of ``|W|`` over ``|W| > Δ``
    (``a = 0`` for an all-zero weight). Codes are ``int8`` in ``{−1, 0, 1}``; ``c(W) = 1``.

    Args:
        bits: must be 2 (``get_quantizer("ternary")`` defaults to 1: pass ``bits=2``).

    Example:
        Here ``mean|W| = 0.49``, so ``Δ = 0.343``: two weights pass, with ``a = (0.9 + 1.1) / 2 = 1``:

        >>> q = mq.quantizers.Ternary(bits=2)
        >>> q(torch.tensor([0.1, -0.9, 1.1, 0.3, -0.05])).tolist()
        [0.0, -1.0, 1.0, 0.0, 0.0]
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

    ``s = max|W| / L`` per layer (``1 / L`` for an all-zero weight), so no weight is clipped and ``c(W) = 1``.
    Uses ``2L + 1 = 2^k − 1`` levels. Codes are ``int8`` in ``−L..L``.

    Args:
        bits: k, 2..8.

    Example:
        k = 3: ``L = 3``, ``s = 0.9 / 3 = 0.3``:

        >>> q = mq.quantizers.UniformSymmetric(bits=3)
        >>> w = torch.tensor([-0.9, -0.2, 0.05, 0.4, 0.6])
        >>> q.encode(w).codes.tolist(), q.num_levels
        ([-3, -1, 0, 1, 2], 7)
        >>> torch.allclose(q(w), 0.3 * torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]))
        True
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
        peak = _one_if_zero(torch.linalg.vector_norm(w_tilde, float("inf")))  # max|W̃|, without a channels-last copy
        # (a denormal peak divided by L may still underflow to 0)
        scale = (peak / half).clamp_min(torch.finfo(w_tilde.dtype).tiny).reshape(1)
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
    """Registered quantizer names, in registration order (the keys of ``QUANTIZERS``; aliases not included).

    Returns:
        A new list of the names ``get_quantizer`` and ``QuantConfig`` accept.

    Example:
        >>> mq.quantizers.quantizer_names()
        ['dorefa', 'bwn', 'bwn-channel', 'ternary', 'uniform']
    """
    return list(QUANTIZERS)


def get_quantizer(name: str, bits: int = 1) -> ForwardQuantizer:
    """Build a forward quantizer by name (``dorefa``, ``bwn``, ``bwn-channel``, ``ternary``, ``uniform``).

    Names are case-insensitive; the original code's spellings ``bwn-f``/``bwn_f`` (``bwn-channel``) and ``twn``
    (``ternary``) are accepted too.

    Args:
        name: a registered name or alias.
        bits: the bit width (default 1; ``ternary`` needs 2, ``uniform`` 2..8, ``dorefa`` 1..8).

    Returns:
        A new instance of the registered ``ForwardQuantizer`` subclass.

    Raises:
        ValueError: unknown name (the message lists the registered ones) or unsupported bit width.
        TypeError: ``bits`` is not an ``int``.

    Example:
        >>> mq.get_quantizer("DoReFa", bits=2), mq.get_quantizer("twn", bits=2)
        (DoReFa(bits=2), Ternary(bits=2))
        >>> mq.get_quantizer("sign")
        Traceback (most recent call last):
        ...
        ValueError: unknown quantizer 'sign'; allowed: dorefa, bwn, bwn-channel, ternary, uniform
    """
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[key](bits=bits)
