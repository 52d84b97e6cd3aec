"""Classical gradient estimators through the quantizer, and the fake-quantize operation that uses them.

``Q`` is a step function, so back-propagation needs a made-up derivative. A classical estimator is a fixed rule
for the gradient w.r.t. the relaxed weight ``r = relaxed(W)``, given ``g_Ŵ = ∂ℓ/∂Ŵ``:

* ``STE``      ``g_r = g_Ŵ ⊙ 1{|r| ≤ 1}``  clipped straight-through estimator, the paper's baseline (docs/design.md §4);
* ``Identity`` ``g_r = g_Ŵ``                the unclipped straight-through estimator;
* ``EWGS``     ``g_r = g_Ŵ ⊙ (1 + δ·sign(g_Ŵ) ⊙ (r − Ŵ))``  element-wise gradient scaling (Lee et al., CVPR
  2021, Eq. 5).

Then ``g_W = g_r ⊙ ste_scale(W̃) ⊙ c(W)``: for DoReFa with ``STE`` the classical DoReFa STE, for BWN the XNOR-Net
rule ``a·g_Ŵ·1{|W| ≤ 1}``. The learned estimators (meta quantizers) are in ``metaquant.meta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from .layout import flatten_in_memory_order, memory_order, unflatten_like
from .quantizers import ForwardQuantizer
from .validation import is_number

__all__ = [
    "ClassicalEstimator",
    "STE",
    "Identity",
    "EWGS",
    "fake_quantize",
    "fake_quantize_preprocessed",
    "fake_quantize_many",
    "is_fake_quantize_node",
    "CLASSICAL_ESTIMATORS",
]


@dataclass(frozen=True)
class ClassicalEstimator:
    """A fixed rule ``(g_Ŵ, r, Ŵ) -> g_r`` for the gradient through the quantizer's step.

    Subclasses are frozen dataclasses with a ``name`` (the key in ``CLASSICAL_ESTIMATORS``) that implement
    ``__call__``; ``fake_quantize`` multiplies the result by ``ste_scale(W̃) ⊙ c(W)``.
    """

    name: ClassVar[str] = ""
    #: Whether the rule is element-wise (each coordinate's ``g_r`` depends on that coordinate alone): then
    #: ``fake_quantize_many`` applies it to the weights of all layers at once. Only a class that declares it has
    #: it (a subclass of ``STE`` may change the rule): the others are applied weight by weight.
    elementwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "elementwise" not in cls.__dict__:
            cls.elementwise = False

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:  # pragma: no cover
        """The gradient ``g_r`` w.r.t. the relaxed weight ``r``, from ``g_Ŵ``, ``r`` and ``Ŵ`` (all of one shape)."""
        raise NotImplementedError


@dataclass(frozen=True)
class STE(ClassicalEstimator):
    """Clipped straight-through estimator: pass the gradient where ``|r| ≤ 1``, zero elsewhere (docs/design.md §4).

    The paper's baseline and the layers' default. DoReFa's ``r`` lies in ``[−1, 1]``, so the gate is always open;
    with BWN it gives XNOR-Net's rule ``g_W = a·g_Ŵ·1{|W| ≤ 1}``.

    Example:
        BWN, where ``a = mean|W| = 1.25``:

        >>> w = torch.tensor([-3.0, -0.5, 0.25, 1.25], requires_grad=True)
        >>> mq.fake_quantize(w, mq.quantizers.BWN(), mq.STE()).sum().backward()
        >>> w.grad.tolist()
        [0.0, 1.25, 1.25, 0.0]
    """

    name: ClassVar[str] = "ste"
    elementwise: ClassVar[bool] = True

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat * (w_relaxed.abs() <= 1).to(grad_w_hat.dtype)


@dataclass(frozen=True)
class Identity(ClassicalEstimator):
    """Unclipped straight-through estimator: ``g_r = g_Ŵ`` (``STE`` wherever ``|r| ≤ 1``; ``EWGS(delta=0)``).

    Example:
        >>> w = torch.tensor([-3.0, -0.5, 0.25, 1.25], requires_grad=True)
        >>> mq.fake_quantize(w, mq.quantizers.BWN(), mq.Identity()).sum().backward()
        >>> w.grad.tolist()
        [1.25, 1.25, 1.25, 1.25]
    """

    name: ClassVar[str] = "identity"
    elementwise: ClassVar[bool] = True

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat


@dataclass(frozen=True)
class EWGS(ClassicalEstimator):
    """Element-wise gradient scaling (Lee et al. 2021, Eq. 5): ``g_r = g_Ŵ ⊙ (1 + δ·sign(g_Ŵ) ⊙ (r − Ŵ))``.

    A step toward ``r``'s code ``Ŵ`` is amplified, one away from it damped. The paper tunes δ per layer from a
    Hessian estimate; a fixed ``delta`` (its range is about 1e-3 .. 1e-2) is the common form; 0 is the unclipped STE.

    Raises:
        ValueError: ``delta`` is not a finite number ``>= 0``.

    Example:
        >>> g, r, w_hat = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0])
        >>> mq.EWGS(delta=0.5)(g, r, w_hat).tolist()
        [0.75, -2.5]
    """

    delta: float = 1e-3
    name: ClassVar[str] = "ewgs"
    elementwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (is_number(self.delta) and self.delta >= 0):
            raise ValueError(f"EWGS delta must be a finite number >= 0, got {self.delta!r}")

    def __call__(self, grad_w_hat: Tensor, w_relaxed: Tensor, w_hat: Tensor) -> Tensor:
        return grad_w_hat * (1 + self.delta * torch.sign(grad_w_hat) * (w_relaxed - w_hat))


CLASSICAL_ESTIMATORS: dict[str, type[ClassicalEstimator]] = {cls.name: cls for cls in (STE, Identity, EWGS)}


class _FakeQuantize(torch.autograd.Function):
    """``(Ŵ, W̃) = (Q(A(W)), A(W))`` forward; ``g_W = estimator(g_Ŵ, r, Ŵ) ⊙ ste_scale(W̃) ⊙ c(W)`` backward.

    Written in the ``setup_context`` form, so ``torch.func`` transforms (``vmap`` too: its rule is generated)
    and ``torch.compile`` see through it. ``W̃`` is returned (not differentiable) because MetaQuant records it:
    computing it once saves a second pass of the pre-processing.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(w: Tensor, quantizer: ForwardQuantizer, estimator: ClassicalEstimator) -> tuple[Tensor, Tensor]:
        w_tilde = quantizer.preprocess(w)
        if w_tilde is w:  # A is the identity (BWN, ternary, uniform): autograd cannot save an input returned as-is
            w_tilde = w.view_as(w)
        return quantizer.quantize(w_tilde), w_tilde

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        w, quantizer, estimator = inputs
        w_hat, w_tilde = output
        ctx.save_for_backward(w, w_hat, w_tilde)
        ctx.quantizer, ctx.estimator = quantizer, estimator
        ctx.mark_non_differentiable(w_tilde)

    @staticmethod
    def backward(ctx: Any, grad_w_hat: Tensor, _grad_w_tilde: Tensor | None) -> tuple[Tensor | None, None, None]:
        w, w_hat, w_tilde = ctx.saved_tensors
        relaxed, ste_scale, calibration = ctx.quantizer.backward_terms(w, w_tilde)
        grad_relaxed = ctx.estimator(grad_w_hat, relaxed, ctx.quantizer.relaxed_units(w_hat, w_tilde))
        return grad_relaxed * ste_scale * calibration, None, None


