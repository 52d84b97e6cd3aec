"""MetaQuant's training step: Algorithm 1 of the paper, in its order, for any model converted by ``quantize_``.

One call of ``MetaQuant.step(closure)`` is one iteration ``t``. With ``g_Ŵ^{t−1}`` and ``W̃^{t−1}`` recorded by
the previous iteration for every quantized layer (docs/design.md §5; equation numbers of the paper):

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

``step_order="original"`` reproduces the order of the paper's original code instead (docs/design.md §5.1): the forward
weight is the committed weight moved once more along the previous update direction ``G_{t−1}`` (with the
derivative of ``−α·g_W``), and the commit is ``W ← W − α·π(g_W)``. Everything else is shared.

The step works on one flat vector of the coordinates of all quantized weights (``metaquant.slots``); what an
iteration leaves for the next, and how the trainer's state is saved, are in ``metaquant.records``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .direct_uses import warn_direct_uses, watched_weights
from .distributed import all_reduce_mean_, any_process, is_distributed, unwrap
from .estimators import fake_quantize_many
from .guards import (
    BufferSnapshot,
    check_loss,
    check_optimizer,
    check_policy,
    check_trainer_inputs,
    first_nonfinite,
    reject_step,
)
from .layers import QuantLayer, check_weight_hooks, forward_tensors, quantized_layers
from .layers.convert import check_optimizer_trains_quantizers
from .meta import LSTMFC, FCGrad, IdentityMeta, MetaQuantizer, MultiFC
from .records import Records, carry_state, check_state, meta_settings
from .refine import THROUGH, refinement_for, with_derivative
from .schedules import scale_lr
from .slots import (
    Plan,
    Slot,
    call_per_slot,
    check_slots,
    flat_calibration,
    flatten,
    make_plan,
    make_slots,
    param_groups_of,
    pieces_of,
    trained_weights,
    update_directions,
)
from .trainer import check_learning_rates, check_no_backward, closures_of, grad_marks
from .validation import check_choice, is_int, is_number

__all__ = ["MetaQuant", "STEP_ORDERS"]

logger = logging.getLogger(__name__)

STEP_ORDERS = ("paper", "original")
Closure = Callable[[], Tensor]
#: The meta quantizers known to work coordinate by coordinate: called once for all layers (docs/design.md §5.0).
#: Any other class, a subclass of these too, is called layer by layer.
_COORDINATEWISE = (IdentityMeta, FCGrad, MultiFC, LSTMFC)


class MetaQuant:
    """Train a quantized model with a meta quantizer ``M_φ`` for the gradient through the quantizer.

    Each ``step(closure)`` is one iteration of Algorithm 1 (Eq. 4-8, see the module's description): the
    meta quantizer turns the previous iteration's ``g_Ŵ`` into ``g_W``, the loss is evaluated at the
    look-ahead weights, ``φ`` learns from it, and the look-ahead weights are committed through ``optimizer``.
    ``MetaQuant`` offers the interface of ``Trainer`` (``step``, ``set_epoch``, ``state_dict``,
    ``load_state_dict``), so ``fit`` runs either.

    Args:
        model: a model converted by ``quantize_``; its quantized weights must all be in ``optimizer``.
        optimizer: the base optimizer, ``torch.optim.SGD``, ``Adam`` or ``AdamW``, or a wrapper holding one as
            ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); it
            performs every committed update, so its LR schedulers work as usual.
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
        grad_scaler: a ``torch.amp.GradScaler`` for float16 forward passes: the loss is scaled before the
            backward pass; ``g_Ŵ``, ``∂ℓ/∂φ`` and the other gradients are unscaled before anything uses them; a
            step whose scaled gradients overflowed is skipped (no update, records and BatchNorm statistics kept)
            while the scaler lowers its scale, which is not an error and not counted in ``skipped_steps`` but in
            ``overflow_steps`` (the number of such steps since the trainer was made).

    Raises:
        TypeError: ``meta`` is not a ``MetaQuantizer``, ``model`` not a module, ``optimizer`` not an optimizer,
            ``grad_scaler`` not a gradient scaler, ``meta_optimizer`` not callable; a quantized weight that a
            forward pre-hook recomputes (pruning, the older ``weight_norm``/``spectral_norm``).
        ValueError: unsupported optimizer or ``maximize=True`` (the message lists the supported optimizers),
            unknown ``step_order``, ``through`` or ``on_nonfinite``, ``meta_lr`` not a finite number > 0,
            ``meta_weight_decay`` not a finite number >= 0, ``freeze_meta_epoch`` not an integer >= 0, no
            quantized layer, a quantized weight the optimizer does not train or that is shared with another
            module, a trainable bias of a quantized layer or an input quantizer's Parameter that the optimizer
            does not train, a param group's ``lr`` (of ``optimizer`` or the meta optimizer) not a finite number >= 0.

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
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(meta, MetaQuantizer):
            raise TypeError(f"meta must be a MetaQuantizer (FCGrad, MultiFC, LSTMFC, IdentityMeta), got {meta!r}")
        check_choice("step_order", step_order, STEP_ORDERS)
        check_choice("through", through, THROUGH)
        if step_order == "original" and through != "residual":
            # The original order differentiates −α·g_W only (docs/design.md): there is no π to go through.
            raise ValueError(
                f"through={through!r} applies to step_order='paper' only; the original order "
                "differentiates the look-ahead as −α·g_W (use through='residual')"
            )
        if not (is_number(meta_lr) and meta_lr > 0):
            raise ValueError(f"meta_lr must be a finite number > 0, got {meta_lr!r}")
        if not (is_number(meta_weight_decay) and meta_weight_decay >= 0):
            raise ValueError(f"meta_weight_decay must be a finite number >= 0, got {meta_weight_decay!r}")
        if freeze_meta_epoch is not None and not (is_int(freeze_meta_epoch) and freeze_meta_epoch >= 0):
            raise ValueError(f"freeze_meta_epoch must be an integer >= 0 or None, got {freeze_meta_epoch!r}")
        check_policy(on_nonfinite)
        check_optimizer(optimizer)
        check_learning_rates(optimizer)
        check_trainer_inputs(model, grad_scaler, meta_optimizer=meta_optimizer)
        check_weight_hooks(model)
        check_optimizer_trains_quantizers(unwrap(model), optimizer)
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.overflow_steps = 0
        self.grad_scaler = grad_scaler
        self._scaler_recorded = False
        self.model = model
        self.optimizer = optimizer
        # Under DistributedDataParallel or torch.compile the layers are those of the wrapped module.
        self.layers: dict[str, QuantLayer] = quantized_layers(unwrap(model))
        if not self.layers:
            raise ValueError("MetaQuant needs a model with quantized layers: call metaquant.quantize_(model) first")
        self.step_order = step_order
        self._refine = refinement_for(optimizer)
        self._refine_for_meta = with_derivative(self._refine, through)
        self.through = through
        self._slots = self._make_slots()
        self._numels = [slot.numel for slot in self._slots]
        first = self._slots[0].weight
        self.meta = meta.to(device=first.device, dtype=first.dtype)
        meta_params = [p for p in self.meta.parameters() if p.requires_grad]
        make = meta_optimizer or (lambda ps: torch.optim.Adam(ps, lr=meta_lr, weight_decay=meta_weight_decay))
        self.meta_optimizer = make(meta_params) if meta_params else None
        if self.meta_optimizer is not None:
            check_learning_rates(self.meta_optimizer, "meta_optimizer")
        if is_distributed():  # every process starts from rank 0's φ
            for p in self.meta.parameters():
                torch.distributed.broadcast(p.data, src=0)
        # The base rate the meta rate is tied to: the group of the first quantized weight.
        base = self.optimizer.param_groups[self._slots[0].group]
        self._base_lr0 = float(base.get("initial_lr", base["lr"]))
        self.freeze_meta_epoch = freeze_meta_epoch
        self.meta_frozen = False
        self.iteration = 0
        self._records = Records()  # what iteration t leaves for t+1
        self._weight_names = watched_weights(unwrap(model))  # for the warning about a direct use of W
        self._uses_warned: set[str] = set()

    # --- set-up ---------------------------------------------------------------------------------------------
    def _make_slots(self) -> list[Slot]:
        """One slot per trained quantized weight; a frozen quantized layer keeps its weight."""
        group_of = param_groups_of(self.optimizer)
        weights, frozen = trained_weights(self.layers, group_of)
        if frozen:
            logger.info(
                "MetaQuant: %d frozen quantized layer(s) keep their weights: %s",
                len(frozen),
                ", ".join(frozen[:10]) + (" ..." if len(frozen) > 10 else ""),
            )
        return make_slots(weights, group_of, unwrap(self.model))

    # --- public -------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Tell the trainer the current epoch (freezes ``φ`` from ``freeze_meta_epoch`` on).

        Args:
            epoch: the epoch about to start (0-based), as ``fit`` passes it. Once frozen, ``φ`` stays frozen.
        """
        if self.freeze_meta_epoch is not None and epoch >= self.freeze_meta_epoch and not self.meta_frozen:
            logger.info("meta quantizer frozen from epoch %d", epoch)
            self.meta_frozen = True

    def step(
        self, closure: Closure | Sequence[Closure], *, before_update: Callable[[MetaQuant], None] | None = None
    ) -> Tensor:
        """One iteration of Algorithm 1. ``closure()`` runs the forward pass and returns the loss.

        At ``t >= 1``: ``g_W`` from the meta quantizer (Eq. 4-5), the look-ahead ``W^t`` (Eq. 6), the forward
        pass and loss at ``Q(A(W^t))`` (Eq. 7), ``∂ℓ/∂φ`` through the look-ahead (Eq. 8), a step of the meta
        optimizer, and the commit ``W ← W^t``. At ``t = 0`` the quantized weights stay and only ``g_Ŵ^0``,
        ``W̃^0`` are recorded. The meta optimizer's rate is first set to ``meta_lr · lr_t / lr_0``.

        Args:
            closure: runs the model's forward pass on a batch and returns the scalar loss; it is called once
                and must not call ``backward``. A quantized layer the loss does not use keeps its weight, records
                and LSTMFC state for the next step that uses it; the loss must use one at least. Or a list of
                closures, one per micro-batch (gradient accumulation): ``g_W`` and the look-ahead ``W^t`` are
                computed once, each micro-batch's loss, divided by their number, is back-propagated in turn (one
                micro-batch's activations in memory at a time), so ``g_Ŵ^t``, ``∂ℓ/∂φ`` and the other gradients
                are those of the mean loss: for equal micro-batches, mean-reduced losses and no BatchNorm in
                training mode (its batch statistics are per micro-batch), one step on their union.
            before_update: called as ``before_update(trainer)`` after the backward pass (gradients unscaled by
                ``grad_scaler`` and checked finite) and before any update, to read or change gradients in place
                (e.g. ``torch.nn.utils.clip_grad_norm_``). Then each quantized weight's ``.grad`` is ``g_W``
                (a copy: the meta quantizer's output, at ``t = 0`` None: those weights do not move), the other
                parameters' ``.grad`` theirs, the meta quantizer's parameters' ``.grad`` ``∂ℓ/∂φ``. What the hook
                can change: the meta step (it uses ``∂ℓ/∂φ`` as left), the other parameters' step, and the
                commit. It cannot change the forward pass, which was run at the look-ahead ``W^t = W − α·π(g_W)``
                with the unclipped ``g_W``. A quantized weight whose ``g_W`` the hook left unchanged commits
                ``W ← W^t`` as usual; one whose ``g_W`` it changed (or set to None) is committed by the optimizer
                with the new gradient, ``W − α·π(g_W')`` (None: it stays), and the records ``g_Ŵ^t``, ``W̃^t``
                for the next iteration are those of the forward pass. A loss that reads ``W`` directly (a
                penalty on it) adds that gradient to ``g_W`` in ``.grad`` likewise, with a warning
                (``metaquant.direct_uses``).

        Returns:
            The loss (detached; the mean over micro-batches). With ``on_nonfinite="skip"`` a step that produced
            a non-finite value returns its loss, updates nothing, leaves ``iteration`` as it was and counts
            itself in ``skipped_steps``.

        Raises:
            NonFiniteError: (``on_nonfinite="raise"``) the loss, a gradient, the meta quantizer's output or a
                gradient of ``φ`` is not finite; nothing was updated.
            RuntimeError: the loss depends on no quantized layer; a closure called ``backward`` itself; the
                model holds another quantized weight or learned step than at construction; the optimizer is an
                Accelerate optimizer inside ``accelerator.accumulate`` on a step that does not synchronize
                (MetaQuant accumulates itself: pass the micro-batches' closures as a list).
            TypeError: ``closure`` is not callable nor a non-empty list of callables; ``before_update`` not callable.
            ValueError: a param group's ``lr`` is not a finite number >= 0 (e.g. set by hand since the last step).

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
        closures = closures_of(closure)
        if before_update is not None:
            check_trainer_inputs(self.model, before_update=before_update)
        gradient_state = getattr(self.optimizer, "gradient_state", None)  # Accelerate's AcceleratedOptimizer
        if gradient_state is not None and not getattr(gradient_state, "sync_gradients", True):
            # Its step would be skipped, but the look-ahead commit and the meta step would not: refuse.
            raise RuntimeError(
                "MetaQuant.step was called inside accelerator.accumulate() on a step that does not synchronize "
                "gradients; MetaQuant accumulates by itself: call step([closure_1, ..., closure_k]) once per k "
                "micro-batches, outside accumulate() (gradient_accumulation_steps=1)"
            )
        check_slots(self._slots, unwrap(self.model), self.optimizer)
        check_learning_rates(self.optimizer)  # a rate set on a group since the last step
        if self.meta_optimizer is not None:
            base = self.optimizer.param_groups[self._slots[0].group]
            lr0 = float(base.get("initial_lr", self._base_lr0))
            # γ_t = γ·α_t/α_0; a base rate that starts at 0 has no schedule to follow: γ stays.
            scale_lr(self.meta_optimizer, float(base["lr"]) / lr0 if lr0 != 0 else 1.0)
            check_learning_rates(self.meta_optimizer, "meta_optimizer")
        scaler = self.grad_scaler
        # a skipped step (non-finite with "skip", or an fp16 overflow) undoes the forward pass's BatchNorm statistics
        snapshot = BufferSnapshot(self.model) if self.on_nonfinite == "skip" or scaler is not None else None
        if self.iteration == 0:
            loss, bad = self._first_step(closures, before_update)
        else:
            loss, bad = self._meta_step(closures, before_update)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.meta_optimizer is not None:
                self.meta_optimizer.zero_grad(set_to_none=True)
            if scaler is not None and bad in ("gradients", "meta gradients"):
                # The fp16 loss scale overflowed: skip the step, as scaler.step would, and lower the scale. (The
                # meta quantizer's output comes from the last step's unscaled records: the scale is not the cause.)
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                self.overflow_steps += 1
                assert snapshot is not None  # taken whenever there is a scaler
                snapshot.restore()
                return loss
            kept = snapshot if self.on_nonfinite == "skip" else None  # None: reject_step raises
            self.skipped_steps = reject_step(bad, kept, self.skipped_steps)
            return loss
        if scaler is not None:
            # update() reads the overflow checks unscale_ recorded; with no gradient to record, keep the scale.
            scaler.update() if self._scaler_recorded else scaler.update(scaler.get_scale())
        self.iteration += 1
        return loss

    def _check(self, loss: Tensor, meta_outputs: list[Tensor], grad_w_hat: list[Tensor | None]) -> str | None:
        """What, if anything, is non-finite after the backward pass (checked before any update)."""
        return first_nonfinite(
            {
                "loss": [loss],
                "meta quantizer output": meta_outputs,
                "gradients": [p.grad for p in self.model.parameters()] + grad_w_hat,
                "meta gradients": [p.grad for p in self.meta.parameters()],
            }
        )

    # --- iteration 0 --------------------------------------------------------------------------------------
    def _first_step(
        self, closure: list[Closure], hook: Callable[[MetaQuant], None] | None
    ) -> tuple[Tensor, str | None]:
        self.optimizer.zero_grad(set_to_none=True)
        # Q(A(W)) with the plain STE gradient reaching W (the original order keeps it as G_0).
        forward = fake_quantize_many([slot.weight for slot in self._slots], [slot.quantizer for slot in self._slots])
        loss, grads, used = self._forward_backward(closure, forward, self._biases())
        bad = self._check(loss, [], grads)
        if bad is not None:
            return loss, bad
        if self.step_order == "original":
            self._records.start_directions(self._slots)  # G_0, B_0 (docs/design.md, the original order)
        for slot in self._slots:
            slot.weight.grad = None  # quantized weights do not move at t = 0 (torch.optim skips grad None)
        if hook is not None:
            hook(self)
        if self.step_order == "paper":
            self.optimizer.step()  # the other parameters do
        self.optimizer.zero_grad(set_to_none=True)
        self._records.keep(self._slots, grads, [w_tilde for _, w_tilde in forward], used, None, self.meta)
        return loss, None

    # --- iterations t >= 1 --------------------------------------------------------------------------------
    def _meta_step(self, closure: list[Closure], hook: Callable[[MetaQuant], None] | None) -> tuple[Tensor, str | None]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.meta_optimizer is not None:
            self.meta_optimizer.zero_grad(set_to_none=True)
        learn_meta = self.meta_optimizer is not None and not self.meta_frozen
        slots = self._slots
        weights = flatten(slots, [slot.weight.detach() for slot in slots])  # W^{t−1}, [N]
        plan = make_plan(self.optimizer, slots)
        with torch.set_grad_enabled(learn_meta):
            grad_w, meta_state = self._meta_gradient(weights)  # step 1 (Eq. 4-5)
            look_ahead = self._look_ahead(grad_w, weights, plan)  # step 2 (Eq. 6), a function of φ
        # split, not a slice per slot: its backward is one concatenation, not a zero-filled [N] per slot
        forward_weights = [slot.unflat(w) for slot, w in zip(slots, look_ahead.split(self._numels))]
        forward = fake_quantize_many(
            [w if w.requires_grad else w.detach().requires_grad_() for w in forward_weights],
            [slot.quantizer for slot in slots],
        )
        # Steps 3-4: forward with Q(A(W^t)), backward to φ and to the parameters that are not quantized.
        loss, grads, used = self._forward_backward(closure, forward, self._biases())
        bad = self._check(loss, [grad_w], grads)
        if bad is not None:
            return loss, bad
        grad_w, changed = self._commit_gradients(grad_w.detach(), used, hook)
        if learn_meta:  # step 5: the meta quantizer's own update
            assert self.meta_optimizer is not None  # learn_meta implies it
            self.meta_optimizer.step()
        self._commit(grad_w, weights, forward_weights, used, changed, plan)  # step 6
        self._records.keep(slots, grads, [w_tilde for _, w_tilde in forward], used, meta_state, self.meta)
        return loss, None

    def _meta_gradient(self, weights: Tensor) -> tuple[Tensor, Any]:
        """Step 1 (Eq. 4-5): the flat ``g_W = M_φ(g_Ŵ^{t−1}, W̃^{t−1}) ⊙ c(W^{t−1})`` and the meta state it leaves,
        from the flat weights ``W^{t−1}``."""
        records = self._records
        calibration = flat_calibration(self._slots, weights)
        if type(self.meta) in _COORDINATEWISE:  # one call for the coordinates of every layer
            grad_w_tilde, meta_state = self.meta(records.grad_w_hat, records.w_tilde, records.meta_state)
        else:  # any other meta quantizer is called per layer, as its interface says, on the layer's own order
            assert records.grad_w_hat is not None and records.w_tilde is not None  # recorded at t = 0
            grad_w_tilde, meta_state = call_per_slot(
                self.meta, self._slots, records.grad_w_hat, records.w_tilde, records.meta_state
            )
        return grad_w_tilde * calibration, meta_state

    def _look_ahead(self, grad_w: Tensor, weights: Tensor, plan: Plan) -> Tensor:
        """Step 2 (Eq. 6): the flat weights of the forward pass, ``W^{t−1} − α·π(g_W)`` (see the original order)."""
        if self.step_order == "paper":
            directions = update_directions(grad_w, weights, self._refine_for_meta, plan)
        else:
            # value W − α·G_{t−1}, derivative that of −α·g_W (docs/design.md, the original order)
            assert self._records.prev_direction is not None  # recorded at t = 0
            moved = grad_w + (self._records.prev_direction - grad_w).detach()
            directions = pieces_of(moved, plan)
        # torch.add(..., alpha=-lr) rounds as torch.optim's add_ does, so the commit is the optimizer's own value
        # to the bit for plain SGD.
        pieces = [
            torch.add(w, d, alpha=-group["lr"])
            for w, d, (group, _, _) in zip(pieces_of(weights, plan), directions, plan)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _commit_gradients(
        self, grad_w: Tensor, used: list[bool], hook: Callable[[MetaQuant], None] | None
    ) -> tuple[Tensor, list[bool]]:
        """Give each quantized weight its commit gradient: ``g_W`` (None for a weight whose layers the loss did not
        use: it stays, with its records) plus the gradient of a direct use of ``W`` in the loss; then ``hook``.

        Returns the flat gradients the commit follows, and which weights leave the look-ahead ``W^t`` for the
        optimizer's own step with their gradient (a direct use's, or one the hook changed).
        """
        slots = self._slots
        direct = [slot.weight.grad for slot in slots]  # W itself is in the graph only through a direct use
        if any(d is not None for d in direct):
            self._say_direct_uses([slot for slot, d in zip(slots, direct) if d is not None])
        for slot, u, d in zip(slots, used, direct):
            g = slot.unflat(grad_w[slot.start : slot.stop]) if u else None
            if d is not None:
                g = d if g is None else g + d
            elif g is not None and hook is not None:
                g = g.clone()  # the hook may change .grad in place: g_W stays to compare with
            slot.weight.grad = g
        changed = [d is not None for d in direct]
        if hook is not None:
            hook(self)
            changed = [
                (slot.weight.grad is not None or u)
                and not (
                    u
                    and slot.weight.grad is not None
                    and torch.equal(slot.weight.grad, slot.unflat(grad_w[slot.start : slot.stop]))
                )
                for slot, u in zip(slots, used)
            ]
        if any(changed):  # the commit's direction is that of the gradients the weights hold now
            grad_w = flatten(
                slots,
                [
                    slot.weight.grad.detach() if slot.weight.grad is not None else torch.zeros_like(slot.weight)
                    for slot in slots
                ],
            )
        return grad_w, changed

    def _say_direct_uses(self, slots: list[Slot]) -> None:
        names = [self._weight_names.get(id(slot.weight), f"{slot.name}.weight") for slot in slots]
        warn_direct_uses(
            names,
            self._uses_warned,
            "MetaQuant adds that use's gradient to g_W when it commits the weight (which then takes the "
            "optimizer's step with that gradient, not the look-ahead W^t).",
        )

    def _commit(
        self,
        grad_w: Tensor,
        weights: Tensor,
        forward_weights: list[Tensor],
        used: list[bool],
        changed: list[bool],
        plan: Plan,
    ) -> None:
        """Step 6: the base optimizer's step; ``W ← W^t`` for every weight that keeps its look-ahead."""
        if self.step_order == "original":
            self._record_original_directions(grad_w, weights, used, plan)
        self.optimizer.step()
        if self.step_order == "paper":
            with torch.no_grad():
                # W ← W^t exactly: optimizer.step() computed the same value up to rounding. A weight whose
                # gradient changed keeps the optimizer's own value, the update with that gradient.
                moved = [
                    (slot.weight, w.detach())
                    for slot, w, u, c in zip(self._slots, forward_weights, used, changed)
                    if u and not c
                ]
                if moved:
                    torch._foreach_copy_([p for p, _ in moved], [w for _, w in moved])
        self.optimizer.zero_grad(set_to_none=True)

    def _record_original_directions(self, grad_w: Tensor, weights: Tensor, used: list[bool], plan: Plan) -> None:
        """G_t and B_t of the original order: the directions of the update about to be committed."""
        directions = update_directions(grad_w, weights, self._refine, plan)
        bias_directions = {
            name: self._refine(bias.grad, bias, self.optimizer.state.get(bias, {}), self._bias_group(bias))
            for slot in self._slots
            for name, bias in slot.biases()
            if bias is not None and bias.grad is not None
        }
        direction = directions[0] if len(directions) == 1 else torch.cat(directions)
        self._records.keep_directions(self._slots, direction, used, bias_directions)

    def _bias_group(self, bias: Tensor) -> dict[str, Any]:
        return next(g for g in self.optimizer.param_groups if any(p is bias for p in g["params"]))

    def _biases(self) -> dict[str, Tensor | None]:
        """The bias each layer's forward pass uses: its own; the original order moves it one step ahead."""
        biases: dict[str, Tensor | None] = {}
        for slot in self._slots:
            for name, bias in slot.biases():
                ahead = self._records.prev_bias_direction.get(name)
                if self.step_order == "original" and bias is not None and bias.requires_grad and ahead is not None:
                    # the original code also evaluates the bias one previous step ahead: b − α·B_{t−1}
                    lr = self._bias_group(bias)["lr"]
                    bias = bias - lr * ahead
                biases[name] = bias
        return biases

    # --- shared pieces --------------------------------------------------------------------------------------
    def _forward_backward(
        self, closures: list[Closure], forward: list[tuple[Tensor, Tensor]], biases: dict[str, Tensor | None]
    ) -> tuple[Tensor, list[Tensor | None], list[bool]]:
        """Run each closure with each slot's ``Ŵ`` and its layers' biases; back-propagate (accumulating).

        Returns the loss (detached), ``g_Ŵ`` per slot (None for a slot the loss did not use) and which slots were
        used (under data parallelism: by any process).
        """
        tensors: dict[QuantLayer, tuple[Tensor, Tensor | None]] = {}
        for slot, (w_hat, _) in zip(self._slots, forward):
            w_hat.retain_grad()  # g_Ŵ, recorded for the next step (a layer used twice gets the sum)
            for name, layer in slot.layers:
                tensors[layer] = (w_hat, biases[name])
        watched = [*self.model.parameters(), *self.meta.parameters(), *(w_hat for w_hat, _ in forward)]
        scaler = self.grad_scaler
        k = len(closures)
        total: Tensor | None = None
        for i, closure in enumerate(closures):
            marks = grad_marks(watched)
            with forward_tensors(tensors):
                loss = check_loss(closure())
            check_no_backward(marks, watched)
            # every process takes the same branch under data parallelism (backward runs collectives)
            if any_process(not bool(torch.isfinite(loss))):
                nothing: list[Tensor | None] = [None] * len(self._slots)
                return loss.detach() * float("nan"), nothing, [True] * len(self._slots)
            # k = 1 back-propagates the loss itself (gradients unchanged to the bit); micro-batches share the
            # graph of g_W and the look-ahead, kept until the last one's backward pass
            part = loss if k == 1 else loss / k
            (part if scaler is None else scaler.scale(part)).backward(retain_graph=i < k - 1)
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None  # closures is not empty, and every one was back-propagated
        loss = total if k == 1 else total / k
        if scaler is not None:
            self._scaler_recorded = any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"])
            scaler.unscale_(self.optimizer)
            if self.meta_optimizer is not None and any(p.grad is not None for p in self.meta.parameters()):
                scaler.unscale_(self.meta_optimizer)
                self._scaler_recorded = True
            inverse = 1.0 / scaler.get_scale()
            for w_hat, _ in forward:
                if w_hat.grad is not None:
                    w_hat.grad.mul_(inverse)
        grads = [w_hat.grad for w_hat, _ in forward]
        used = [g is not None for g in grads]
        if is_distributed():
            # A slot used by any process is used; averaging g_Ŵ counts the others' zeros, as DDP does.
            mask = torch.tensor([float(u) for u in used], device=forward[0][0].device)
            grads = [g if g is not None else torch.zeros_like(w_hat) for g, (w_hat, _) in zip(grads, forward)]
            all_reduce_mean_([mask, *grads, *(p.grad for p in self.meta.parameters())])
            used = [bool(m > 0) for m in mask]
            grads = [g if u else None for g, u in zip(grads, used)]
        if not any(used):
            raise RuntimeError(
                "the loss does not depend on any quantized layer: the closure must run the model's "
                "forward pass and return its loss"
            )
        return loss, grads, used

    # --- persistence ----------------------------------------------------------------------------------------
    def attach(self, module: nn.Module, name: str = "metaquant") -> None:
        """Carry this trainer's state in ``module.state_dict()``, so that a framework's checkpoint of the module
        (Lightning's, Accelerate's ``save_state``, a plain ``torch.save(module.state_dict())``) holds ``φ``, its
        optimizer, the records and ``t``, and ``module.load_state_dict`` restores them: a run resumed from it
        continues exactly (with the base optimizer's state, which the framework saves as usual).

        The entry ``<prefix><name>`` is ``state_dict()`` serialized into one uint8 tensor (a checkpoint stays
        tensors only, loadable with ``torch.load(weights_only=True)``). Nothing is added to ``module``'s
        parameters or children: an optimizer over ``module.parameters()`` and the module's forward pass are as
        before. Loading a state dict that lacks the entry counts it as a missing key (an error with
        ``strict=True``).

        Args:
            module: the module whose ``state_dict`` carries the trainer's state (the model, or a
                ``LightningModule`` holding it).
            name: the entry's key under the module's prefix; must not be a key of the module's own state.

        Raises:
            ValueError: ``name`` is empty, contains a ``"."``, or is already a key of ``module.state_dict()``.

        Example:
            >>> import torch.nn.functional as F
            >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
            >>> trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), meta=mq.MultiFC(hidden=8))
            >>> trainer.attach(model)
            >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
            >>> _ = trainer.step(lambda: F.cross_entropy(model(x), y))
            >>> state = model.state_dict()
            >>> fresh = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
            >>> again = mq.MetaQuant(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), meta=mq.MultiFC(hidden=8))
            >>> again.attach(fresh)
            >>> _ = fresh.load_state_dict(state)
            >>> same = all(torch.equal(a, b) for a, b in zip(again.meta.parameters(), trainer.meta.parameters()))
            >>> again.iteration, same
            (1, True)
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"attach needs a name without '.' for the state entry, got {name!r}")
        if name in module.state_dict():
            raise ValueError(f"attach: {name!r} is already a key of the module's state_dict; choose another name")

        carry_state(module, name, self.state_dict, self.load_state_dict, lambda: self._slots[0].weight.device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: φ, its optimizer, the records and LSTM states, ``t``.

        Returns:
            A dict (``iteration``, ``meta``, ``meta_optimizer``, ``meta_frozen``, ``step_order``, ``through``,
            ``meta_quantizer`` (its class name), ``init_scheme`` and ``nonlinearity`` (the meta quantizer's, None
            without one), ``base_lr0`` (the ``lr_0`` that ``γ_t`` is scaled by), ``skipped_steps``, ``records``)
            of tensors and plain values; ``records`` has one entry per trained quantized layer (``grad_w_hat``,
            ``w_tilde`` in the weight's shape, ``meta_state`` as ``[num_lstm, numel, hidden]`` pairs in the order
            of ``weight.reshape(-1)``, and the original order's ``prev_direction``, ``prev_bias_direction``); a
            layer tied to an earlier one holds only its bias direction. The base optimizer's and the model's
            states are saved separately.
        """
        return {
            "iteration": self.iteration,
            "meta": self.meta.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer is not None else None,
            "meta_frozen": self.meta_frozen,
            "step_order": self.step_order,
            "through": self.through,
            **meta_settings(self.meta),
            "base_lr0": self._base_lr0,
            "skipped_steps": self.skipped_steps,
            "records": self._records.per_layer(self._slots),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (on the model's device).

        Args:
            state: a dict returned by ``state_dict`` (possibly loaded from a checkpoint).

        Raises:
            ValueError: the state belongs to a model with other quantized layers or layers of other shapes, was
                saved with another ``step_order`` or ``through``, another kind of meta quantizer or one with
                another ``init_scheme`` or ``nonlinearity``, or disagrees on whether the meta quantizer has
                an optimizer. Nothing is changed then.
        """
        settings = {"step_order": self.step_order, "through": self.through}
        check_state(state, self._slots, settings, self.meta, self.meta_optimizer)
        records = Records.from_per_layer(self._slots, state["records"], self._slots[0].weight.device)
        self.meta.load_state_dict(state["meta"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.skipped_steps = state.get("skipped_steps", 0)
        if state.get("base_lr0") is not None:  # absent from states written before it was saved: keep this run's
            self._base_lr0 = float(state["base_lr0"])
        self.meta_frozen = state["meta_frozen"]
        self.iteration = state["iteration"]
        self._records = records
