"""The package's layers, read from the source: ``metaquant`` is the library, ``metaquant.experiments`` the
application on top of it. The library never imports the application, no project module is imported inside a
function (so no import cycle hides there), and the module graph has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metaquant"
APPLICATION = "metaquant.experiments"
#: Third-party packages that only some features need: imported where they are needed, so that the package
#: works without them (the extras ``plot``, ``onnx``, ``vision``).
OPTIONAL = {"matplotlib", "onnx", "onnxruntime", "onnxscript", "torchvision"}
#: ``python -m metaquant`` runs the command line, which is the application's.
ENTRY_POINTS = {"metaquant.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The project modules an ``import from`` statement names (a name of a package may be a module)."""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def _imports(module: str, path: Path, tree: ast.Module, known: set[str]) -> list[tuple[str, ast.stmt]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(name, node) for name in _resolve(module, path, node)]
    return [(name, node) for name, node in found if name in known]


def _nested_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements inside a function or a method (at any depth)."""
    nested = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return nested


SOURCES = _sources()
KNOWN = set(SOURCES)
GRAPH = {
    module: {name for name, _ in _imports(module, path, tree, KNOWN) if name != module}
    for module, (path, tree) in SOURCES.items()
}


def test_the_library_never_imports_the_application():
    offenders = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if not module.startswith(APPLICATION) and module not in ENTRY_POINTS
        for target in targets
        if target.startswith(APPLICATION)
    ]
    assert not offenders, offenders


def test_no_project_module_is_imported_inside_a_function():
    offenders = []
    for module, (path, tree) in SOURCES.items():
        for node in _nested_imports(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([] if not node.level and node.module is None else _resolve(module, path, node))
            )
            project = [n for n in names if n == "metaquant" or n.startswith("metaquant.") or n in KNOWN]
            third_party = {n.split(".")[0] for n in names} - {"metaquant"}
            if project or (isinstance(node, ast.ImportFrom) and node.level):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {names}")
            elif third_party - OPTIONAL:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {sorted(third_party)} lazily")
    assert not offenders, offenders


def test_the_module_graph_has_no_cycle():
    # a package imports its own submodules to re-export them: that is not a cycle through the package
    def edges(module):
        return {t for t in GRAPH[module] if not (module.startswith(t + ".") and SOURCES[t][0].name == "__init__.py")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_importing_the_library_loads_no_application_module():
    code = "import metaquant, sys; print(sorted(m for m in sys.modules if m.startswith('metaquant')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a printed list of strings
    assert "metaquant.algorithm" in loaded and "metaquant.training" in loaded
    assert not [m for m in loaded if m.startswith(APPLICATION)], loaded


def test_the_checks_see_what_they_look_for():
    """The tests above would pass on a parser that finds nothing: make sure they find real imports."""
    assert "metaquant.experiments.config" in GRAPH["metaquant.experiments.lifecycle"]
    assert "metaquant.training" in GRAPH["metaquant.experiments.lifecycle"]
    nested = ast.parse("def f():\n    from .x import y\n    import os\n")
    assert len(_nested_imports(nested)) == 2
