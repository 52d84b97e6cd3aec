"""Memory layout of convolutional models and their batches: channels-last by default.

Convolutions run faster on CPU (oneDNN) and CUDA (cuDNN) with activations and 4-D weights stored
channels-last (NHWC in memory, NCHW in shape); results are the same up to the order of floating-point sums.
The quantizers are element-wise, so ``Ŵ = Q(A(W))`` keeps the layout of ``W``. ``memory_order``,
``flatten_in_memory_order`` and ``unflatten_like`` turn weights of any layout into flat vectors and back
without copying, for code that processes the weights of all layers at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .validation import check_choice

__all__ = [
    "preferred_memory_format",
    "apply_memory_format",
    "use_fast_layout",
    "format_batch",
    "memory_order",
    "flatten_in_memory_order",
    "unflatten_like",
    "MEMORY_FORMATS",
]

#: Names of the layouts, as ``RunConfig.memory_format`` and ``--memory-format`` spell them.
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def preferred_memory_format(model: nn.Module, choice: str = "auto") -> torch.memory_format:
    """The layout ``model`` should train in: under ``"auto"``, channels-last when it has an ``nn.Conv2d``.

    Raises:
        ValueError: ``choice`` is not one of ``MEMORY_FORMATS``.
    """
    check_choice("memory format", choice, MEMORY_FORMATS)
    if choice == "contiguous" or (choice == "auto" and not _has_conv2d(model)):
        return torch.contiguous_format
    return torch.channels_last


def apply_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` in ``memory_format``, in place; returns ``model``.

    Unlike ``Module.to(memory_format=...)`` this keeps the Parameters' identity, which optimizers built before the
    call rely on.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=memory_format):
                tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return model


def use_fast_layout(model: nn.Module) -> nn.Module:
    """Store ``model``'s weights in the layout its convolutions run fastest in, in place; returns ``model``.

    For a model with 2-D convolutions: channels-last (``preferred_memory_format``), what the command line trains
    in, about 1.3x faster per step on a CPU; other models are left as they are. The numbers computed are the same
    up to the order of floating-point sums, and the batches need no change (the first convolution reads them as
    they are). What changes for your tensors: the model's 4-D parameters and buffers keep their shapes and values
    but are stored channels-last (``.is_contiguous()`` is False: use ``.reshape``, not ``.view``, on them), and so
    are the activations that convolutions return, so a forward pass that calls ``.view`` on them must use
    ``torch.flatten`` or ``.reshape`` instead. Optimizers built before the call keep working.

    Example:
        >>> model = mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1))
        >>> model = mq.layout.use_fast_layout(model)
        >>> model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    return apply_memory_format(model, preferred_memory_format(model))


def format_batch(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` in ``memory_format`` when it is a 4-D image batch (a copy if needed); any other tensor as it is."""
    if x.dim() != 4 or memory_format == torch.contiguous_format and x.is_contiguous():
        return x
    return x.contiguous(memory_format=memory_format)


def memory_order(t: Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the largest stride to the smallest: the order its elements lie in memory.

    Size-1 dimensions (arbitrary strides) keep their logical order; ``t.permute(order)`` is contiguous when ``t``
    is dense.
    """
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))


def flatten_in_memory_order(t: Tensor, order: Sequence[int]) -> Tensor:
    """``t.permute(order).reshape(-1)``: a view when ``t`` is dense in that order (``order = memory_order(t)``)."""
    return t.permute(tuple(order)).reshape(-1)


def unflatten_like(flat: Tensor, shape: Sequence[int], order: Sequence[int]) -> Tensor:
    """The inverse of ``flatten_in_memory_order``: a view of ``flat`` in ``shape`` whose memory order is ``order``."""
    inverse = sorted(range(len(order)), key=list(order).__getitem__)
    return flat.reshape([shape[d] for d in order]).permute(inverse)
