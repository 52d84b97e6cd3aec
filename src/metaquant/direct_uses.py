"""Direct uses of a quantized weight: a loss that reads a quantized layer's latent weight ``W`` other than through
the layer's ``Ŵ`` (an output layer computed as ``F.linear(h, emb.weight)`` from a quantized embedding, or a
penalty on ``W``).

Such a use computes with the float ``W`` in training and evaluation, while ``load_packed`` and the ONNX export
give every use of the weight ``Ŵ``. ``Trainer`` finds these uses in the loss's autograd graph (``direct_uses``;
a ``torch.compile``d region of the graph is opaque, and what it reads is not reported);
``MetaQuant``, whose forward pass reaches ``W`` through nothing else, by the gradient ``W`` receives. Both say
so once per weight (``warn_direct_uses``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from .estimators import is_fake_quantize_node
from .layers import quantized_layers

__all__ = ["direct_uses", "warn_direct_uses", "watched_weights"]

logger = logging.getLogger(__name__)


def watched_weights(model: nn.Module) -> dict[int, str]:
    """``{id(W): name}`` for the latent weights of ``model``'s quantized layers, by their first parameter name.

    A weight that a full-precision module holds too is left out: that module's use of ``W`` is one the exports
    keep as it is (docs/guide.md, tied weights), not a direct use.
    """
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    quantized: dict[int, int] = {}
    for layer in quantized_layers(model).values():
        quantized[id(layer.weight)] = quantized.get(id(layer.weight), 0) + 1
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in quantized and holders.get(id(p), 0) <= quantized[id(p)]:
            names.setdefault(id(p), name)
    return names


def direct_uses(loss: Tensor, weights: Sequence[Tensor]) -> list[int]:
    """The indices of ``weights`` that the autograd graph of ``loss`` reaches from a node other than a
    fake-quantize one (``fake_quantize`` and its kin): the weights the loss also reads directly.

    Args:
        loss: the loss, before its backward pass.
        weights: latent weights of quantized layers (leaves that require grad).

    Returns:
        The indices, in increasing order.
    """
    wanted = {id(w): i for i, w in enumerate(weights)}
    found: set[int] = set()
    seen = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        own = is_fake_quantize_node(node) or _compiled(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # an AccumulateGrad node: a leaf
            if variable is not None:
                if not own and id(variable) in wanted:
                    found.add(wanted[id(variable)])
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return sorted(found)


def _compiled(node: object) -> bool:
    """Whether ``node`` is the backward pass of a ``torch.compile``d region: the fake-quantize nodes inside it are
    fused away, so what it reads cannot be told apart and is not reported (no false warning)."""
    return type(node).__name__ == "CompiledFunctionBackward"


def warn_direct_uses(names: Iterable[str], warned: set[str], consequence: str) -> None:
    """Log one warning for each weight of ``names`` not yet in ``warned`` (which then holds it).

    Args:
        names: qualified names of the quantized weights read directly, e.g. ``"emb.weight"``.
        warned: the names already said, kept by the trainer.
        consequence: what the trainer does with such a use's gradient, one sentence.
    """
    new = [name for name in names if name not in warned]
    if not new:
        return
    warned.update(new)
    logger.warning(
        "the loss reads the quantized weight(s) %s directly, not through the layer's quantized weight Ŵ (e.g. an "
        "output layer computed as F.linear(h, emb.weight), or a penalty on the weight): such a use computes with "
        "the float weight in training and evaluation, while load_packed and the ONNX export give it Ŵ. %s To "
        "compute with Ŵ, use the layer's forward_params()[0]; or leave the layer in full precision "
        "(quantize_(..., filter_fn=...)); a penalty on the weight is the optimizer's weight_decay.",
        ", ".join(new),
        consequence,
    )
