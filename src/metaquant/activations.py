"""Activation quantizers: what a quantized layer applies to its input before its convolution or product.

Each is an ``nn.Module`` (``ActQuantizer``) whose gradient is a custom autograd Function (docs/design.md §9):

* ``SignActivation``: ``sign(x)`` with ``sign(0) = +1`` (NaN stays NaN); backward the clipped STE or ApproxSign
  (Bi-Real Net);
* ``LSQActivation``: LSQ (Esser et al., ICLR 2020), a learned step initialised from the first training batch;
* ``PACTActivation``: PACT (Choi et al., 2018), a learned clipping level ``α``.

They compute in float32 (float64 for float64 inputs) whatever autocast does, and return the input's dtype.
``ActQuantConfig`` chooses one for every quantized layer (``QuantConfig(activations=...)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import all_reduce_mean_
from .validation import check_choice, is_int

__all__ = [
    "STEP_FLOOR",
    "ActQuantizer",
    "SignActivation",
    "LSQActivation",
    "PACTActivation",
    "ACT_QUANTIZERS",
    "SIGN_BACKWARDS",
    "ActQuantConfig",
    "act_quantizer_names",
    "build_act_quantizer",
    "check_initialized",
]

#: The smallest LSQ step and PACT ``α`` a forward pass uses (``max(s, ε)``): a tiny first batch or an update past
#: zero leaves them finite and > 0, and their gradient still reaches the Parameter.
STEP_FLOOR = 1e-6
#: The backward rules of ``SignActivation``.
SIGN_BACKWARDS = ("ste", "approxsign")


class ActQuantizer(nn.Module):
    """Base class: an activation quantizer of ``bits`` bits, registered under ``name`` in ``ACT_QUANTIZERS``.

    A subclass implements ``quantize`` (float32 in, float32 out) and ``spec`` (its constructor's arguments).
    """

    name: ClassVar[str] = ""
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 1

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = _check_bits(self.name, bits, self.min_bits, self.max_bits)

    def forward(self, x: Tensor) -> Tensor:
        work = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 under autocast: computed in float32
        return self.quantize(x.to(work)).to(x.dtype)

    def quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """``{"kind": name, "bits": bits, ...}``: what ``build_act_quantizer`` rebuilds it from (no tensors)."""
        return {"kind": self.name, "bits": self.bits}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "kind")


def _check_bits(name: str, bits: Any, low: int, high: int) -> int:
    if not is_int(bits):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if not low <= bits <= high:
        allowed = f"{low}" if low == high else f"{low}..{high}"
        raise ValueError(f"activation quantizer {name!r} does not support bits={bits}; allowed: {allowed}")
    return int(bits)


# --- sign -----------------------------------------------------------------------------------------------
class _Sign(torch.autograd.Function):
    """``sign(x)`` (``+1`` at 0, NaN at NaN) forward; the clipped STE ``1{|x| ≤ 1}`` or ApproxSign ``max(2 − 2|x|, 0)``
    (``2 + 2x`` on ``[−1, 0)``, ``2 − 2x`` on ``[0, 1)``: the derivative of ``2x + x²`` / ``2x − x²``) backward."""

    @staticmethod
    def forward(x: Tensor, approx: bool) -> Tensor:
        return torch.where(x >= 0, 1.0, torch.where(x < 0, -1.0, x))  # NaN is neither: it stays NaN

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.approx = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        magnitude = x.abs()
        if ctx.approx:
            return grad * (2 - 2 * magnitude).clamp_min(0), None
        return grad * (magnitude <= 1).to(grad.dtype), None


class SignActivation(ActQuantizer):
    """Binary activations ``sign(x) ∈ {−1, +1}``, ``sign(0) = +1``; NaN stays NaN, ``±inf`` give ``±1``.

    Args:
        backward: ``"ste"`` (gradient 1 for ``|x| ≤ 1``, else 0) or ``"approxsign"`` (Bi-Real Net's
            ``2 − 2|x|`` for ``|x| < 1``, else 0).
    """

    name = "sign"

    def __init__(self, backward: str = "ste") -> None:
        super().__init__(1)
        self.backward = check_choice("backward", backward, SIGN_BACKWARDS)

    def quantize(self, x: Tensor) -> Tensor:
        return _Sign.apply(x, self.backward == "approxsign")

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "backward": self.backward}


# --- LSQ ------------------------------------------------------------------------------------------------
class _LSQ(torch.autograd.Function):
    """``v̂ = round(clip(v/s, −Q_N, Q_P))·s`` forward; backward (Esser et al., Eq. 3 and 5), with ``r = v/s``:
    ``∂v̂/∂v = 1{−Q_N < r < Q_P}``, ``∂v̂/∂s = round(r) − r`` inside, ``−Q_N`` for ``r ≤ −Q_N``, ``Q_P`` for
    ``r ≥ Q_P``; the step's gradient is scaled by ``g = 1/√(N·Q_P)``."""

    @staticmethod
    def forward(v: Tensor, step: Tensor, q_n: Tensor, q_p: Tensor, features: int) -> Tensor:
        s = step.clamp_min(STEP_FLOOR)
        return torch.clamp(v / s, -q_n, q_p).round() * s

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        v, step, q_n, q_p, features = inputs
        ctx.save_for_backward(v, step, q_n, q_p)
        ctx.features = features

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        v, step, q_n, q_p = ctx.saved_tensors
        r = v / step.clamp_min(STEP_FLOOR)
        below, above = r <= -q_n, r >= q_p
        inside = ~(below | above)
        d_step = torch.where(below, -q_n, torch.where(above, q_p, r.round() - r))
        # the floor passes the step's gradient on unchanged, so a step pushed below it can come back
        g = torch.rsqrt(q_p * ctx.features)
        grad_step = ((grad * d_step).sum() * g).reshape(step.shape).to(step.dtype)
        return grad * inside.to(grad.dtype), grad_step, None, None, None


class LSQActivation(ActQuantizer):
    """LSQ activations: ``v̂ = round(clip(v/s, −Q_N, Q_P))·s`` with a learned step ``s``.

    Unsigned ``[0, 2^b − 1]`` or signed ``[−2^(b−1), 2^(b−1) − 1]``. The first training-mode batch whose
    ``mean|v|`` (averaged over the processes of a ``torch.distributed`` group) is finite and > 0 sets ``s =
    max(2·mean|v|/√Q_P, STEP_FLOOR)`` and, with ``signed=None``, the sign mode (unsigned if every value is ≥ 0);
    the buffers ``initialized`` and ``signed`` keep both in the ``state_dict``. Before that the step is 1: an
    evaluation-mode forward pass warns (once), and the export refuses the quantizer (``check_initialized``).
    Dim 0 is the batch: the step's gradient scale takes ``N`` as the product of the other dims.

    Args:
        bits: 2..8.
        signed: the integer range, or None to decide it at the first batch.
    """

    name = "lsq"
    min_bits, max_bits = 2, 8
    initialized: Tensor
    signed: Tensor
    _warned = False  # class defaults: an instance pickled by an earlier version lacks them
    _ready_flag: Tensor | None = None

    def __init__(self, bits: int = 4, signed: bool | None = None) -> None:
        super().__init__(bits)
        if signed is not None and not isinstance(signed, bool):
            raise TypeError(f"signed must be True, False or None, got {signed!r}")
        self.signed_mode = signed
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        # ``initialized`` read once per change of the buffer (its identity and version counter), not at every
        # step: reading a GPU tensor waits for the device. Under torch.compile the Python value is used (a guard).
        self._ready, self._ready_version = False, -1

    def integer_range(self) -> tuple[Tensor, Tensor]:
        """``(Q_N, Q_P)`` as float32 scalars, from the ``signed`` buffer."""
        half = 2.0 ** (self.bits - 1)
        q_n = torch.where(self.signed, half, 0.0)
        q_p = torch.where(self.signed, half - 1, 2.0**self.bits - 1)
        return q_n.to(self.step.dtype), q_p.to(self.step.dtype)

    def quantize(self, x: Tensor) -> Tensor:
        if not self._is_initialized():
            if self.training:
                self._initialize(x)
            elif not self._warned and not torch.compiler.is_compiling():  # compiled: _ready may be stale
                self._warn_uninitialized()
        q_n, q_p = self.integer_range()
        features = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()  # N: features per example
        return _LSQ.apply(x, self.step.to(x.dtype), q_n.to(x.dtype), q_p.to(x.dtype), max(features, 1))

    def _is_initialized(self) -> bool:
        if torch.compiler.is_compiling():
            return self._ready
        # load_state_dict(assign=True) and .to() replace the buffer by a tensor whose version may be the same
        if self.initialized is not self._ready_flag or self.initialized._version != self._ready_version:
            self._remember()
        return self._ready

    def _remember(self) -> None:
        flag = self.initialized
        self._ready, self._ready_flag, self._ready_version = bool(flag), flag, flag._version

    @torch.compiler.disable
    def _initialize(self, x: Tensor) -> None:
        """The step (and sign mode) from a batch, its statistics averaged over the processes; none from a batch
        whose mean |x| is 0 or not finite (empty, all zero, NaN, inf): a later one sets them."""
        if bool(self.initialized):  # loaded from a state_dict since the cached value was read
            self._remember()
            return
        with torch.no_grad():
            v = x.detach().float()
            mean_abs = v.abs().mean() if v.numel() else v.new_tensor(math.nan)
            stats = torch.stack([mean_abs, (v < 0).any().float()])
            if dist.is_available() and dist.is_initialized():
                all_reduce_mean_([stats])  # every process takes part, and all decide alike
            if not bool(torch.isfinite(stats[0]) & (stats[0] > 0)):
                return
            if self.signed_mode is None:
                self.signed.fill_(bool(stats[1] > 0))
            _, q_p = self.integer_range()
            self.step.copy_((2 * stats[0] / q_p.sqrt()).clamp_min(STEP_FLOOR))
            self.initialized.fill_(True)
        self._remember()

    def _warn_uninitialized(self) -> None:
        self._warned = True
        warnings.warn(
            f"LSQActivation: evaluating with a step no training-mode batch has initialised (1, "
            f"{'signed' if bool(self.signed) else 'unsigned'} range): "
            "one training-mode forward pass on representative data initialises it (model.train(); model(batch))",
            UserWarning,
            stacklevel=2,
        )

    def integer_form(self) -> tuple[float, int, int]:
        """``(s, −Q_N, Q_P)`` with ``v̂ = clip(round(v/s), −Q_N, Q_P)·s`` (the ONNX export's form)."""
        q_n, q_p = self.integer_range()
        return float(self.step.detach().float().clamp_min(STEP_FLOOR)), -int(q_n), int(q_p)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "signed": self.signed_mode}


