"""The ``metaquant`` command's parser: its commands, and the options of those whose help needs nothing from the
library (``sweep``, ``report``, ``plot``, ``eval``).

This module imports nothing but the standard library, so that ``metaquant --help``, ``--version`` and these
commands' ``--help`` are answered without importing torch (``metaquant_launcher`` runs this file on its own);
``cli.build_parser`` adds the other commands' options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["command_parser", "FULLY_DECLARED"]

#: The commands whose every option this module declares.
FULLY_DECLARED = ("sweep", "report", "plot", "eval")
_PRESETS = Path(__file__).resolve().parent / "presets"  # presets.PRESET_DIR, found without importing the package

_COMMANDS = {  # name: (help, description)
    "pretrain": ("train a full-precision model", "Train a full-precision model and save it as a run directory."),
    "quantize": (
        "quantization training from a pre-trained model",
        "Train a model with quantized weights from a pre-trained one.",
    ),
    "demo": (
        "pre-train ResNet20 on Fashion-MNIST, then 1-bit quantize it with STE and with MetaQuant",
        "The main job: pre-train ResNet20 on a Fashion-MNIST subset, then quantize it to 1 bit with STE and with "
        "MetaQuant (MultiFC), and train the float model on as long with the same recipe as the reference; prints "
        "the accuracies. About ten minutes on two CPU cores with the defaults.",
    ),
    "sweep": (
        "run a grid of quantization runs (models x quantizers x estimators x optimizers x trials)",
        "Run every run of a sweep file (TOML) that is not finished yet, each in its own run directory; finished "
        "runs are skipped, unfinished ones restarted. CONFIG is a file or the name of a preset ({presets}).",
    ),
    "report": (
        "results table (Markdown, CSV) and comparison figures from run directories",
        "Summarize runs found under RUNS (this library's run directories and the original MetaQuant code's logs) "
        "as the paper's table and comparison figures.",
    ),
    "export": (
        "write a quantization run's model as a bit-packed file",
        "Write the model of a quantization run with its weights' integer codes bit-packed (1 bit per weight at 1 "
        "bit), and print its size against the float model's.",
    ),
    "plot": (
        "pictures of what a MetaQuant run's meta quantizer learned",
        "Draw, for a finished MetaQuant run, the function its meta quantizer learned at several epochs next to "
        "STE's (learned-function.png), and each quantized layer's latent weight distribution at the start and the "
        "end (weights.png).",
    ),
    "eval": (
        "test accuracy of a packed file or a run's checkpoint",
        "Compute the test accuracy of an exported packed file or of a run directory's latest checkpoint, on the "
        "run's own test set, and compare it with the accuracy the run recorded.",
    ),
}


def command_parser(
    parser_class: type[argparse.ArgumentParser], version: str
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``metaquant`` parser with every command, and its commands' parsers by name; the options of the
    ``FULLY_DECLARED`` commands are there, the others' are for the caller to add."""
    parser = parser_class(
        prog="metaquant",
        description="Train networks with 1-bit (or k-bit) weights, with MetaQuant's learned gradient through "
        "the quantizer or a classical straight-through estimator.",
    )
    parser.add_argument("--version", action="version", version=f"metaquant {version}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    presets = ", ".join(sorted(p.stem for p in _PRESETS.glob("*.toml")))
    for name, (summary, description) in _COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=description.format(presets=presets))
        command.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = dict(sub.choices)
    _add_sweep(commands["sweep"])
    _add_report(commands["report"])
    _add_plot(commands["plot"])
    _add_eval(commands["eval"])
    return parser, commands


def _add_sweep(sweep: argparse.ArgumentParser) -> None:
    sweep.add_argument("config", help="sweep file or preset name")
    sweep.add_argument(
        "--run-dir", default=None, help="where the runs go (default: the file's run_dir, else runs/<sweep name>)"
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the runs without running them")
    sweep.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="make only the runs whose directory names (or paths) match PATTERN (shell-style, e.g. "
        "'ste-*-trial-1'; repeat for several; --dry-run lists them), and the pre-training runs they start from",
    )
    bars = sweep.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true", help="progress bars within each run (with --jobs 1)")
    bars.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars (the default of a sweep)"
    )
    sweep.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N runs side by side, each in its own process, on the same GPU or sharing the CPU "
        "cores; the results are those of runs one after another (default: 1)",
    )


def _add_report(report: argparse.ArgumentParser) -> None:
    report.add_argument("runs", nargs="+", help="folders to search for runs")
    report.add_argument("--out", default="report", help="output folder (default: report)")
    report.add_argument("--no-figures", dest="figures", action="store_false", help="table only")
    report.add_argument("--overwrite", action="store_true", help="replace the tables and figures already in --out")


def _add_plot(plot: argparse.ArgumentParser) -> None:
    plot.add_argument("run", help="the run directory")
    plot.add_argument("--out", default=None, help="output folder (default: the run directory)")


def _add_eval(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("path", help="a packed .safetensors (or earlier .mqpack) or .onnx file, or a run directory")
    ev.add_argument("--data-dir", default=None, help="where the dataset files are (default: the run's)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ev.add_argument(
        "--from-previous",
        action="store_true",
        help="for a run directory: evaluate its previous checkpoint (checkpoint.prev.pt)",
    )
    ev.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="first recompute the BatchNorm statistics from N batches of the run's training set (default: 0, "
        "the model's own)",
    )
