"""Whether tensors hold only finite values: the check a training step makes before it updates anything."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (one reduction, one device sync).

    Args:
        tensors: tensors of any shapes, dtypes and devices; ``None`` entries are skipped.

    Returns:
        True when no tensor holds a NaN or ±inf (also for no tensors at all).

    Example:
        >>> mq.guards.all_finite([torch.ones(2), None]), mq.guards.all_finite([torch.tensor([1.0, float("inf")])])
        (True, False)
        >>> mq.guards.all_finite([])
        True
    """
    present = [t.detach() for t in tensors if t is not None]
    floating = [t for t in present if t.is_floating_point() or t.is_complex()]
    if not floating:
        return True  # integer tensors are always finite
    # max|x| is finite exactly when every element is (a NaN propagates): one fused pass over all tensors, no
    # overflow of a sum of large finite values, and one device sync for the answer.
    if all(t.device.type == "cpu" and not t.is_complex() for t in floating):
        # the smallest and largest element of each tensor (a NaN propagates), without a copy: on a CPU the
        # inf-norm is a slow generic reduction; on CUDA it is one fused kernel for all tensors
        ends = [end for t in floating if t.numel() for end in t.aminmax()]
        return not ends or bool(torch.isfinite(torch.stack(ends)).all())
    peaks = torch._foreach_norm(floating, float("inf"))
    return bool(torch.isfinite(torch.stack([p.float().to(peaks[0].device) for p in peaks])).all())


def first_nonfinite(groups: dict[str, Iterable[Tensor | None]]) -> str | None:
    """The name of the first group holding a non-finite value, or None when all are finite.

    Args:
        groups: ``name -> tensors`` (``None`` entries skipped), checked in the dict's order.

    Returns:
        The name of the first group for which ``all_finite`` is False, or None.

    Example:
        >>> nan = torch.tensor([float("nan")])
        >>> mq.guards.first_nonfinite({"loss": [torch.tensor(1.0)], "gradients": [None, nan], "meta": [nan]})
        'gradients'
        >>> print(mq.guards.first_nonfinite({"loss": [torch.tensor(1.0)]}))
        None
    """
    for name, tensors in groups.items():
        if not all_finite(tensors):
            return name
    return None
