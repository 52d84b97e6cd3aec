"""Classical gradient estimators through the quantizer, and the fake-quantize operation that uses them.

The forward pass uses ``Ŵ = Q(A(W))``; ``Q`` is a step function, so back-propagation needs a made-up derivative.
A classical estimator is a fixed rule for the gradient w.r.t. the relaxed weight ``r = relaxed(W)`` (the path
``W → Ŵ`` with the rounding removed, see ``quantizers``), given ``g_Ŵ = ∂ℓ/∂Ŵ``:

* ``STE``      ``g_r = g_Ŵ ⊙ 1{|r| ≤ 1}``  clipped straight-through estimator, the paper's baseline (DESIGN §4);
* ``Identity`` ``g_r = g_Ŵ``                the unclipped straight-through estimator;
* ``EWGS``     ``g_r = g_Ŵ ⊙ (1 + δ·sign(g_Ŵ) ⊙ (r − Ŵ))``  element-wise gradient scaling (Lee et al., CVPR
  2021, Eq. 5): a latent weight is pushed harder toward the code it is moving away from.

The weight gradient is then ``g_W = g_r ⊙ ste_scale(W̃) ⊙ c(W)``: for DoReFa with ``STE`` exactly the classical
DoReFa STE gradient; for BWN the XNOR-Net rule ``a·g_Ŵ·1{|W| ≤ 1}``. Learned estimators (the meta quantizers)
live in ``metaquant.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .quantizers import ForwardQuantizer

__all__ = ["ClassicalEstimator", "STE", "Identity", "EWGS", "fake_quantize", "CLASSICAL_ESTIMATORS"]


@dataclass(frozen=True)
class ClassicalEstimator:
    """A fixed rule ``(g_Ŵ, r, Ŵ) -> g_r`` for the gradient through the quantizer's step."""

    name: ClassVar[str] = ""

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class STE(ClassicalEstimator):
    """Clipped straight-through estimator: pass the gradient where ``|r| ≤ 1``, zero elsewhere."""

    name: ClassVar[str] = "ste"

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat * (w_relaxed.abs() <= 1).to(grad_w_hat.dtype)


@dataclass(frozen=True)
class Identity(ClassicalEstimator):
    """Unclipped straight-through estimator: ``g_r = g_Ŵ``."""

    name: ClassVar[str] = "identity"

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat


@dataclass(frozen=True)
class EWGS(ClassicalEstimator):
    """Element-wise gradient scaling (Lee et al. 2021, Eq. 5) with scaling factor ``delta >= 0``.

    ``delta = 0`` is the unclipped STE. The paper tunes δ per layer from a Hessian estimate; a fixed δ (its
    reported range is about 1e-3 .. 1e-2) is the simple, common form.
    """

    delta: float = 1e-3
    name: ClassVar[str] = "ewgs"

    def __post_init__(self) -> None:
        if not (isinstance(self.delta, (int, float)) and self.delta >= 0):
            raise ValueError(f"EWGS delta must be a number >= 0, got {self.delta!r}")

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat * (1 + self.delta * torch.sign(grad_w_hat) * (w_relaxed - w_hat))


CLASSICAL_ESTIMATORS: dict[str, type[ClassicalEstimator]] = {cls.name: cls for cls in (STE, Identity, EWGS)}


class _FakeQuantize(torch.autograd.Function):
    """``Ŵ = Q(A(W))`` forward; ``g_W = estimator(g_Ŵ, r, Ŵ) ⊙ ste_scale(W̃) ⊙ c(W)`` backward."""

    @staticmethod
    def forward(ctx, w: Tensor, quantizer: ForwardQuantizer, estimator: ClassicalEstimator) -> Tensor:
        w_hat = quantizer(w)
        ctx.save_for_backward(w, w_hat)
        ctx.quantizer, ctx.estimator = quantizer, estimator
        return w_hat

    @staticmethod
    def backward(ctx, grad_w_hat: Tensor):
        w, w_hat = ctx.saved_tensors
        q: ForwardQuantizer = ctx.quantizer
        grad_relaxed = ctx.estimator(grad_w_hat, q.relaxed(w), w_hat)
        grad_w = grad_relaxed * q.ste_scale(q.preprocess(w)) * q.calibration(w)
        return grad_w, None, None


def fake_quantize(w: Tensor, quantizer: ForwardQuantizer, estimator: ClassicalEstimator = STE()) -> Tensor:
    """Quantized weight ``Ŵ = Q(A(W))`` whose gradient w.r.t. ``w`` follows ``estimator``.

    Args:
        w: latent weight, any shape.
        quantizer: the forward quantizer.
        estimator: the classical backward rule (clipped STE by default).

    Returns:
        ``Ŵ``, same shape and dtype as ``w``; exactly ``quantizer(w)`` in value.
    """
    return _FakeQuantize.apply(w, quantizer, estimator)