def fake_quantize_preprocessed(
    w: Tensor, quantizer: ForwardQuantizer, estimator: ClassicalEstimator | None = None
) -> tuple[Tensor, Tensor]:
    """``fake_quantize`` that also returns the pre-processed weight ``W̃ = A(W)`` it computed, detached: ``(Ŵ, W̃)``."""
    w_hat, w_tilde = _FakeQuantize.apply(w, quantizer, estimator if estimator is not None else STE())
    return quantizer.learned_gradient(w_hat, w), w_tilde


def fake_quantize(w: Tensor, quantizer: ForwardQuantizer, estimator: ClassicalEstimator = STE()) -> Tensor:
    """Quantized weight ``Ŵ = Q(A(W))`` (exactly ``quantizer(w)``) whose gradient follows ``estimator``.

    Backward: ``g_W = estimator(g_Ŵ, relaxed(W), Ŵ) ⊙ ste_scale(W̃) ⊙ c(W)``, a classical estimator in place of the
    meta quantizer's ``g_W = M_φ(g_Ŵ, W̃) ⊙ c(W)`` (Eq. 4-5); a quantizer's learned tensors (``LSQ``'s step) get
    their own gradient (``learned_gradient``). What the quantized layers compute with by default.

    Example:
        With DoReFa the STE gradient is ``g_Ŵ ⊙ c(W)``:

        >>> q, w = mq.quantizers.DoReFa(), torch.randn(3, 4, requires_grad=True)
        >>> mq.fake_quantize(w, q).sum().backward()
        >>> torch.equal(mq.fake_quantize(w, q), q(w)), torch.allclose(w.grad, q.calibration(w))
        (True, True)
    """
    return fake_quantize_preprocessed(w, quantizer, estimator)[0]


