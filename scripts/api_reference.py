"""Write docs/api.md, the API reference, from the docstrings of the public modules.

    python scripts/api_reference.py          # rewrite docs/api.md
    python scripts/api_reference.py --check  # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "metaquant.quantizers", "metaquant.estimators", "metaquant.layers", "metaquant.meta", "metaquant.refine",
    "metaquant.algorithm", "metaquant.trainer", "metaquant.training", "metaquant.schedules", "metaquant.guards",
    "metaquant.config", "metaquant.pipeline", "metaquant.data", "metaquant.models", "metaquant.export",
    "metaquant.distributed", "metaquant.sweep", "metaquant.report", "metaquant.trace", "metaquant.runs",
]
OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def public_members(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python scripts/api_reference.py`; the import name is `metaquant`",
             "(`import metaquant as mq`: the most used names are also at the top level, see `mq.__all__`).",
             "The examples assume `import torch` and `import metaquant as mq`; they run as tests.", ""]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", inspect.cleandoc(module.__doc__ or ""), ""]
        for name, obj in public_members(module):
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = ""
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {name}{signature}`", "", inspect.cleandoc(obj.__doc__ or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/api_reference.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
