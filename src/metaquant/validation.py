"""Argument checks that name the bad value and what is allowed, in one wording across the package.

Each check returns the value it accepted, so that a constructor can check and assign in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeGuard, TypeVar

__all__ = ["check_choice", "check_int", "check_number", "is_int", "is_number"]

T = TypeVar("T")


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[float]:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]`` (either bound may be None), else a ``ValueError``:
    ``"<name> must be an integer >= <minimum>, got <value>"`` (or ``in <minimum>..<maximum>``)."""
    ok = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            bound = f" in {minimum}..{maximum}"
        elif minimum is not None:
            bound = f" >= {minimum}"
        elif maximum is not None:
            bound = f" <= {maximum}"
        else:
            bound = ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` if it is a finite number between ``low`` and ``high`` (closed bounds unless ``*_open``), else a
    ``ValueError`` naming the range: ``"<name> must be a number in [0, 1), got 1.5"`` or ``"... > 0, got 0"``
    (``"a finite number"`` for an infinity or NaN outside a range bounded on both sides)."""
    inside = is_number(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        if low is not None and high is not None:
            bound = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bound = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            bound = f" {'<' if high_open else '<='} {high:g}"
        else:
            bound = ""
        # "in [a, b]" already says finite; a one-sided bound does not
        bounded = low is not None and high is not None
        nonfinite = isinstance(value, float) and not math.isfinite(value)
        kind = "a finite number" if nonfinite and not bounded else "a number"
        raise ValueError(f"{name} must be {kind}{bound}, got {value!r}")
    return value


def check_choice(name: str, value: T, allowed: Iterable[T]) -> T:
    """``value`` if it is one of ``allowed``, else a ``ValueError``: ``"<name> <value> is not supported; allowed:
    a, b, c"``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return value
