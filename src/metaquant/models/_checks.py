"""Argument checks shared by the model constructors.

Every public constructor in :mod:`metaquant.models` validates its integer
arguments the same way, so a bad value fails at construction time with a
message naming the argument and what is allowed, instead of deep inside a
layer with a shape error.
"""

from __future__ import annotations

from ..validation import is_int


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` >= 1, else raise.

    ``bool`` is rejected on purpose: ``True`` is an ``int`` in Python but
    ``num_classes=True`` is always a mistake.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value