# --- PACT -----------------------------------------------------------------------------------------------
class _PACT(torch.autograd.Function):
    """``y = clip(x, 0, α)``, ``y_q = round(y·L/α)·α/L`` with ``L = 2^b − 1`` forward; backward
    ``∂y_q/∂x = 1{0 ≤ x < α}``, ``∂y_q/∂α = 1{x ≥ α}`` (Choi et al., Eq. 3)."""

    @staticmethod
    def forward(x: Tensor, alpha: Tensor, levels: int) -> Tensor:
        a = alpha.clamp_min(STEP_FLOOR)
        step = a / levels  # round(y·L/α)·α/L computed as round(y/s)·s, s = α/L: ONNX's QuantizeLinear form
        return torch.round(torch.minimum(x.clamp_min(0), a) / step) * step

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, alpha = ctx.saved_tensors
        a = alpha.clamp_min(STEP_FLOOR)  # as the step's floor: the gradient reaches α unchanged
        above = x >= a
        grad_alpha = (grad * above).sum().reshape(alpha.shape).to(alpha.dtype)
        return grad * ((x >= 0) & ~above).to(grad.dtype), grad_alpha, None


class PACTActivation(ActQuantizer):
    """PACT activations: ``round(clip(x, 0, α)·(2^b − 1)/α)·α/(2^b − 1)`` with a learned clipping level ``α``.

    Put the paper's L2 penalty on ``α`` through the optimizer (``weight_decay`` of its parameter group).

    Args:
        bits: 2..8.
        alpha: ``α``'s initial value; 10 as in the paper (its L2 penalty brings it down where activations are
            smaller).
    """

    name = "pact"
    min_bits, max_bits = 2, 8

    def __init__(self, bits: int = 4, alpha: float = 10.0) -> None:
        super().__init__(bits)
        if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def quantize(self, x: Tensor) -> Tensor:
        return _PACT.apply(x, self.alpha.to(x.dtype), 2**self.bits - 1)

    def integer_form(self) -> tuple[float, int, int]:
        """``(s, q_min, q_max)`` with ``y_q = clip(round(x/s), q_min, q_max)·s`` (the ONNX export's form)."""
        levels = 2**self.bits - 1
        return float(self.alpha.detach().float().clamp_min(STEP_FLOOR) / levels), 0, levels


