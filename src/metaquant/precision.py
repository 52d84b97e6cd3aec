"""Mixed precision: the forward pass in bfloat16 or float16, the latent weights and the meta quantizer in float32.

``amp="bf16"`` runs each training forward pass under ``torch.autocast``. The quantized weight ``Ŵ`` (±1 for
1-bit DoReFa) is exact in bfloat16; ``W``, its optimizer state, ``g_W`` and the meta quantizer ``M_φ`` stay in
float32, since MetaQuant computes them outside the forward pass. ``fp16`` (CUDA only) needs the loss scaling
of ``make_grad_scaler``'s ``GradScaler`` (the trainers' ``grad_scaler``); ``bf16`` has float32's range.
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
    """Raise ``ValueError`` unless ``mode`` is one of ``AMP_MODES`` and runs on ``device`` (``fp16`` needs CUDA)."""
    check_choice("amp", mode, AMP_MODES)
    device_type = torch.device(device).type
    if mode == "fp16" and device_type != "cuda":
        raise ValueError(
            f"amp 'fp16' needs a CUDA device (its gradient scaler is for CUDA); on {device_type} use amp 'bf16'"
        )


def autocast(mode: str, device: torch.device | str) -> AbstractContextManager[Any]:
    """The context a forward pass runs in for ``mode``: ``torch.autocast`` in its dtype, or nothing for ``"none"``.

    Raises:
        ValueError: as ``check_amp``.
    """
    check_amp(mode, device)
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[mode])


def make_grad_scaler(mode: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for ``fp16``, None for the other modes.

    Raises:
        ValueError: as ``check_amp``.
    """
    check_amp(mode, device)
    return torch.amp.GradScaler(torch.device(device).type) if mode == "fp16" else None
