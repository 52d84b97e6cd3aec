"""Argument checks shared by the model constructors: a bad value fails at construction with a message naming
the argument, not deep inside a layer with a shape error."""

from __future__ import annotations

from ..validation import is_int


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` refused: ``num_classes=True`` is a mistake), else
    TypeError or ValueError."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value
