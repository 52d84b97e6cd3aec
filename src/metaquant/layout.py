"""Memory layout of convolutional models and their batches: channels-last by default.

PyTorch's convolutions run faster on CPU (oneDNN) and on CUDA (cuDNN, tensor cores) when activations and 4-D
weights are stored channels-last (NHWC in memory, NCHW in shape). Nothing else changes: shapes, indexing and
every operation's result are the same up to the order of floating-point sums inside a convolution. The
quantizers are element-wise, so ``Ŵ = Q(A(W))`` keeps the layout of ``W``.

``preferred_memory_format(model)`` says which layout a model should use, ``apply_memory_format`` converts a
model's 4-D parameters and buffers, and ``format_batch`` converts a batch of images to match. ``memory_order``,
``flatten_in_memory_order`` and ``unflatten_like`` turn weights of any layout into flat vectors and back
without copying, for the code that processes the weights of all layers at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .validation import check_choice

__all__ = [
    "preferred_memory_format",
    "apply_memory_format",
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
    """The layout ``model`` should train in: channels-last for a model with 2-D convolutions under ``"auto"``.

    Args:
        model: any module (quantized or not; ``QuantConv2d`` is an ``nn.Conv2d``).
        choice: ``"auto"`` (channels-last when the model has an ``nn.Conv2d``), ``"channels-last"`` or
            ``"contiguous"`` (plain NCHW).

    Returns:
        ``torch.channels_last`` or ``torch.contiguous_format``.

    Raises:
        ValueError: ``choice`` is not one of ``MEMORY_FORMATS`` (the message lists them).

    Example:
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        >>> mq.layout.preferred_memory_format(conv), mq.layout.preferred_memory_format(torch.nn.Linear(2, 2))
        (torch.channels_last, torch.contiguous_format)
        >>> mq.layout.preferred_memory_format(conv, "contiguous")
        torch.contiguous_format
    """
    check_choice("memory format", choice, MEMORY_FORMATS)
    if choice == "contiguous" or (choice == "auto" and not _has_conv2d(model)):
        return torch.contiguous_format
    return torch.channels_last


def apply_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` in ``memory_format``, in place (Parameters are kept).

    ``Module.to(memory_format=...)`` does the same for the parameters; this also keeps their identity, which
    optimizers built before the call rely on.

    Args:
        model: any module.
        memory_format: ``torch.channels_last`` or ``torch.contiguous_format``.

    Returns:
        ``model`` itself.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        >>> w = net[0].weight
        >>> _ = mq.layout.apply_memory_format(net, torch.channels_last)
        >>> net[0].weight is w, w.is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=memory_format):
                tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return model


def format_batch(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` in ``memory_format`` when it is a 4-D image batch; any other tensor as it is.

    Args:
        x: a batch (``[N, C, H, W]`` images, or anything else).
        memory_format: the model's layout.

    Returns:
        ``x`` itself when nothing needs to change, else a copy in the layout (same values and shape).

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = mq.layout.format_batch(x, torch.channels_last)
        >>> torch.equal(x, y), y.is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """
    if x.dim() != 4 or memory_format == torch.contiguous_format and x.is_contiguous():
        return x
    return x.contiguous(memory_format=memory_format)


def memory_order(t: Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the largest stride to the smallest: the order its elements lie in memory.

    Size-1 dimensions, whose strides are arbitrary, keep their logical order among equal strides.

    Args:
        t: any tensor.

    Returns:
        A permutation of ``range(t.dim())``; ``t.permute(order)`` is contiguous when ``t`` is dense.

    Example:
        >>> w = torch.randn(8, 3, 5, 5)
        >>> mq.layout.memory_order(w), mq.layout.memory_order(w.to(memory_format=torch.channels_last))
        ((0, 1, 2, 3), (0, 2, 3, 1))
    """
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))


def flatten_in_memory_order(t: Tensor, order: Sequence[int]) -> Tensor:
    """``t`` as a flat vector in the element order ``order`` gives (a view when ``t`` is dense in that order).

    Args:
        t: any tensor.
        order: a permutation of its dimensions, e.g. ``memory_order(t)``.

    Returns:
        ``t.permute(order).reshape(-1)``: ``[t.numel()]``.

    Example:
        >>> w = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
        >>> flat = mq.layout.flatten_in_memory_order(w, mq.layout.memory_order(w))
        >>> flat.data_ptr() == w.data_ptr()  # no copy
        True
    """
    return t.permute(tuple(order)).reshape(-1)


def unflatten_like(flat: Tensor, shape: Sequence[int], order: Sequence[int]) -> Tensor:
    """The inverse of ``flatten_in_memory_order``: ``flat`` viewed in ``shape``, laid out in memory as ``order`` says.

    Args:
        flat: ``[prod(shape)]``.
        shape: the logical shape, e.g. a weight's.
        order: the permutation the vector was flattened with.

    Returns:
        A view of ``flat`` of shape ``shape`` whose memory order is ``order`` (channels-last for a channels-last
        weight's ``memory_order``).

    Example:
        >>> w = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
        >>> order = mq.layout.memory_order(w)
        >>> back = mq.layout.unflatten_like(mq.layout.flatten_in_memory_order(w, order), w.shape, order)
        >>> torch.equal(back, w), back.stride() == w.stride()
        (True, True)
    """
    inverse = sorted(range(len(order)), key=list(order).__getitem__)
    return flat.reshape([shape[d] for d in order]).permute(inverse)
