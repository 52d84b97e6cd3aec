"""Write docs/api.md, the API reference, from the docstrings of the public modules.

python scripts/api_reference.py          # rewrite docs/api.md
python scripts/api_reference.py --check  # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

MODULES = [
    "metaquant.quantizers",
    "metaquant.activations",
    "metaquant.estimators",
    "metaquant.layers",
    "metaquant.layout",
    "metaquant.precision",
    "metaquant.meta",
    "metaquant.refine",
    "metaquant.algorithm",
    "metaquant.trainer",
    "metaquant.direct_uses",
    "metaquant.training",
    "metaquant.loop",
    "metaquant.callbacks",
    "metaquant.distill",
    "metaquant.batchnorm",
    "metaquant.averaging",
    "metaquant.schedules",
    "metaquant.guards",
    "metaquant.data",
    "metaquant.models",
    "metaquant.export",
    "metaquant.distributed",
    "metaquant.files",
    "metaquant.integrity",
    "metaquant.validation",
    "metaquant.experiments",
    "metaquant.experiments.config",
    "metaquant.experiments.runs",
    "metaquant.experiments.lifecycle",
    "metaquant.experiments.builders",
    "metaquant.experiments.artifacts",
    "metaquant.experiments.meta_files",
    "metaquant.experiments.naming",
    "metaquant.experiments.sweep",
    "metaquant.experiments.scheduler",
    "metaquant.experiments.equivalent",
    "metaquant.experiments.report",
    "metaquant.experiments.tables",
    "metaquant.experiments.paired",
    "metaquant.experiments.trace",
    "metaquant.experiments.plots",
]
#: What needs a runnable example: the library's public API (``metaquant.__all__``) and the export module, whose
#: file formats users read with other tools. The rest says in words what it does; workflows are in the guide.
EXAMPLES = ["metaquant", "metaquant.export"]
OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def public_members(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


class _Written(str):
    """An annotation as the source writes it: ``inspect`` shows it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _as_written(annotation: object) -> object:
    if annotation is inspect.Parameter.empty:
        return annotation
    if isinstance(annotation, str):
        return _Written(annotation)
    if isinstance(annotation, typing.ForwardRef):  # NamedTuple fields under postponed evaluation
        return _Written(annotation.__forward_arg__)
    return _Written(inspect.formatannotation(annotation))


def signature(obj: Any) -> str:
    """``obj``'s signature with its annotations as written in the source (``Tensor``, not ``ForwardRef('Tensor')``
    or ``'Tensor'``), and without a class's ``-> None``; empty when it has none."""
    try:
        sig = inspect.signature(obj, eval_str=False)
    except (TypeError, ValueError):
        return ""
    parameters = [p.replace(annotation=_as_written(p.annotation)) for p in sig.parameters.values()]
    returns = inspect.Signature.empty if inspect.isclass(obj) else _as_written(sig.return_annotation)
    return str(sig.replace(parameters=parameters, return_annotation=returns))


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/api_reference.py`; the import name is `metaquant`",
        "(`import metaquant as mq`: the most used names are also at the top level, see `mq.__all__`).",
        "The examples assume `import torch` and `import metaquant as mq`; they run as tests.",
        "",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", inspect.cleandoc(module.__doc__ or ""), ""]
        for name, obj in public_members(module):
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {name}{signature(obj)}`", "", inspect.cleandoc(obj.__doc__ or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "\x00" in text:  # e.g. a "\0" in a docstring that is not a raw string
        print('a docstring holds a NUL character; make it a raw string (r"""...""")')
        return 1
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