class _FakeQuantizeSegments(torch.autograd.Function):
    """``_FakeQuantize`` of several weights that share a quantizer and an element-wise estimator, at once.

    The weights lie end to end in one flat vector (each in its memory order, so the outputs keep their layouts);
    the per-weight statistic comes from ``quantizer.preprocess_segments``. Values equal ``_FakeQuantize``'s weight
    by weight, to the bit. Outputs ``(Ŵ_1..Ŵ_n, W̃_1..W̃_n)``; a ``Ŵ`` the loss did not use gives its weight no
    gradient (None, as autograd would).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(quantizer: ForwardQuantizer, estimator: ClassicalEstimator, *ws: Tensor) -> tuple[Tensor, ...]:
        orders = [memory_order(w) for w in ws]
        numels = [w.numel() for w in ws]
        x = torch.cat([flatten_in_memory_order(w, o) for w, o in zip(ws, orders)])  # [N]
        w_tilde = quantizer.preprocess_segments(x, numels)
        w_hat = quantizer.quantize(w_tilde)  # element-wise
        return (*_unflatten(w_hat, ws, orders), *_unflatten(w_tilde, ws, orders))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        quantizer, estimator, *ws = inputs
        n = len(ws)
        ctx.save_for_backward(*ws, *output[:n])
        ctx.quantizer, ctx.estimator, ctx.n = quantizer, estimator, n
        ctx.mark_non_differentiable(*output[n:])
        ctx.set_materialize_grads(False)  # an unused Ŵ arrives as None

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        n = ctx.n
        ws, w_hats = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        grad_w_hats = grads[:n]
        live = [g is not None and ctx.needs_input_grad[2 + i] for i, g in enumerate(grad_w_hats)]
        if not any(live):
            return (None, None, *([None] * n))
        orders = [memory_order(w) for w in ws]
        numels = [w.numel() for w in ws]

        def flat(tensors: Sequence[Tensor | None]) -> Tensor:
            return torch.cat(
                [
                    flatten_in_memory_order(t, o) if t is not None else w.new_zeros(w.numel())
                    for t, w, o in zip(tensors, ws, orders)
                ]
            )

        relaxed, ste_scale, calibration = ctx.quantizer.backward_terms_segments(flat(ws), numels)
        grad_relaxed = ctx.estimator(flat(grad_w_hats), relaxed, flat(w_hats))  # segmentable: Ŵ in r's units
        # the order of _FakeQuantize's backward; a missing ste_scale is one, and x·1 is x exactly
        grad_w = grad_relaxed * calibration if ste_scale is None else grad_relaxed * ste_scale * calibration
        pieces = _unflatten(grad_w, ws, orders)
        return (None, None, *(piece if keep else None for piece, keep in zip(pieces, live)))


def is_fake_quantize_node(node: object) -> bool:
    """Whether ``node`` (an autograd graph node) is the backward pass of ``fake_quantize`` or its kin: the
    nodes through which a quantized layer's latent weight enters the loss as ``Ŵ``."""
    return isinstance(node, (_FakeQuantize._backward_cls, _FakeQuantizeSegments._backward_cls))


def _unflatten(flat: Tensor, like: Sequence[Tensor], orders: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """``flat`` (``[N]``, the tensors of ``like`` end to end) as views in their shapes and memory orders."""
    return [
        unflatten_like(piece, w.shape, o) for piece, w, o in zip(flat.split([w.numel() for w in like]), like, orders)
    ]


def fake_quantize_many(
    weights: Sequence[Tensor],
    quantizers: Sequence[ForwardQuantizer],
    estimator: ClassicalEstimator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``fake_quantize_preprocessed`` of many weights, each with its quantizer, in as few passes as possible.

    With an element-wise estimator, weights that share a ``segmentable`` quantizer (and device and dtype) are
    quantized as one flat vector: on a GPU, where a small layer's quantizer costs more to launch than to run, this
    is most of the difference between a quantized step and a full-precision one. Values and gradients equal
    ``fake_quantize_preprocessed``'s weight by weight, to the bit; ``Ŵ`` keeps each weight's layout.

    Raises:
        ValueError: ``weights`` and ``quantizers`` differ in length.
    """
    if len(weights) != len(quantizers):
        raise ValueError(f"{len(weights)} weight(s) but {len(quantizers)} quantizer(s)")
    estimator = STE() if estimator is None else estimator
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(weights)
    groups: dict[tuple[ForwardQuantizer, torch.device, torch.dtype], list[int]] = {}
    for i, (w, q) in enumerate(zip(weights, quantizers)):
        if q.segmentable and estimator.elementwise:
            groups.setdefault((q, w.device, w.dtype), []).append(i)
        else:
            out[i] = fake_quantize_preprocessed(w, q, estimator)
    for (q, _, _), members in groups.items():
        if len(members) == 1:
            out[members[0]] = fake_quantize_preprocessed(weights[members[0]], q, estimator)
            continue
        results = _FakeQuantizeSegments.apply(q, estimator, *(weights[i] for i in members))
        for k, i in enumerate(members):
            out[i] = (results[k], results[len(members) + k])
    return cast("list[tuple[Tensor, Tensor]]", out)
