"""Reading model weights from checkpoints, with clear errors on mismatch.

Accepted layouts:

* a plain ``state_dict`` (``{name: Tensor}``), as the original MetaQuant code wrote them
  (e.g. ``ResNet20-CIFAR10-pretrain.pth``);
* this library's training checkpoint, a dict whose ``"model"`` entry is the state_dict; when the run averaged
  its weights (``metaquant.averaging``), the delivered model is the ``"averaged"`` entry (an
  ``AveragedModel``'s state_dict: ``"module."``-prefixed weights and ``n_averaged``), which is read instead;
* either saved from a ``DataParallel``/``DistributedDataParallel`` wrapper (``"module."`` prefixes stripped).

Files are read with ``torch.load(weights_only=True)``: loading never runs pickled code. A checkpoint for
another architecture is one ``ValueError`` naming the first missing and unexpected keys and shape mismatches.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..integrity import CheckpointDamagedError, verify_checkpoint_bytes

__all__ = ["LoadResult", "extract_state_dict", "load_weights", "read_checkpoint"]

# Prefix that nn.DataParallel / DistributedDataParallel add to every key.
WRAPPER_PREFIX = "module."
# Key of the state_dict in this library's training checkpoints.
MODEL_KEY = "model"
# Key of the weight average's state_dict (torch.optim.swa_utils.AveragedModel), when a run keeps one, and the
# count that it holds beside the averaged model's entries.
AVERAGED_KEY = "averaged"
AVERAGED_COUNT = "n_averaged"
# How many names of each kind of mismatch an error message lists.
MAX_LISTED = 5

ACCEPTED = (
    "accepted: a state_dict {name: Tensor}, a dict with a 'model' entry holding one, "
    "optionally with DataParallel 'module.' prefixes"
)


class LoadResult(NamedTuple):
    """The model's keys left at their initial values and the checkpoint's entries ignored by a ``strict=False``
    :func:`load_weights`; both empty after a strict load."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _describe(obj: object) -> str:
    """Short description of an unrecognised checkpoint, for error messages."""
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        items = list(obj.items())
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in items[:MAX_LISTED])
        more = f", ... ({len(items)} entries)" if len(items) > MAX_LISTED else ""
        return f"a dict {{{shown}{more}}}"
    if isinstance(obj, nn.Module):
        return f"an nn.Module ({type(obj).__name__}); pass its .state_dict() instead"
    return f"an object of type {type(obj).__name__}"


def _strip_wrapper_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Strip only when *every* key has the prefix: then it came from a
    # wrapper, not from a submodule that happens to be called "module".
    # Loop because a wrapper can be wrapped again ("module.module.").
    sd = dict(state_dict)
    while sd and all(k.startswith(WRAPPER_PREFIX) for k in sd):
        sd = {k[len(WRAPPER_PREFIX) :]: v for k, v in sd.items()}
    return sd


