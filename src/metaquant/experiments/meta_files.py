"""The trained meta quantizer of a MetaQuant run as a file (``meta.pt``), for ``meta_init`` in another run."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_bytes
from ..integrity import read_verified, with_digest
from ..meta import MetaQuantizer
from .config import RunConfig
from .runs import CHECKPOINT

__all__ = ["META_FILE", "save_meta", "load_meta", "meta_config"]

logger = logging.getLogger(__name__)


def meta_config(config: RunConfig) -> dict[str, Any]:
    """What identifies a meta quantizer's architecture, stored beside its weights."""
    keys = ("estimator", "hidden_size", "nonlinearity") + (
        ("num_lstm",) if config.estimator == "lstmfc" else ("num_fc",)
    )
    found = {k: getattr(config, k) for k in keys}
    if config.meta_init_scheme != "paper":  # another function of the same weights (files of paper runs lack it)
        found["init_scheme"] = config.meta_init_scheme
    return found


#: The trained meta quantizer of a finished MetaQuant run, for ``--meta-init``.
META_FILE = "meta.pt"


def load_meta(meta: MetaQuantizer, source: str, expected: dict[str, Any]) -> None:
    """Load a trained meta quantizer from ``source``: a ``meta.pt``, a checkpoint, or a run directory.

    Raises:
        FileNotFoundError: nothing to load there.
        ValueError: the saved meta quantizer has another architecture (the message names both).
    """
    path = Path(source)
    if path.is_dir():
        path = path / META_FILE if (path / META_FILE).exists() else path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"`meta_init` {source}: no {META_FILE} or {CHECKPOINT} there")
    try:
        saved = torch.load(io.BytesIO(read_verified(path)), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"`meta_init` {path} cannot be read ({type(err).__name__}: {err})") from None
    if "trainer" in saved:  # a checkpoint
        state, found = saved["trainer"].get("meta"), saved.get("meta_config")
    else:
        state, found = saved.get("meta"), saved.get("meta_config")
    if state is None or found is None:
        raise ValueError(f"`meta_init` {path} holds no meta quantizer")
    if found != expected:
        raise ValueError(f"`meta_init` {path} holds a meta quantizer {found}, this run needs {expected}")
    meta.load_state_dict(state)


def save_meta(path: Path, meta: MetaQuantizer, config: RunConfig) -> None:
    """Write the trained meta quantizer, with its architecture, for ``meta_init`` in another run."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in meta.state_dict().items()}  # readable without the GPU it ran on
    torch.save({"meta": state, "meta_config": meta_config(config)}, buffer)
    atomic_write_bytes(path, with_digest(buffer.getvalue()))
