"""What MetaQuant carries from one iteration to the next, and how a trainer's state is checkpointed.

Iteration ``t`` leaves ``g_Ŵ^t``, ``W̃^t`` and LSTMFC's state for ``t+1`` (the original order also the directions
of its update), flat in slot order (``slots``): the ``Records``. A checkpoint holds them per layer, in the
weight's shape and the order of ``weight.reshape(-1)``, so that it does not depend on memory layouts.
``check_state`` refuses a state of other layers or one saved under settings that change what the steps compute;
``carry_state`` puts a trainer's state in a module's ``state_dict`` (``MetaQuant.attach``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .meta import MetaQuantizer
from .slots import Slot, flatten

__all__ = ["Records", "meta_settings", "check_state", "carry_state"]


@dataclass
class Records:
    """What iteration ``t`` leaves for ``t+1``, all detached, flat ``[N]`` in slot order: ``g_Ŵ^t``, ``W̃^t``,
    LSTMFC's ``(h, c)`` each ``[num_lstm, N, hidden]``; for the original order also ``G_t``, the last committed
    update direction, and ``B_t``, each layer's bias direction (by layer name)."""

    grad_w_hat: Tensor | None = None
    w_tilde: Tensor | None = None
    meta_state: Any = None
    prev_direction: Tensor | None = None
    prev_bias_direction: dict[str, Tensor] = field(default_factory=dict)

    def keep(
        self,
        slots: list[Slot],
        grads: list[Tensor | None],
        w_tildes: list[Tensor],
        used: list[bool],
        meta_state: Any,
        meta: MetaQuantizer,
    ) -> None:
        """Record ``g_Ŵ^t``, ``W̃^t`` and the meta state for iteration ``t+1``; an unused slot keeps its records."""
        old_g, old_w = self.grad_w_hat, self.w_tilde
        self.grad_w_hat = flatten(
            slots,
            [
                g
                if g is not None
                else (torch.zeros_like(slot.weight) if old_g is None else slot.unflat(old_g[slot.start : slot.stop]))
                for slot, g in zip(slots, grads)
            ],
        ).detach()
        self.w_tilde = flatten(
            slots,
            [
                w if u or old_w is None else slot.unflat(old_w[slot.start : slot.stop])
                for slot, w, u in zip(slots, w_tildes, used)
            ],
        ).detach()
        if meta_state is None:
            return
        # LSTMFC's state is carried to the next iteration but not differentiated through.
        new = tuple(s.detach() for s in meta_state)
        first = slots[0].weight
        # an unused slot keeps its state: before its first use, the initial one
        kept = self.meta_state
        if kept is None and not all(used):
            kept = meta.initial_state(sum(slot.numel for slot in slots), first.device, first.dtype)
        if not all(used) and kept is not None:
            new = tuple(s.clone() for s in new)
            for slot, is_used in zip(slots, used):
                if not is_used:
                    for s, old in zip(new, kept):
                        s[:, slot.start : slot.stop] = old[:, slot.start : slot.stop]
        self.meta_state = new

    def start_directions(self, slots: list[Slot]) -> None:
        """Record ``G_0`` and ``B_0`` of the original order: the plain STE gradients of iteration 0."""
        self.prev_direction = flatten(
            slots,
            [slot.weight.grad if slot.weight.grad is not None else torch.zeros_like(slot.weight) for slot in slots],
        ).detach()
        self.prev_bias_direction = {
            name: bias.grad.detach().clone()
            for slot in slots
            for name, bias in slot.biases()
            if bias is not None and bias.grad is not None
        }

    def keep_directions(
        self, slots: list[Slot], direction: Tensor, used: list[bool], bias_directions: dict[str, Tensor]
    ) -> None:
        """Record ``G_t`` and ``B_t`` of the original order, the directions of the update about to be committed;
        an unused slot keeps its direction."""
        flat = direction.detach().clone()
        if not all(used):
            for slot, is_used in zip(slots, used):
                if not is_used:
                    assert self.prev_direction is not None  # recorded at t = 0
                    flat[slot.start : slot.stop] = self.prev_direction[slot.start : slot.stop]
        self.prev_direction = flat
        self.prev_bias_direction.update({name: d.detach().clone() for name, d in bias_directions.items()})

    def per_layer(self, slots: list[Slot]) -> dict[str, dict[str, Any]]:
        """The records as ``MetaQuant.state_dict`` saves them: one entry per trained quantized layer; a layer tied
        to an earlier one holds only its bias direction."""
        records: dict[str, dict[str, Any]] = {}
        for slot in slots:
            for i, (name, _) in enumerate(slot.layers):
                record: dict[str, Any] = dict.fromkeys(
                    ("grad_w_hat", "w_tilde", "meta_state", "prev_direction", "prev_bias_direction")
                )
                if i == 0:
                    a, b = slot.start, slot.stop
                    for key, flat in (
                        ("grad_w_hat", self.grad_w_hat),
                        ("w_tilde", self.w_tilde),
                        ("prev_direction", self.prev_direction),
                    ):
                        if flat is not None:
                            record[key] = slot.unflat(flat[a:b]).clone()
                    if self.meta_state is not None:
                        record["meta_state"] = tuple(slot.state_to_logical(s[:, a:b]).clone() for s in self.meta_state)
                if name in self.prev_bias_direction:
                    record["prev_bias_direction"] = self.prev_bias_direction[name].clone()
                records[name] = record
        return records

    @classmethod
    def from_per_layer(cls, slots: list[Slot], records: dict[str, Any], device: torch.device) -> Records:
        """The records ``per_layer`` saved, on ``device``.

        Raises:
            ValueError: a record's shape is not its layer's, or a record is kept for some layers only.
        """
        for slot in slots:
            record = records[slot.name]
            for key in ("grad_w_hat", "w_tilde", "prev_direction"):
                value = record.get(key)
                if value is not None and tuple(value.shape) != tuple(slot.weight.shape):
                    raise ValueError(
                        f"MetaQuant state for {slot.name}: {key} has shape {tuple(value.shape)}, the "
                        f"layer's weight {tuple(slot.weight.shape)}"
                    )
            meta_state = record.get("meta_state")
            if meta_state is not None and any(s.shape[1] != slot.numel for s in meta_state):
                raise ValueError(
                    f"MetaQuant state for {slot.name}: the meta quantizer's state is for "
                    f"{meta_state[0].shape[1]} weights, the layer has {slot.numel}"
                )

        def gather(key: str) -> Tensor | None:
            values = [records[slot.name].get(key) for slot in slots]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"MetaQuant state: {key} is recorded for some layers only")
            return flatten(slots, [v.to(device) for v in values])

        grad_w_hat, w_tilde, prev_direction = gather("grad_w_hat"), gather("w_tilde"), gather("prev_direction")
        meta_states = [records[slot.name].get("meta_state") for slot in slots]
        meta_state = None
        if any(s is not None for s in meta_states):
            if any(s is None for s in meta_states):
                raise ValueError("MetaQuant state: the meta quantizer's state is recorded for some layers only")
            meta_state = tuple(
                torch.cat([slot.state_from_logical(s[i].to(device)) for slot, s in zip(slots, meta_states)], 1)
                for i in range(2)
            )
        bias_directions = {
            name: record["prev_bias_direction"].to(device)
            for name, record in records.items()
            if record.get("prev_bias_direction") is not None
        }
        return cls(grad_w_hat, w_tilde, meta_state, prev_direction, bias_directions)


