"""Mixed precision: the forward pass in bfloat16 or float16, the latent weights and the meta quantizer in float32.

``--amp bf16`` (``RunConfig.amp``, ``fit(..., amp="bf16")``) runs each training forward pass under
``torch.autocast``: convolutions and matrix products compute in bfloat16, everything else stays as it is. The
quantized weight ``Ŵ`` (±1 for 1-bit DoReFa) is exact in bfloat16; ``W``, its optimizer state, ``g_W`` and the
meta quantizer ``M_φ`` never leave float32, because MetaQuant computes them outside the forward pass.

``fp16`` needs a loss scale against underflow of float16 gradients: ``make_grad_scaler`` builds a
``torch.amp.GradScaler`` that ``Trainer`` and ``MetaQuant`` take as ``grad_scaler``. It is for CUDA; on a CPU
use ``bf16``, which has float32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from .validation import check_choice

__all__ = ["AMP_MODES", "autocast", "make_grad_scaler", "check_amp"]

#: Names of the precision modes, as ``RunConfig.amp`` and ``--amp`` spell them.
AMP_MODES = ("none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str, device: torch.device | str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of ``AMP_MODES`` and runs on ``device``.

    Args:
        mode: ``"none"``, ``"bf16"`` or ``"fp16"``.
        device: where the model trains.

    Raises:
        ValueError: an unknown mode (the message lists them), or ``fp16`` on a device other than CUDA.

    Example:
        >>> mq.precision.check_amp("bf16", "cpu")
        >>> mq.precision.check_amp("fp16", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: amp 'fp16' needs a CUDA device (its gradient scaler is for CUDA); on cpu use amp 'bf16'
    """
    check_choice("amp", mode, AMP_MODES)
    device_type = torch.device(device).type
    if mode == "fp16" and device_type != "cuda":
        raise ValueError(
            f"amp 'fp16' needs a CUDA device (its gradient scaler is for CUDA); on {device_type} use amp 'bf16'"
        )


def autocast(mode: str, device: torch.device | str) -> AbstractContextManager[Any]:
    """The context a forward pass runs in for ``mode``: ``torch.autocast`` in its dtype, or nothing for ``"none"``.

    Args:
        mode: one of ``AMP_MODES``.
        device: where the model runs (its type picks the autocast backend).

    Returns:
        A context manager.

    Raises:
        ValueError: as ``check_amp``.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> with mq.precision.autocast("bf16", "cpu"):
        ...     out = layer(torch.randn(3, 4))
        >>> out.dtype, layer.weight.dtype
        (torch.bfloat16, torch.float32)
    """
    check_amp(mode, device)
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[mode])


def make_grad_scaler(mode: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for ``fp16`` (None for the other modes, which need none).

    Args:
        mode: one of ``AMP_MODES``.
        device: where the model trains.

    Returns:
        ``torch.amp.GradScaler(device type)`` for ``"fp16"``, else None.

    Raises:
        ValueError: as ``check_amp``.

    Example:
        >>> mq.precision.make_grad_scaler("bf16", "cpu") is None
        True
    """
    check_amp(mode, device)
    return torch.amp.GradScaler(torch.device(device).type) if mode == "fp16" else None
