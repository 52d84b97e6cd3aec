"""MetaQuant's training step: Algorithm 1 of the paper, in its order, for any model converted by ``quantize_``.

One call of ``MetaQuant.step(closure)`` is one iteration ``t``. With ``g_Ŵ^{t−1}`` and ``W̃^{t−1}`` recorded by
the previous iteration for every quantized layer (DESIGN §5; equation numbers of the paper):

1. ``g_W̃ = M_φ(g_Ŵ^{t−1}, W̃^{t−1})``; ``g_W = g_W̃ ⊙ c(W^{t−1})``                              (Eq. 4-5)
2. look-ahead ``W^t = W^{t−1} − α·π(g_W)``, a function of ``φ``; ``π`` from the optimizer's current state (Eq. 6)
3. forward with ``Ŵ^t = Q(A(W^t))``; loss ``ℓ^t``                                               (Eq. 7)
4. backward: ``∂ℓ^t/∂φ`` through step 2, the gradients of the parameters that are not quantized, and a
   record of ``g_Ŵ^t``, ``W̃^t`` for iteration ``t+1``                                           (Eq. 8)
5. ``φ`` takes a step of its own optimizer (Adam in the paper)
6. commit ``W ← W^t`` (the value used in step 3), advancing the optimizer's state with ``g_W``; the other
   parameters take an ordinary step.

At ``t = 0`` nothing is recorded yet: the forward pass uses ``Q(A(W))``, the backward pass records ``g_Ŵ^0``,
``W̃^0``; the quantized weights stay, the other parameters move.

``step_order="original"`` reproduces the order of the paper's original code instead (DESIGN §5.1): the forward
weight is the committed weight moved once more along the previous update direction ``G_{t−1}`` (with the
derivative of ``−α·g_W``), and the commit is ``W ← W − α·π(g_W)``. Everything else is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .estimators import STE, fake_quantize
from .distributed import all_reduce_mean_, any_process, is_distributed, unwrap
from .guards import BufferSnapshot, check_policy, first_nonfinite, reject_step
from .layers import QuantLayer, forward_params_fn, quantized_layers
from .meta import MetaQuantizer
from .refine import THROUGH, refinement_for, with_derivative
from .schedules import scale_lr

__all__ = ["MetaQuant", "STEP_ORDERS"]

logger = logging.getLogger(__name__)

STEP_ORDERS = ("paper", "original")
Closure = Callable[[], Tensor]


@dataclass
class _LayerRecord:
    """What iteration ``t`` leaves for iteration ``t+1``, per quantized layer (all detached)."""

    grad_w_hat: Tensor | None = None  # g_Ŵ^{t}, the weight's shape
    w_tilde: Tensor | None = None  # W̃^{t} = A(forward weight)
    meta_state: Any = None  # LSTMFC: (h, c), each [num_lstm, numel, hidden]
    # original order only: the direction of the last committed update of the weight and of the bias
    prev_direction: Tensor | None = None
    prev_bias_direction: Tensor | None = None


@dataclass
class _Pending:
    """Tensors of the iteration in progress."""

    grad_w_hat: dict[str, Tensor] = field(default_factory=dict)
    w_tilde: dict[str, Tensor] = field(default_factory=dict)


class MetaQuant:
    """Train a quantized model with a meta quantizer ``M_φ`` for the gradient through the quantizer.

    Each ``step(closure)`` is one iteration of Algorithm 1 (Eq. 4-8, see the module's description): the
    meta quantizer turns the previous iteration's ``g_Ŵ`` into ``g_W``, the loss is evaluated at the
    look-ahead weights, ``φ`` learns from it, and the look-ahead weights are committed through ``optimizer``.
    ``MetaQuant`` offers the interface of ``Trainer`` (``step``, ``set_epoch``, ``state_dict``,
    ``load_state_dict``), so ``fit`` runs either.

    Args:
        model: a model converted by ``quantize_``; its quantized weights must all be in ``optimizer``.
        optimizer: the base optimizer, ``torch.optim.SGD``, ``Adam`` or ``AdamW``; it performs every committed
            update, so its LR schedulers work as usual.
        meta: the meta quantizer (``FCGrad``, ``MultiFC``, ``LSTMFC``, ``IdentityMeta``), shared by all layers;
            it is moved to the device and dtype of the model's weights.
        meta_lr: learning rate ``γ`` of the meta quantizer's Adam. It follows the base optimizer's schedule:
            ``γ_t = meta_lr · lr_t / lr_0`` (the paper divides both by 10 every 30 epochs).
        meta_weight_decay: weight decay of the meta optimizer.
        step_order: ``"paper"`` (Algorithm 1, default) or ``"original"`` (the original code's order).
        through: how ``∂W^t/∂g_W`` is taken: ``"residual"`` (the paper: identity) or ``"exact"``
            (differentiate the optimizer's update rule, e.g. the whole Adam update).
        freeze_meta_epoch: from this epoch on (see ``set_epoch``), ``φ`` is frozen (the original ``--fix_meta``).
        meta_optimizer: ``params -> optimizer`` to replace the default ``Adam(meta_lr, meta_weight_decay)``.
        on_nonfinite: when the loss, a gradient or the meta quantizer's output is not finite: ``"raise"``
            ``NonFiniteError`` before anything is updated (default), or ``"skip"`` the step (the forward
            pass's BatchNorm statistics are restored, the records of the previous step kept).

    Raises:
        TypeError: ``meta`` is not a ``MetaQuantizer``.
        ValueError: unsupported optimizer or ``maximize=True`` (the message lists the supported optimizers),
            unknown ``step_order``, ``through`` or ``on_nonfinite``, ``meta_lr`` not > 0, negative
            ``meta_weight_decay``, ``freeze_meta_epoch`` not an integer >= 0, no quantized layer, a quantized
            weight the optimizer does not train or that is shared with another module, or a trainable bias of a
            quantized layer that the optimizer does not train.

    Example:
        >>> import torch, torch.nn.functional as F, metaquant as mq
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        >>> trainer = mq.MetaQuant(model, opt, meta=mq.MultiFC(hidden=8), meta_lr=1e-3)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> losses = [trainer.step(lambda: F.cross_entropy(model(x), y)) for _ in range(3)]
        >>> trainer.iteration, list(trainer.layers), type(trainer.meta_optimizer).__name__
        (3, ['1'], 'Adam')
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: MetaQuantizer,
        *,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 0.0,
        step_order: str = "paper",
        through: str = "residual",
        freeze_meta_epoch: int | None = None,
        meta_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        if not isinstance(meta, MetaQuantizer):
            raise TypeError(f"meta must be a MetaQuantizer (FCGrad, MultiFC, LSTMFC, IdentityMeta), got {meta!r}")
        if step_order not in STEP_ORDERS:
            raise ValueError(f"step_order {step_order!r} is not supported; allowed: {', '.join(STEP_ORDERS)}")
        if through not in THROUGH:
            raise ValueError(f"through {through!r} is not supported; allowed: {', '.join(THROUGH)}")
        # bool is an int subclass: True is refused, not read as 1.
        if not (isinstance(meta_lr, (int, float)) and not isinstance(meta_lr, bool) and meta_lr > 0):
            raise ValueError(f"meta_lr must be a number > 0, got {meta_lr!r}")
        if not (isinstance(meta_weight_decay, (int, float)) and not isinstance(meta_weight_decay, bool)
                and meta_weight_decay >= 0):
            raise ValueError(f"meta_weight_decay must be a number >= 0, got {meta_weight_decay!r}")
        if freeze_meta_epoch is not None and (not isinstance(freeze_meta_epoch, int)
                                              or isinstance(freeze_meta_epoch, bool) or freeze_meta_epoch < 0):
            raise ValueError(f"freeze_meta_epoch must be an integer >= 0 or None, got {freeze_meta_epoch!r}")
        check_policy(on_nonfinite)
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.model = model
        self.optimizer = optimizer
        # Under DistributedDataParallel the layers are those of the wrapped module (names without "module.").
        self.layers: dict[str, QuantLayer] = quantized_layers(unwrap(model))
        if not self.layers:
            raise ValueError("MetaQuant needs a model with quantized layers: call metaquant.quantize_(model) first")
        self._names = {id(layer): name for name, layer in self.layers.items()}
        # Group *indices*, not the group dicts: optimizer.load_state_dict replaces the dicts (on resume).
        self._group_index = self._param_group_index()
        self.step_order = step_order
        self._refine = refinement_for(optimizer)
        self._refine_for_meta = with_derivative(self._refine, through)
        self.through = through
        first = next(iter(self.layers.values())).weight
        self.meta = meta.to(device=first.device, dtype=first.dtype)
        meta_params = [p for p in self.meta.parameters() if p.requires_grad]
        make = meta_optimizer or (lambda ps: torch.optim.Adam(ps, lr=meta_lr, weight_decay=meta_weight_decay))
        self.meta_optimizer = make(meta_params) if meta_params else None
        if is_distributed():  # every process starts from rank 0's φ
            for p in self.meta.parameters():
                torch.distributed.broadcast(p.data, src=0)
        # The base rate the meta rate is tied to: the first group holding a quantized weight.
        base = self._group(first)
        self._base_lr0 = float(base.get("initial_lr", base["lr"]))
        self.freeze_meta_epoch = freeze_meta_epoch
        self.meta_frozen = False
        self.iteration = 0
        self._records: dict[str, _LayerRecord] = {name: _LayerRecord() for name in self.layers}

    # --- set-up helpers -----------------------------------------------------------------------------------
    def _param_group_index(self) -> dict[int, int]:
        index = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        uses: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        for name, layer in self.layers.items():
            if id(layer.weight) not in index or not layer.weight.requires_grad:
                raise ValueError(f"the quantized weight {name}.weight is not trained by the optimizer")
            if uses[id(layer.weight)] > 1:
                # Each use would need the same look-ahead W^t and the sum of the uses' g_W: not supported.
                raise ValueError(f"the quantized weight {name}.weight is shared with another module; MetaQuant "
                                 "needs every quantized weight to belong to one layer")
            if layer.bias is not None and layer.bias.requires_grad and id(layer.bias) not in index:
                raise ValueError(f"the bias {name}.bias of a quantized layer is not trained by the optimizer")
        return index

    def _group(self, p: Tensor) -> dict[str, Any]:
        return self.optimizer.param_groups[self._group_index[id(p)]]

    def _lr(self, p: Tensor) -> float:
        return self._group(p)["lr"]

    def _direction(self, grad: Tensor, p: Tensor) -> Tensor:
        """``π(grad)`` for parameter ``p``, its value only (what ``optimizer.step()`` will apply)."""
        return self._refine(grad, p, self.optimizer.state.get(p, {}), self._group(p))

    # --- public -------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Tell the trainer the current epoch (freezes ``φ`` from ``freeze_meta_epoch`` on).

        Args:
            epoch: the epoch about to start (0-based), as ``fit`` passes it. Once frozen, ``φ`` stays frozen.
        """
        if self.freeze_meta_epoch is not None and epoch >= self.freeze_meta_epoch and not self.meta_frozen:
            logger.info("meta quantizer frozen from epoch %d", epoch)
            self.meta_frozen = True

    def step(self, closure: Closure) -> Tensor:
        """One iteration of Algorithm 1. ``closure()`` runs the forward pass and returns the loss.

        At ``t >= 1``: ``g_W`` from the meta quantizer (Eq. 4-5), the look-ahead ``W^t`` (Eq. 6), the forward
        pass and loss at ``Q(A(W^t))`` (Eq. 7), ``∂ℓ/∂φ`` through the look-ahead (Eq. 8), a step of the meta
        optimizer, and the commit ``W ← W^t``. At ``t = 0`` the quantized weights stay and only ``g_Ŵ^0``,
        ``W̃^0`` are recorded. The meta optimizer's rate is first set to ``meta_lr · lr_t / lr_0``.

        Args:
            closure: runs the model's forward pass on a batch and returns the scalar loss; it is called once,
                and must use every quantized layer. It must not call ``backward``.

        Returns:
            The loss (detached). With ``on_nonfinite="skip"`` a step that produced a non-finite value returns
            its loss, updates nothing, leaves ``iteration`` as it was and counts itself in ``skipped_steps``.

        Raises:
            NonFiniteError: (``on_nonfinite="raise"``) the loss, a gradient, the meta quantizer's output or a
                gradient of ``φ`` is not finite; nothing was updated.
            RuntimeError: the loss does not depend on some quantized layer.

        Example:
            >>> import torch.nn.functional as F
            >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
            >>> trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), meta=mq.MultiFC(hidden=8))
            >>> x, y, w0 = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), model[1].weight.detach().clone()
            >>> _ = trainer.step(lambda: F.cross_entropy(model(x), y))  # t = 0: records g_Ŵ^0, W̃^0; W stays
            >>> torch.equal(model[1].weight, w0)
            True
            >>> _ = trainer.step(lambda: F.cross_entropy(model(x), y))  # t = 1: Eq. 4-8, W ← W^1
            >>> torch.equal(model[1].weight, w0), trainer.iteration
            (False, 2)
        """
        if self.meta_optimizer is not None:
            base = self._group(next(iter(self.layers.values())).weight)
            lr0 = float(base.get("initial_lr", self._base_lr0))
            scale_lr(self.meta_optimizer, float(base["lr"]) / lr0)
        snapshot = BufferSnapshot(self.model) if self.on_nonfinite == "skip" else None
        loss, bad = self._first_step(closure) if self.iteration == 0 else self._meta_step(closure)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.meta_optimizer is not None:
                self.meta_optimizer.zero_grad(set_to_none=True)
            self.skipped_steps = reject_step(bad, snapshot, self.skipped_steps)
            return loss
        self.iteration += 1
        return loss

    def _check(self, loss: Tensor, meta_outputs: list[Tensor]) -> str | None:
        """What, if anything, is non-finite after the backward pass (checked before any update)."""
        return first_nonfinite({
            "loss": [loss],
            "meta quantizer output": meta_outputs,
            "gradients": (p.grad for p in self.model.parameters()),
            "meta gradients": (p.grad for p in self.meta.parameters()),
        })

    # --- iteration 0 --------------------------------------------------------------------------------------
    def _first_step(self, closure: Closure) -> tuple[Tensor, str | None]:
        self.optimizer.zero_grad(set_to_none=True)
        pending = _Pending()
        loss = self._forward_backward(closure, pending, lambda layer: (layer.weight, layer.bias))
        bad = self._check(loss, [])
        if bad is not None:
            return loss, bad
        for name, layer in self.layers.items():
            if self.step_order == "original":
                # G_0 and B_0: the plain STE gradients of iteration 0 (DESIGN §5.1).
                self._records[name].prev_direction = layer.weight.grad.detach().clone()
                if layer.bias is not None and layer.bias.grad is not None:
                    self._records[name].prev_bias_direction = layer.bias.grad.detach().clone()
            layer.weight.grad = None  # quantized weights do not move at t = 0 (torch.optim skips grad None)
        if self.step_order == "paper":
            self.optimizer.step()  # the other parameters do
        self.optimizer.zero_grad(set_to_none=True)
        self._keep(pending, meta_states={})
        return loss, None

    # --- iterations t >= 1 --------------------------------------------------------------------------------
    def _meta_step(self, closure: Closure) -> tuple[Tensor, str | None]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.meta_optimizer is not None:
            self.meta_optimizer.zero_grad(set_to_none=True)
        learn_meta = self.meta_optimizer is not None and not self.meta_frozen

        grads_w: dict[str, Tensor] = {}
        forward_w: dict[str, Tensor] = {}
        forward_b: dict[str, Tensor | None] = {}
        meta_states: dict[str, Any] = {}
        with torch.set_grad_enabled(learn_meta):
            for name, layer in self.layers.items():
                w, record = layer.weight, self._records[name]
                # Step 1 (Eq. 4-5): g_W̃ from the meta quantizer, coordinate-wise on the flattened layer.
                grad_w_tilde, meta_states[name] = self.meta(
                    record.grad_w_hat.reshape(-1), record.w_tilde.reshape(-1), record.meta_state
                )
                grad_w = grad_w_tilde.reshape(w.shape) * layer.quantizer.calibration(w.detach())
                grads_w[name] = grad_w
                # Step 2 (Eq. 6): the weight used in the forward pass, a function of φ.
                if self.step_order == "paper":
                    state, group = self.optimizer.state.get(w, {}), self._group(w)
                    direction = self._refine_for_meta(grad_w, w, state, group)
                    # torch.add(..., alpha=-lr) rounds as torch.optim's add_ does, so the commit below is
                    # the optimizer's own value to the bit for plain SGD.
                    forward_w[name] = torch.add(w.detach(), direction, alpha=-self._lr(w))
                else:
                    # value W − α·G_{t−1}, derivative that of −α·g_W (DESIGN §5.1, step 2)
                    moved = grad_w + (record.prev_direction - grad_w).detach()
                    forward_w[name] = torch.add(w.detach(), moved, alpha=-self._lr(w))
        for name, layer in self.layers.items():
            bias = layer.bias
            if self.step_order == "original" and bias is not None and bias.requires_grad:
                # the original code also evaluates the bias one previous step ahead: b − α·B_{t−1}
                bias = bias - self._lr(bias) * self._records[name].prev_bias_direction
            forward_b[name] = bias

        def params(layer: QuantLayer) -> tuple[Tensor, Tensor | None]:
            name = self._names[id(layer)]
            return forward_w[name], forward_b[name]

        # Steps 3-4: forward with Q(A(W^t)), backward to φ and to the parameters that are not quantized.
        pending = _Pending()
        loss = self._forward_backward(closure, pending, params)
        bad = self._check(loss, list(grads_w.values()))
        if bad is not None:
            return loss, bad
        # Step 5: the meta quantizer's own update.
        if learn_meta:
            self.meta_optimizer.step()
        # Step 6: commit through the base optimizer, with g_W as the quantized weights' gradient.
        for name, layer in self.layers.items():
            layer.weight.grad = grads_w[name].detach()
            if self.step_order == "original":
                record = self._records[name]
                record.prev_direction = self._direction(layer.weight.grad, layer.weight).detach().clone()
                if layer.bias is not None and layer.bias.grad is not None:
                    record.prev_bias_direction = self._direction(layer.bias.grad, layer.bias).detach().clone()
        self.optimizer.step()
        if self.step_order == "paper":
            with torch.no_grad():
                for name, layer in self.layers.items():
                    # W ← W^t exactly: optimizer.step() computed the same value up to rounding.
                    layer.weight.copy_(forward_w[name])
        self.optimizer.zero_grad(set_to_none=True)
        self._keep(pending, meta_states)
        return loss, None

    # --- shared pieces --------------------------------------------------------------------------------------
    def _forward_backward(
        self, closure: Closure, pending: _Pending, params: Callable[[QuantLayer], tuple[Tensor, Tensor | None]]
    ) -> Tensor:
        """Run ``closure`` with each layer's forward weight and bias from ``params``; record ``g_Ŵ`` and ``W̃``."""

        def recorded(layer: QuantLayer) -> tuple[Tensor, Tensor | None]:
            name = self._names[id(layer)]
            weight, bias = params(layer)
            pending.w_tilde[name] = layer.quantizer.preprocess(weight.detach())
            if not weight.requires_grad:
                # φ frozen or parameter-free: still let autograd reach Ŵ, to record g_Ŵ for the next step.
                weight = weight.detach().requires_grad_()
            w_hat = fake_quantize(weight, layer.quantizer, STE())
            w_hat.register_hook(lambda g, name=name: self._accumulate(pending, name, g))
            return w_hat, bias

        with forward_params_fn(self.model, recorded):
            loss = closure()
        # every process takes the same branch under data parallelism (backward runs collectives)
        if any_process(not bool(torch.isfinite(loss))):
            return loss.detach() * float("nan")  # reported by the caller's check; nothing to back-propagate
        loss.backward()
        missing = [name for name in self.layers if name not in pending.grad_w_hat]
        if missing:
            raise RuntimeError(
                f"the loss does not depend on the quantized layers {missing[:5]}: every quantized layer must be "
                "used in the closure's forward pass"
            )
        # Data-parallel: average g_Ŵ (for the next meta step) and ∂ℓ/∂φ across processes, so that every process
        # computes the same g_W and the same update (DDP averages the other parameters' gradients).
        all_reduce_mean_(list(pending.grad_w_hat.values()) + [p.grad for p in self.meta.parameters()])
        return loss.detach()

    @staticmethod
    def _accumulate(pending: _Pending, name: str, grad: Tensor) -> None:
        # A layer used twice in one forward pass gets the sum of both gradients, as autograd would give W.
        prev = pending.grad_w_hat.get(name)
        pending.grad_w_hat[name] = grad.detach() if prev is None else prev + grad.detach()

    def _keep(self, pending: _Pending, meta_states: dict[str, Any]) -> None:
        for name, record in self._records.items():
            record.grad_w_hat = pending.grad_w_hat[name]
            record.w_tilde = pending.w_tilde[name]
            if name in meta_states:
                state = meta_states[name]
                # LSTMFC's state is carried to the next iteration but not differentiated through.
                record.meta_state = None if state is None else tuple(s.detach() for s in state)

    # --- persistence ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: φ, its optimizer, the records and LSTM states, ``t``.

        Returns:
            A dict (``iteration``, ``meta``, ``meta_optimizer``, ``meta_frozen``, ``step_order``, ``through``,
            ``skipped_steps``, ``records``) of tensors and plain values; the base optimizer's and the model's
            states are saved separately.
        """
        return {
            "iteration": self.iteration,
            "meta": self.meta.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer is not None else None,
            "meta_frozen": self.meta_frozen,
            "step_order": self.step_order,
            "through": self.through,
            "skipped_steps": self.skipped_steps,
            "records": {name: vars(record).copy() for name, record in self._records.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (on the model's device).

        Args:
            state: a dict returned by ``state_dict`` (possibly loaded from a checkpoint).

        Raises:
            ValueError: the state belongs to a model with other quantized layers, was saved with another
                ``step_order`` or ``through``, or disagrees on whether the meta quantizer has an optimizer.
        """
        if set(state["records"]) != set(self._records):
            raise ValueError(
                "MetaQuant state does not match this model's quantized layers: "
                f"{sorted(set(state['records']) ^ set(self._records))[:5]} differ"
            )
        for key in ("step_order", "through"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"MetaQuant state was saved with {key}={state[key]!r}, this trainer uses "
                                 f"{getattr(self, key)!r}")
        if (state["meta_optimizer"] is None) != (self.meta_optimizer is None):
            raise ValueError("MetaQuant state and this trainer disagree on whether the meta quantizer has an optimizer")
        self.skipped_steps = state.get("skipped_steps", 0)
        device = next(iter(self.layers.values())).weight.device
        self.meta.load_state_dict(state["meta"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_frozen = state["meta_frozen"]
        self.iteration = state["iteration"]

        def to_device(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                return tuple(to_device(v) for v in value)
            return value

        for name, saved in state["records"].items():
            self._records[name] = _LayerRecord(**{k: to_device(v) for k, v in saved.items()})
