"""The flat vector MetaQuant works on: each trained quantized weight has a slot, a range of its coordinates.

Algorithm 1 works coordinate by coordinate, so every per-coordinate quantity of all layers (``g_Ŵ``, ``W̃``,
``g_W``, the look-ahead, LSTMFC's state) lives in one flat vector of ``N = Σ numel`` coordinates and the meta
quantizer is called once per step (docs/design.md §5.0). ``make_slots`` lays the weights out in it, ordered by
param group; ``make_plan`` cuts it into the pieces that the optimizer's update rule runs on, each with the flat
optimizer state of its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .layers import QuantLayer
from .layers.convert import check_optimizer_trains_quantizers
from .layout import flatten_in_memory_order, memory_order, unflatten_like
from .quantizers import ForwardQuantizer

__all__ = [
    "Slot",
    "Plan",
    "Weights",
    "flatten",
    "param_groups_of",
    "trained_weights",
    "make_slots",
    "check_slots",
    "make_plan",
    "pieces_of",
    "update_directions",
    "call_per_slot",
    "flat_calibration",
]


@dataclass
class Slot:
    """One trained quantized weight, the layers that compute with it, and its place in the flat vectors.

    A slot's coordinates are ``[start, start + numel)``, in the weight's *memory* order (``perm``: its dimensions
    from the largest stride to the smallest), so that flattening a channels-last weight, its gradient or its
    optimizer state is a view, not a copy.
    """

    weight: Tensor
    layers: list[tuple[str, QuantLayer]]  # a weight tied between layers is one slot with several layers
    quantizer: ForwardQuantizer
    group: int  # index of the weight's optimizer param group
    start: int
    perm: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.layers[0][0]

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def stop(self) -> int:
        return self.start + self.numel

    def biases(self) -> list[tuple[str, Tensor | None]]:
        """The name and the bias (None without one) of each layer that computes with the weight."""
        return [(name, cast("Tensor | None", layer.bias)) for name, layer in self.layers]

    def flat(self, t: Tensor) -> Tensor:
        """``t`` (the weight's shape) as ``[numel]`` in this slot's coordinate order (a view when it can be)."""
        return flatten_in_memory_order(t, self.perm)

    def unflat(self, flat: Tensor) -> Tensor:
        """``[numel]`` in this slot's order → the weight's shape (a view with the weight's strides)."""
        return unflatten_like(flat, self.weight.shape, self.perm)

    def state_to_logical(self, s: Tensor) -> Tensor:
        """LSTMFC state ``[L, numel, H]`` in slot order → the order of ``weight.reshape(-1)`` (checkpoints)."""
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        shape = [s.shape[0], *(self.weight.shape[d] for d in self.perm), s.shape[-1]]
        dims = [0, *(1 + d for d in inverse), len(shape) - 1]
        return s.reshape(shape).permute(dims).reshape(s.shape[0], self.numel, s.shape[-1])

    def state_from_logical(self, s: Tensor) -> Tensor:
        """The inverse of ``state_to_logical``."""
        shape = [s.shape[0], *self.weight.shape, s.shape[-1]]
        dims = [0, *(1 + d for d in self.perm), len(shape) - 1]
        return s.reshape(shape).permute(dims).reshape(s.shape[0], self.numel, s.shape[-1])


#: The refinement's pieces: ``(param group, its slots, their flat optimizer state)``.
Plan = list[tuple[dict[str, Any], list[Slot], dict[str, Any]]]
#: The trained quantized weights by ``id``, each with the layers that compute with it (several when tied).
Weights = dict[int, tuple[Tensor, list[tuple[str, QuantLayer]]]]


def flatten(slots: Sequence[Slot], tensors: Sequence[Tensor]) -> Tensor:
    """One ``[N]`` vector from a tensor per slot (each of the slot weight's shape)."""
    return torch.cat([slot.flat(t) for slot, t in zip(slots, tensors)])


def param_groups_of(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """The index of each parameter's param group, by the parameter's ``id``."""
    return {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def trained_weights(layers: dict[str, QuantLayer], group_of: dict[int, int]) -> tuple[Weights, list[str]]:
    """The quantized weights that train, with their layers, and the names of the layers whose weight is frozen.

    Raises:
        ValueError: a weight or a trainable bias of a quantized layer requires grad but is not in the optimizer.
    """
    weights: Weights = {}
    frozen = []
    for name, layer in layers.items():
        w = layer.weight
        if not w.requires_grad:
            frozen.append(name)
            continue
        if id(w) not in group_of:
            raise ValueError(
                f"the quantized weight {name}.weight requires grad but is not in the optimizer: pass it to the "
                "optimizer, freeze it (requires_grad_(False)), or leave the layer in full precision with "
                "quantize_(..., filter_fn=...)"
            )
        if layer.bias is not None and layer.bias.requires_grad and id(layer.bias) not in group_of:
            raise ValueError(
                f"the bias {name}.bias of a quantized layer requires grad but is not in the "
                "optimizer: pass it to the optimizer or freeze it (requires_grad_(False))"
            )
        weights.setdefault(id(w), (w, []))[1].append((name, layer))
    return weights, frozen


def make_slots(weights: Weights, group_of: dict[int, int], model: nn.Module) -> list[Slot]:
    """One slot per trained quantized weight of ``model``, ordered by param group so each group is one flat range.

    Raises:
        ValueError: no weight trains; a tied weight has several quantizers or is also used by a layer that is not
            quantized; the weights are on several devices or in several dtypes.
    """
    if not weights:
        raise ValueError("MetaQuant found no trainable quantized weight: every quantized layer is frozen")
    owners: dict[int, int] = {}  # how many distinct modules hold each parameter
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    slots: list[Slot] = []
    for w, layers in weights.values():
        quantizers = {layer.quantizer for _, layer in layers}
        if len(quantizers) > 1:
            names = ", ".join(n for n, _ in layers)
            used = ", ".join(sorted(repr(q) for q in quantizers))
            raise ValueError(
                f"the weight tied between the quantized layers {names} is quantized differently by them "
                f"({used}), and MetaQuant needs one Ŵ per weight: give them one quantizer with one scale per "
                "layer (a per-channel quantizer runs along each layer's own output channels), or untie the weight"
            )
        if owners[id(w)] > len(layers):
            names = ", ".join(n for n, _ in layers)
            raise ValueError(
                f"the quantized weight of {names} is also used by a layer that is not quantized: "
                "quantize both layers or neither"
            )
        slots.append(Slot(w, layers, layers[0][1].quantizer, group_of[id(w)], 0, memory_order(w)))
    slots.sort(key=lambda slot: slot.group)  # stable: module order within a group
    start = 0
    for slot in slots:
        slot.start, start = start, start + slot.numel
    kinds = {(slot.weight.device, slot.weight.dtype) for slot in slots}
    if len(kinds) > 1:
        raise ValueError(
            f"MetaQuant needs every quantized weight on one device and in one dtype, found {sorted(map(str, kinds))}"
        )
    return slots


def check_slots(slots: list[Slot], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Take each layer's quantizer as it is now (a user may change it between steps), and refuse to train
    tensors ``model`` no longer holds: a quantized weight replaced since construction
    (``load_state_dict(assign=True)``, ``to_empty``) would be trained here while the model computes with the
    new one; so would a learned step the optimizer does not hold."""
    changed = False
    for slot in slots:
        name, layer = slot.layers[0]
        if getattr(*layer.weight_location) is not slot.weight:
            raise RuntimeError(
                f"the quantized weight of layer {name} was replaced after MetaQuant was built (e.g. by "
                "load_state_dict(..., assign=True)): build the optimizer and MetaQuant again for the model's "
                "new tensors"
            )
        quantizers = {other.quantizer for _, other in slot.layers}
        if len(quantizers) > 1:
            raise RuntimeError(
                f"the layers {', '.join(n for n, _ in slot.layers)} share one weight but are now quantized "
                f"differently ({', '.join(sorted(map(repr, quantizers)))}); MetaQuant needs one Ŵ per weight"
            )
        (quantizer,) = quantizers
        if quantizer != slot.quantizer:
            slot.quantizer, changed = quantizer, True
    if changed:
        check_optimizer_trains_quantizers(model, optimizer)


def _group_ranges(optimizer: torch.optim.Optimizer, slots: list[Slot]) -> list[tuple[dict[str, Any], list[Slot]]]:
    """The slots of each param group (consecutive in the flat vectors), with the group."""
    ranges: list[tuple[dict[str, Any], list[Slot]]] = []
    for slot in slots:
        if ranges and ranges[-1][1][-1].group == slot.group:
            ranges[-1][1].append(slot)
        else:
            ranges.append((optimizer.param_groups[slot.group], [slot]))
    return ranges


def _flat_state(optimizer: torch.optim.Optimizer, slots: list[Slot]) -> dict[str, Any] | None:
    """The optimizer state of ``slots`` as one flat state, or None when their states differ in kind."""
    states = [optimizer.state.get(slot.weight, {}) for slot in slots]
    keys = set(states[0])
    if any(set(state) != keys for state in states):
        return None
    flat: dict[str, Any] = {}
    for key in keys:
        values = [state[key] for state in states]
        if key == "step":
            steps = {float(v) for v in values}
            if len(steps) > 1:
                return None
            flat[key] = values[0]
        elif all(v is None for v in values):
            flat[key] = None
        elif all(isinstance(v, Tensor) and v.shape == slot.weight.shape for v, slot in zip(values, slots)):
            flat[key] = flatten(slots, values)
        else:
            return None
    return flat


def make_plan(optimizer: torch.optim.Optimizer, slots: list[Slot]) -> Plan:
    """The pieces the refinement works on: ``(group, slots, their flat optimizer state)``, in flat order.

    One piece per param group whose weights have states of one kind (the usual case: one piece in all);
    otherwise one per weight. The rules are element-wise, so the result equals a per-layer computation.
    """
    plan = []
    for group, grouped in _group_ranges(optimizer, slots):
        state = _flat_state(optimizer, grouped)
        if state is not None:
            plan.append((group, grouped, state))
        else:
            plan += [(group, [slot], _flat_state(optimizer, [slot]) or {}) for slot in grouped]
    return plan


def pieces_of(flat: Tensor, plan: Plan) -> list[Tensor]:
    """``flat`` cut into the plan's pieces (one split: a single backward node)."""
    if len(plan) == 1:
        return [flat]
    return list(flat.split([sum(slot.numel for slot in slots) for _, slots, _ in plan]))


def update_directions(grad_w: Tensor, weights: Tensor, rule: Callable[..., Tensor], plan: Plan) -> list[Tensor]:
    """``π(g_W)`` (Eq. 6) on each piece of the plan, from the flat ``g_W`` and ``W``."""
    pieces = zip(pieces_of(grad_w, plan), pieces_of(weights, plan), plan)
    return [rule(grad, weight, state, group) for grad, weight, (group, _, state) in pieces]


def call_per_slot(
    fn: Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]],
    slots: list[Slot],
    grad_w_hat: Tensor,
    w_tilde: Tensor,
    state: Any,
) -> tuple[Tensor, Any]:
    """``fn(g_Ŵ, W̃, state)`` called on each slot's part of the flat records, in the order of
    ``weight.reshape(-1)`` (a state ``[L, numel, H]`` too); its outputs and states, flat in slot order."""
    outputs, states = [], []
    for slot in slots:
        a, b = slot.start, slot.stop
        old = None if state is None else tuple(slot.state_to_logical(s[:, a:b]) for s in state)
        out, new = fn(slot.unflat(grad_w_hat[a:b]).reshape(-1), slot.unflat(w_tilde[a:b]).reshape(-1), old)
        outputs.append(slot.flat(out.reshape(slot.weight.shape)))
        states.append(new)
    flat_state = None
    if states[0] is not None:
        flat_state = tuple(
            torch.cat([slot.state_from_logical(s[i]) for slot, s in zip(slots, states)], 1)
            for i in range(len(states[0]))
        )
    return torch.cat(outputs), flat_state


@torch.no_grad()
def flat_calibration(slots: list[Slot], weights: Tensor) -> Tensor:
    """The flat ``c(W)`` of the flat weights: in one pass when every layer shares a quantizer that processes
    flat segments (``ForwardQuantizer.segmentable``: the same values, to the bit), else layer by layer."""
    quantizers = {slot.quantizer for slot in slots}
    if len(quantizers) == 1 and (quantizer := next(iter(quantizers))).segmentable:
        return quantizer.backward_terms_segments(weights, [slot.numel for slot in slots])[2]
    return flatten(slots, [slot.quantizer.calibration(slot.weight) for slot in slots])
