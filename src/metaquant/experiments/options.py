"""The options of ``metaquant pretrain`` and ``quantize``, made from ``RunConfig``'s fields, and the flag that
each parameter named in a message stands for on the command line.

A field with an option declares its flags, help text and group in its metadata (``config.py``); a parser's
defaults are its task's (``RunConfig.for_task``), so ``--help`` shows what a run gets. The application's messages
name Python parameters between backquotes, as in "`out` model.bin already exists", which the command prints as
"--out model.bin already exists": only a backquoted name is replaced, never a word of the prose around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .config import ACTIVATIONS, META, QUANTIZATION, RunConfig

__all__ = ["OPTION_FIELDS", "add_config_options", "add_dataclass_options", "flag", "parameter_flags", "to_flags"]

#: The fields that are command-line options, in the order of ``--help``.
OPTION_FIELDS = tuple(f for f in dataclasses.fields(RunConfig) if f.metadata.get("flags"))
#: The groups that only ``quantize`` has: a pretrain run quantizes nothing.
QUANTIZE_ONLY = (QUANTIZATION, ACTIVATIONS, META)
_TYPES: dict[Any, type] = {"int": int, "int | None": int, "float": float}
_PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*)`")


def add_config_options(groups: Mapping[str, Any], task: str) -> None:
    """Add the options of ``task``'s fields, with the task's defaults, each to its group: ``groups`` maps the
    group names of the fields' metadata to argparse argument groups."""
    defaults = RunConfig.for_task(task)
    for f in OPTION_FIELDS:
        if task == "quantize" or f.metadata["group"] not in QUANTIZE_ONLY:
            _add(groups[f.metadata["group"]], f, getattr(defaults, f.name))


def add_dataclass_options(parser: argparse.ArgumentParser | Any, defaults: Any) -> None:
    """Add to ``parser`` the option of each field of the dataclass instance ``defaults`` that declares one
    (``config.option``), with the instance's value as its default."""
    for f in dataclasses.fields(defaults):
        if f.metadata.get("flags"):
            _add(parser, f, getattr(defaults, f.name))


def _add(parser: Any, f: dataclasses.Field, default: Any) -> None:
    parser.add_argument(*f.metadata["flags"], dest=f.name, default=default, **_kind(f, default))


def _kind(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    """argparse's keywords for the field ``f``, but its flags and default."""
    options = {key: value for key, value in f.metadata.items() if key not in ("flags", "group")}
    if f.type == "bool":  # a switch to the value that is not the default
        return {**options, "action": "store_false" if default else "store_true"}
    if "const" in options:
        return {**options, "action": "store_const"}
    if default is not None and "(default" not in options["help"]:
        options["help"] += " (default: %(default)s)"
    shown = f"{default:g}" if isinstance(default, float) else str(default)  # 0.001 and 0, not 1e-3 and 0.0
    options["help"] = options["help"].replace("%(default)s", shown)
    if "choices" in options:
        choices = options["choices"]
        options["choices"] = list(choices() if callable(choices) else choices)
        options.setdefault("type", str.lower)  # registry names are case-insensitive
    options.setdefault("type", _TYPES.get(f.type, str))
    return options


def flag(action: argparse.Action) -> str:
    """The spelling of an option in messages: its longest flag (``--batch-size``, not ``-bs``)."""
    return max(action.option_strings, key=len)


def parameter_flags(parsers: Iterable[argparse.ArgumentParser]) -> dict[str, str]:
    """The flag of each parameter that the options of ``parsers`` set, by parameter name (the options' ``dest``:
    a ``RunConfig`` field, or a parameter of the function a command calls, such as ``export_run``'s ``out``)."""
    flags: dict[str, str] = {}
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings:
                flags.setdefault(action.dest, flag(action))
    return flags


def to_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each backquoted parameter name that ``flags`` knows written as its flag: "`out` model.bin
    already exists; choose another `out`" becomes "--out model.bin already exists; choose another --out"."""
    return _PARAMETER.sub(lambda match: flags.get(match.group(1), match.group(0)), message)