def extract_state_dict(obj: object) -> dict[str, Tensor]:
    """The model state_dict (a new dict of the same tensors) held by a loaded checkpoint, in any accepted layout.

    Raises:
        ValueError: ``obj`` is none of the accepted layouts; the message says what was found.

    Example:
        A training checkpoint of a ``DistributedDataParallel`` model, then with a weight average, which wins:

        >>> ckpt = {"model": {"module.fc.weight": torch.zeros(2, 4), "module.fc.bias": torch.zeros(2)}, "epoch": 7}
        >>> list(mq.models.extract_state_dict(ckpt))
        ['fc.weight', 'fc.bias']
        >>> ckpt["averaged"] = {"n_averaged": torch.tensor(9), "module.fc.weight": torch.ones(2, 4),
        ...                     "module.fc.bias": torch.ones(2)}
        >>> mq.models.extract_state_dict(ckpt)["fc.bias"].tolist()
        [1.0, 1.0]
    """
    if _is_state_dict(obj):
        return _strip_wrapper_prefix(obj)  # type: ignore[arg-type]
    if isinstance(obj, Mapping) and AVERAGED_KEY in obj:
        average = obj[AVERAGED_KEY]
        if not _is_state_dict(average) or AVERAGED_COUNT not in average:
            raise ValueError(
                f"checkpoint has an {AVERAGED_KEY!r} entry but it is not an averaged model's state_dict (with "
                f"{AVERAGED_COUNT!r}): found {_describe(average)}; {ACCEPTED}"
            )
        weights = {k: v for k, v in average.items() if k != AVERAGED_COUNT}
        if not weights or not all(k.startswith(WRAPPER_PREFIX) for k in weights):
            raise ValueError(f"checkpoint's {AVERAGED_KEY!r} entry holds no 'module.' weights: {sorted(weights)[:5]}")
        return _strip_wrapper_prefix(weights)
    if isinstance(obj, Mapping) and MODEL_KEY in obj:
        inner = obj[MODEL_KEY]
        if _is_state_dict(inner):
            return _strip_wrapper_prefix(inner)
        raise ValueError(
            f"checkpoint has a {MODEL_KEY!r} entry but it is not a state_dict: found {_describe(inner)}; {ACCEPTED}"
        )
    raise ValueError(f"not a model checkpoint: found {_describe(obj)}; {ACCEPTED}")


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint file onto the CPU with ``torch.load(weights_only=True)``: tensors and plain containers.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a regular file, empty, not a readable torch checkpoint (corrupt, truncated, another
            format, or objects ``weights_only`` refuses), or bytes changed since written (a zip CRC or the
            digest of :mod:`metaquant.integrity`); the message names ``path``.
        OSError: the file cannot be read (e.g. no permission).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise ValueError(f"checkpoint path is not a file: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"cannot load checkpoint file {p}: the file is empty")
    try:
        data = p.read_bytes()
        try:
            verify_checkpoint_bytes(data, p)  # torch.load does not check the archive's CRCs
        except CheckpointDamagedError as e:
            if not e.truncated:  # complete, with changed bytes: torch.load would load them without a word
                raise
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointDamagedError:
        raise
    except OSError as e:
        raise OSError(f"cannot read checkpoint file {p}: {e}") from e
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        reason = _load_failure_reason(e)
        if "Unsupported global" in reason:
            raise ValueError(
                f"cannot load checkpoint file {p} with torch.load(weights_only=True): it pickles "
                f"objects other than tensors and plain containers ({reason}). If you trust the file, "
                f"load it yourself with torch.load(..., weights_only=False) and pass the result to "
                f"load_weights"
            ) from e
        raise ValueError(
            f"cannot load checkpoint file {p}: not a torch checkpoint, or corrupt or truncated ({reason})"
        ) from e


def _load_failure_reason(error: Exception) -> str:
    """The informative part of a torch.load error, on one line.

    For weights_only failures torch prepends a long generic paragraph; the
    cause is what follows "WeightsUnpickler error:".
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # drop terminal colour codes
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    # "Unsupported global: GLOBAL x.Y was not an allowed global by default. Please use ..."
    first = first.split(". Please", 1)[0]
    return f"{type(error).__name__}: {first}"


def _mismatch_report(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and 'name: checkpoint shape vs model shape' lines."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _listing(what: str, names: list[str]) -> str:
    """E.g. "2 missing keys (a, b)"; at most MAX_LISTED names are shown."""
    shown = ", ".join(names[:MAX_LISTED])
    more = f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    plural = "" if len(names) == 1 else ("es" if what.endswith("h") else "s")
    return f"{len(names)} {what}{plural} ({shown}{more})"


def load_weights(
    model: nn.Module,
    path_or_obj: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
) -> LoadResult:
    """Load checkpoint weights (a file, or a loaded checkpoint in an accepted layout) into ``model`` in place.

    ``strict``: the checkpoint must hold exactly the model's keys; shapes must match either way.

    Raises:
        ValueError: the checkpoint does not fit the model (one message lists the first few missing and
            unexpected keys and shape mismatches), or is not a model checkpoint.
        FileNotFoundError, ValueError, OSError: the file cannot be read (see :func:`read_checkpoint`).
    """
    if isinstance(path_or_obj, (str, os.PathLike)):
        source = f"checkpoint file {Path(path_or_obj)}"
        try:
            state_dict = extract_state_dict(read_checkpoint(path_or_obj))
        except ValueError as e:
            if str(Path(path_or_obj)) in str(e):
                raise
            raise ValueError(f"{source}: {e}") from e  # say which file held the wrong content
    else:
        source = "checkpoint"
        state_dict = extract_state_dict(path_or_obj)

    missing, unexpected, mismatched = _mismatch_report(model, state_dict)
    problems = []
    if strict and missing:
        problems.append(_listing("missing key", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected key", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatch", mismatched))
    if problems:
        raise ValueError(
            f"{source} does not fit {type(model).__name__} (was it saved for another architecture, "
            f"num_classes or in_channels?): " + "; ".join(problems)
        )

    result = model.load_state_dict(state_dict, strict=strict)
    return LoadResult(list(result.missing_keys), list(result.unexpected_keys))