#: What a MetaQuant state saved before the meta quantizer's settings were recorded was made with.
STATE_ABSENT_MEANS = {"init_scheme": "paper"}


def meta_settings(meta: MetaQuantizer) -> dict[str, str | None]:
    """What defines the meta quantizer's function beside ``φ``: its class, ``init_scheme`` and ``nonlinearity``
    (None for an attribute it does not have)."""
    net = getattr(meta, "net", None)  # FCGrad's and MultiFC's CoordinateMLP holds their nonlinearity
    nonlinearity = getattr(meta, "nonlinearity", getattr(net, "nonlinearity", None))
    scheme = getattr(meta, "init_scheme", None)
    return {
        "meta_quantizer": type(meta).__name__,
        "init_scheme": scheme if isinstance(scheme, str) else None,
        "nonlinearity": nonlinearity if isinstance(nonlinearity, str) else None,
    }


def check_state(
    state: Any,
    slots: list[Slot],
    settings: dict[str, str],
    meta: MetaQuantizer,
    meta_optimizer: torch.optim.Optimizer | None,
) -> None:
    """Refuse a state that is not a MetaQuant state, is for other quantized layers than ``slots``, or was saved
    under settings that change what the steps compute (``settings``: the trainer's ``step_order`` and
    ``through``; ``meta``'s ``meta_settings``; whether the meta quantizer has an optimizer).

    Raises:
        ValueError: the message names the setting and both values.
    """
    if not isinstance(state, dict) or not isinstance(state.get("records"), dict):
        raise ValueError("not a MetaQuant state: it has no 'records' (a checkpoint of another kind of run?)")
    names = {name for slot in slots for name, _ in slot.layers}
    if set(state["records"]) != names:
        raise ValueError(
            "MetaQuant state does not match this model's quantized layers: "
            f"{sorted(set(state['records']) ^ names)[:5]} differ"
        )
    ours: dict[str, str | None] = dict(settings)
    # The meta quantizer's function depends on its kind, init_scheme and nonlinearity, which φ's shapes do not
    # tell. A state written before they were saved has no such key: its kind and nonlinearity are unknown, its
    # init_scheme the paper's (the only one of that time); a meta quantizer without the attribute saves None:
    # compared only when both are known.
    saved = {**STATE_ABSENT_MEANS, **state}
    for key, value in meta_settings(meta).items():
        if value is not None and saved.get(key) is not None:
            ours[key] = value
    for key, value in ours.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"MetaQuant state was saved with {key}={saved[key]!r}, this trainer uses {value!r}")
    if (state["meta_optimizer"] is None) != (meta_optimizer is None):
        raise ValueError("MetaQuant state and this trainer disagree on whether the meta quantizer has an optimizer")


def carry_state(
    module: nn.Module,
    name: str,
    state_dict: Callable[[], dict[str, Any]],
    load_state_dict: Callable[[dict[str, Any]], None],
    device: Callable[[], torch.device],
) -> None:
    """Carry ``state_dict()`` in ``module.state_dict()`` as the entry ``<prefix><name>``, serialized into one uint8
    tensor; ``module.load_state_dict`` gives it back to ``load_state_dict`` (on ``device()``), and counts a state
    dict without the entry as missing it."""

    def save(mod: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict(), buffer)
        state[prefix + name] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def load(
        mod: nn.Module,
        state: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: list[str],
        unexpected: list[str],
        errors: list[str],
    ) -> None:
        packed = state.pop(prefix + name, None)  # popped: not an unexpected key of the module
        if packed is None:
            missing.append(prefix + name)
            return
        raw = io.BytesIO(packed.cpu().numpy().tobytes())
        load_state_dict(torch.load(raw, map_location=device(), weights_only=True))

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)
