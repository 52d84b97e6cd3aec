"""The global random generators a run depends on (Python's, NumPy's, torch's): seed them, and save and restore
their states, so that a checkpoint continues a run exactly and a measurement between steps changes no draw."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: the seed of all three generators.

    Example:
        >>> import random, numpy as np
        >>> mq.training.seed_everything(1); first = (random.random(), np.random.rand(), torch.rand(1).item())
        >>> mq.training.seed_everything(1); first == (random.random(), np.random.rand(), torch.rand(1).item())
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run depends on, for a checkpoint, as tensors and plain Python values only (so the
    checkpoint loads with ``torch.load(weights_only=True)``).

    Returns:
        A dict with the states of Python's ``random`` (``"python"``), NumPy's global generator (``"numpy"``),
        torch's CPU generator (``"torch"``) and, when CUDA is available, of every CUDA device (``"cuda"``).

    Example:
        >>> saved = mq.training.rng_state()
        >>> torch.save(saved, "rng.pt")
        >>> {"python", "numpy", "torch"} <= set(torch.load("rng.pt", weights_only=True))
        True
    """
    kind, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved.

    Args:
        state: a dict returned by ``rng_state``, possibly saved and loaded with ``torch.load(weights_only=True)``.
            Its ``"cuda"`` entry is ignored when CUDA is not available.

    Example:
        >>> import random
        >>> torch.save(mq.training.rng_state(), "rng.pt")
        >>> drawn = (random.random(), torch.rand(2))
        >>> mq.training.set_rng_state(torch.load("rng.pt", weights_only=True))
        >>> again = (random.random(), torch.rand(2))
        >>> drawn[0] == again[0], torch.equal(drawn[1], again[1])
        (True, True)
    """
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