#: Activation quantizers by name.
ACT_QUANTIZERS: dict[str, type[ActQuantizer]] = {
    "sign": SignActivation,
    "lsq": LSQActivation,
    "pact": PACTActivation,
}


def act_quantizer_names() -> list[str]:
    """The names ``ActQuantConfig.quantizer`` accepts, in registry order."""
    return list(ACT_QUANTIZERS)


def build_act_quantizer(spec: dict[str, Any]) -> ActQuantizer:
    """An activation quantizer from its ``spec()`` (``{"kind", "bits", ...}``), its tensors at their initial values.

    Raises:
        ValueError: unknown kind or options, or ``bits`` out of the kind's range.
        TypeError: ``bits`` is not an int.
    """
    options = dict(spec)
    kind = check_choice("activation quantizer", options.pop("kind", None), act_quantizer_names())
    cls = ACT_QUANTIZERS[kind]
    bits = _check_bits(kind, options.pop("bits", 1), cls.min_bits, cls.max_bits)
    try:
        return cls(**options) if cls is SignActivation else cls(bits, **options)
    except TypeError as err:
        raise ValueError(f"activation quantizer {kind!r}: unknown options in {spec!r} ({err})") from None


def check_initialized(quantizers: Mapping[str, ActQuantizer], what: str) -> None:
    """Refuse an ``LSQActivation`` among ``quantizers`` (``{layer name: quantizer}``) whose step no training-mode
    batch has initialised, for ``what`` (the function that asks, named in the message).

    Raises:
        ValueError: the message names the layer and how to initialise the step.
    """
    for name, quantizer in quantizers.items():
        if isinstance(quantizer, LSQActivation) and not quantizer._is_initialized():
            raise ValueError(
                f"{what}: the input quantizer of {name or '<root>'} (LSQActivation) was never initialised (its "
                "step is still 1): one training-mode forward pass on representative data initialises it "
                "(model.train(); model(batch)), as does loading a state_dict that holds it"
            )


