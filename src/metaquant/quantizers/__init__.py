"""Forward quantizers: how a latent full-precision weight ``W`` becomes the low-bit weight ``Ŵ``.

Each quantizer is a frozen dataclass of pure functions (docs/design.md §2-§3, paper §3.1):

* ``preprocess(W) -> W̃``      the differentiable pre-processing ``A``;
* ``quantize(W̃) -> Ŵ``        the step function ``Q`` (value only);
* ``relaxed(W)``              ``Q ∘ A`` without the rounding, scale statistics held constant;
* ``calibration(W) -> c(W)``  the derivative of ``relaxed``: ``g_W = g_W̃ ⊙ c(W)`` (Algorithm 1 step 1, Eq. 4-5);
* ``ste_scale(W̃)``            the STE's factor on ``dŴ/d relaxed`` (1 for DoReFa, the layer scale ``a`` for BWN);
* ``encode(W)``/``decode``    integer codes plus scale(s), exact: ``quantize`` itself is ``decode(encode)``.

They hold only their bit width (and, per channel, the output-channel axis; per group, the group size), so layers
may share them. A quantizer with learned tensors (``LSQ``'s step) declares them in ``learned``: each quantized
layer holds them as Parameters and hands them to its quantizer (``bind``) at every use, so the Parameters stay
the module's. ``get_quantizer(name, bits)`` builds one from the registry ``QUANTIZERS``.
"""

from __future__ import annotations

import dataclasses

from .base import Encoded, ForwardQuantizer
from .fixed import (
    BWN,
    BWNPerChannel,
    DoReFa,
    DoReFaPerChannel,
    Ternary,
    UniformPerChannel,
    UniformPerGroup,
    UniformSymmetric,
    expand_groups,
)
from .learned import LSQ, LSQPerChannel

__all__ = [
    "Encoded",
    "ForwardQuantizer",
    "DoReFa",
    "DoReFaPerChannel",
    "BWN",
    "BWNPerChannel",
    "Ternary",
    "UniformSymmetric",
    "UniformPerChannel",
    "UniformPerGroup",
    "LSQ",
    "LSQPerChannel",
    "expand_groups",
    "QUANTIZERS",
    "get_quantizer",
    "quantizer_names",
]


QUANTIZERS: dict[str, type[ForwardQuantizer]] = {
    cls.name: cls
    for cls in (
        DoReFa,
        BWN,
        BWNPerChannel,
        Ternary,
        UniformSymmetric,
        UniformPerChannel,
        UniformPerGroup,
        LSQ,
        LSQPerChannel,
        DoReFaPerChannel,
    )
}
# The original code's spellings, accepted on input.
_ALIASES = {"bwn-f": "bwn-channel", "bwn_f": "bwn-channel", "twn": "ternary"}


def quantizer_names() -> list[str]:
    """Registered quantizer names in registration order (the keys of ``QUANTIZERS``, without aliases)."""
    return list(QUANTIZERS)


def get_quantizer(name: str, bits: int = 1, *, group_size: int | None = None) -> ForwardQuantizer:
    """Build a forward quantizer by name (``dorefa``, ``bwn``, ``bwn-channel``, ``ternary``, ``uniform``,
    ``uniform-channel``, ``uniform-group``, ``lsq``, ``lsq-channel``, ``dorefa-channel``).

    Names are case-insensitive; the original spellings ``bwn-f``/``bwn_f`` and ``twn`` are accepted too. ``bits``:
    ``ternary`` needs 2, ``uniform*`` and ``lsq*`` 2..8, ``dorefa*`` 1..8. ``group_size``: the weights per scale of
    ``uniform-group`` (None: its default, 128); no other quantizer takes one.

    Raises:
        ValueError: unknown name (the message lists the registered ones), unsupported bit width, a ``group_size``
            that is not an integer >= 1, or one given to a quantizer without groups.
        TypeError: ``bits`` is not an ``int``.

    Example:
        >>> mq.get_quantizer("DoReFa", bits=2), mq.get_quantizer("twn", bits=2)
        (DoReFa(bits=2), Ternary(bits=2))
        >>> mq.get_quantizer("uniform-group", 4, group_size=64)
        UniformPerGroup(bits=4, group_size=64)
        >>> mq.get_quantizer("sign")
        Traceback (most recent call last):
        ...
        ValueError: unknown quantizer 'sign'; allowed: dorefa, bwn, bwn-channel, ternary, uniform, ...
    """
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[key]
    if group_size is None:
        return cls(bits=bits)
    grouped = [n for n, c in QUANTIZERS.items() if "group_size" in {f.name for f in dataclasses.fields(c)}]
    if key not in grouped:
        raise ValueError(f"group_size={group_size!r} applies to quantizer {', '.join(grouped)}, not to {key!r}")
    return cls(bits=bits, group_size=group_size)  # type: ignore[call-arg]  # a field of the grouped classes only


# Models and checkpoints saved whole name the quantizers' classes: this path, wherever a class is defined.
for _cls in (Encoded, ForwardQuantizer, *QUANTIZERS.values()):
    _cls.__module__ = __name__
del _cls
