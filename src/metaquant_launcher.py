"""The ``metaquant`` command's entry point, light enough to answer at once.

``metaquant --help``, ``metaquant --version`` and the ``--help`` of the commands whose options need nothing from
the library are answered from ``metaquant/experiments/commands.py`` alone, without importing torch; everything
else goes to ``metaquant.experiments.cli``. Ctrl-C at any moment, while the library loads included, ends the
command with status 130 and a line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import os
import runpy
import signal
import sys
from pathlib import Path

__all__ = ["main"]

_PACKAGE = Path(__file__).resolve().parent / "metaquant"
EXIT_INTERRUPTED = 128 + signal.SIGINT


class _NotHelp(Exception):
    """The arguments ask for more than help or the version: the full command line answers them."""


class _HelpParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _NotHelp(message)


def _version() -> str:
    """``metaquant.__version__``, read from the source as the build reads it, without importing the package."""
    tree = ast.parse((_PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise RuntimeError(f"{_PACKAGE / '__init__.py'} sets no __version__")


def _answer_help(argv: list[str]) -> None:
    """Print the help or the version that ``argv`` asks for and exit, when the light parser knows it all."""
    commands = runpy.run_path(str(_PACKAGE / "experiments" / "commands.py"))
    if argv and not argv[0].startswith("-") and argv[0] not in commands["FULLY_DECLARED"]:
        return  # another command's options come from the library
    parser, _ = commands["command_parser"](_HelpParser, _version())
    try:
        parser.parse_args(argv)  # exits after --help or --version
    except _NotHelp:
        pass


def _end_now(signum: int, frame: object) -> None:
    # While the library loads there is nothing to save, and a KeyboardInterrupt could be swallowed by an
    # import's own `except:`; so a Ctrl-C then ends the process at once.
    os.write(2, b"metaquant: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    """The ``metaquant`` command, with the arguments in ``sys.argv``: never returns."""
    args = sys.argv[1:]
    signal.signal(signal.SIGINT, _end_now)
    if "-h" in args or "--help" in args or "--version" in args:
        _answer_help(args)
    # the full command line, with torch and the library: loaded once it is needed
    cli = runpy.run_module("metaquant.experiments.cli", alter_sys=True)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status: str | int | None = cli["run_program"](args)
    except SystemExit as done:
        status = done.code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while this prints must not end in a traceback
        print("metaquant: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command has finished: nothing left to interrupt
    sys.exit(status)