@dataclass(frozen=True)
class ActQuantConfig:
    """How to quantize the inputs of the quantized layers (``QuantConfig(activations=...)``).

    Args:
        quantizer: ``"lsq"``, ``"pact"`` or ``"sign"`` (``act_quantizer_names()``).
        bits: 1 for ``"sign"``; 2..8 for ``"lsq"`` and ``"pact"``.
        backward: ``"ste"`` or ``"approxsign"``: the sign's gradient (``"sign"`` only).
        first_layer_bits: the first quantized layer's input (the network's input): LSQ at that width (2..8), or
            None to leave it in float.

    Raises:
        ValueError: an unknown name or a value out of range; the message names the field and what is allowed.
        TypeError: ``bits`` or ``first_layer_bits`` is not an int.

    Example:
        >>> cfg = mq.ActQuantConfig("lsq", bits=4)
        >>> cfg.build(), cfg.build_first()
        (LSQActivation(bits=4, signed=None), LSQActivation(bits=8, signed=None))
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)), mq.QuantConfig("dorefa", 1, activations=cfg))
        >>> net[0].input_quantizer  # the only layer is the first one
        LSQActivation(bits=8, signed=None)
        >>> mq.ActQuantConfig("sign", bits=4)
        Traceback (most recent call last):
        ...
        ValueError: ActQuantConfig.bits: activation quantizer 'sign' does not support bits=4; allowed: 1
    """

    quantizer: str = "lsq"
    bits: int = 4
    backward: str = "ste"
    first_layer_bits: int | None = 8

    def __post_init__(self) -> None:
        names = act_quantizer_names()
        if not isinstance(self.quantizer, str) or self.quantizer not in ACT_QUANTIZERS:
            raise ValueError(
                f"ActQuantConfig.quantizer {self.quantizer!r} is not supported; allowed: {', '.join(names)}"
            )
        cls = ACT_QUANTIZERS[self.quantizer]
        _field("bits", lambda: _check_bits(self.quantizer, self.bits, cls.min_bits, cls.max_bits))
        _field("backward", lambda: check_choice("backward", self.backward, SIGN_BACKWARDS))
        if self.backward != "ste" and self.quantizer != "sign":
            raise ValueError(
                f"ActQuantConfig.backward {self.backward!r} applies to quantizer 'sign' only; "
                f"quantizer {self.quantizer!r} takes backward='ste'"
            )
        if self.first_layer_bits is not None:
            low, high = LSQActivation.min_bits, LSQActivation.max_bits
            _field("first_layer_bits", lambda: _check_bits("lsq", self.first_layer_bits, low, high))

    def build(self) -> ActQuantizer:
        """A new quantizer for a layer's input."""
        if self.quantizer == "sign":
            return SignActivation(self.backward)
        return ACT_QUANTIZERS[self.quantizer](self.bits)

    def build_first(self) -> ActQuantizer | None:
        """A new quantizer for the first quantized layer's input (LSQ at ``first_layer_bits``), or None."""
        return None if self.first_layer_bits is None else LSQActivation(self.first_layer_bits)


def _field(name: str, check: Any) -> None:
    """Run ``check()``; its error names the field ``ActQuantConfig.<name>``."""
    try:
        check()
    except (TypeError, ValueError) as err:
        raise type(err)(f"ActQuantConfig.{name}: {err}") from None
