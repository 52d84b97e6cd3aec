"""The ``metaquant`` command line: ``pretrain``, ``quantize``, ``demo``, ``sweep``, ``report``, ``export``, ``eval``.

Every option maps onto a ``RunConfig`` field; the configuration validates itself, so the command line and the
Python API refuse the same bad values with the same messages. Bad input exits with status 2 and one line on
stderr, missing data or files with status 1; neither prints a traceback (``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..algorithm import STEP_ORDERS
from ..data import AUGMENTATIONS, DATASETS
from ..data.errors import DatasetError
from ..distributed import is_main, shutdown
from ..guards import NonFiniteError, SkipLimitError, StopFlag, TrainingInterrupted
from ..layout import MEMORY_FORMATS
from ..meta import INIT_SCHEMES, NONLINEARITIES
from ..models import model_names
from ..precision import AMP_MODES
from ..quantizers import quantizer_names
from ..refine import THROUGH
from ..schedules import SCHEDULES
from .artifacts import evaluate_artifact, export_run
from .config import ESTIMATOR_ALIASES, ESTIMATORS, OPTIMIZERS, RunConfig
from .demo import DemoConfig, run_demo
from .lifecycle import describe_checkpoint, execute, resume
from .naming import default_run_name
from .plots import plot_comparisons, plot_trace
from .presets import preset_names, resolve_preset
from .report import collect, summarize, write_table
from .runs import RunDir, RunExistsError, RunLockedError
from .scheduler import run_sweep
from .sweep import load_sweep, plan, run_state, select_runs

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``metaquant quantize: error: ...``), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: error: {message}", EXIT_USAGE)


def _lower(text: str) -> str:
    return text.lower()


def _estimator(text: str) -> str:
    return ESTIMATOR_ALIASES.get(text.lower(), text.lower())


def _add_common(p: argparse.ArgumentParser, *, task: str) -> None:
    default_lr = 0.1 if task == "pretrain" else 1e-3
    data = p.add_argument_group("data and model")
    data.add_argument(
        "-m",
        "--model",
        type=_lower,
        default="resnet20",
        choices=model_names(),
        help="architecture (default: %(default)s)",
    )
    data.add_argument(
        "-d", "--dataset", type=_lower, default="fashion-mnist", choices=DATASETS, help="dataset (default: %(default)s)"
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="where the dataset files are, and only there (default: ~/.cache/metaquant/<dataset>, "
        "and for Fashion-MNIST also /usr/share/datasets/fashion-mnist from the Debian package "
        "dataset-fashion-mnist)",
    )
    data.add_argument(
        "--no-download", dest="download", action="store_false", help="never download a missing dataset; fail instead"
    )
    data.add_argument(
        "--augment",
        choices=("auto", *AUGMENTATIONS),
        default="auto",
        help="training augmentation: auto (the data set's own: crop_flip for CIFAR, none for the others), none, or "
        "crop_flip (pad 4, random crop, random horizontal flip) (default: %(default)s)",
    )
    data.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a fixed, seeded random subset of N examples (default: all)",
    )
    data.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="evaluate on a fixed, seeded random subset of N test examples (default: all)",
    )
    data.add_argument(
        "--subset-seed",
        type=int,
        default=None,
        help="seed of the --train-size subset (default: --seed); fix it to keep the same images across trials",
    )
    data.add_argument("-bs", "--batch-size", type=int, default=128, help="training batch size (default: 128)")
    data.add_argument("--test-batch-size", type=int, default=500, help="evaluation batch size (default: 500)")

    opt = p.add_argument_group("optimization")
    opt.add_argument(
        "-n",
        "--epochs",
        type=int,
        default=10 if task == "pretrain" else 100,
        help="number of epochs (default: %(default)s)",
    )
    opt.add_argument(
        "-o",
        "--optimizer",
        type=_lower,
        default="sgd",
        choices=OPTIMIZERS,
        help="base optimizer (default: %(default)s)",
    )
    opt.add_argument("--lr", type=float, default=default_lr, help="initial learning rate (default: %(default)s)")
    opt.add_argument(
        "--momentum", type=float, default=0.9 if task == "pretrain" else 0.0, help="SGD momentum (default: %(default)s)"
    )
    opt.add_argument("--dampening", type=float, default=0.0, help="SGD dampening (default: 0)")
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    opt.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4 if task == "pretrain" else 0.0,
        help="weight decay (default: %(default)s)",
    )
    opt.add_argument(
        "--lr-schedule",
        type=_lower,
        default="cosine" if task == "pretrain" else "step",
        choices=SCHEDULES,
        help="learning-rate schedule (default: %(default)s)",
    )
    opt.add_argument(
        "-ad",
        "--lr-step",
        type=int,
        default=30,
        help="step schedule: divide the learning rate by 1/--lr-gamma every N epochs (default: 30)",
    )
    opt.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule factor (default: 0.1)")
    opt.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    opt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    opt.add_argument(
        "--memory-format",
        type=_lower,
        default="auto",
        choices=MEMORY_FORMATS,
        help="layout of convolutional models: auto (channels-last for models with 2-D convolutions, "
        "faster on CPU and CUDA), channels-last or contiguous (default: auto)",
    )
    opt.add_argument(
        "--amp",
        type=_lower,
        default="none",
        choices=AMP_MODES,
        help="mixed precision of the forward pass: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a "
        "gradient scaler); weights and the meta quantizer stay float32 (default: none)",
    )
    opt.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: SyncBatchNorm (statistics over the whole batch) instead of each "
        "process's own BatchNorm statistics",
    )
    opt.add_argument(
        "--precise-bn",
        dest="precise_bn_batches",
        type=int,
        default=0,
        metavar="N",
        help="before each evaluation, recompute the BatchNorm statistics for the current weights from the "
        "epoch's first N training batches instead of the running averages (default: 0, off)",
    )
    opt.add_argument(
        "--record-precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="also record each epoch's test accuracy with BatchNorm statistics recomputed from N training "
        "batches (test_acc_precise_bn), on a copy: the run itself is unchanged (default: 0, off)",
    )
    opt.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        metavar="D",
        help="deliver an exponential moving average of the weights (decay D per step, in (0, 1), e.g. 0.999) "
        "instead of the last ones; each test reports both; pair it with --precise-bn (default: 0, off)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--run-dir", default="runs", help="folder that receives the run directory (default: runs)")
    out.add_argument(
        "--name",
        default=None,
        help="run directory name, a plain name inside --run-dir (default: derived from the options)",
    )
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    out.add_argument("--debug", action="store_true", help="show tracebacks")

    rel = p.add_argument_group("reliability")
    rel.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the interrupted run in RUN_DIR from its latest checkpoint, exactly; every other "
        "option is taken from RUN_DIR/config.json",
    )
    rel.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also checkpoint every N steps within an epoch (default: 0, at epoch ends only)",
    )
    rel.add_argument(
        "--skip-nonfinite",
        dest="on_nonfinite",
        action="store_const",
        const="skip",
        default="raise",
        help="skip steps with a non-finite loss, gradient or meta output, or whose update overflows "
        "the weights, instead of stopping (also with --resume)",
    )
    rel.add_argument(
        "--max-skipped",
        type=int,
        default=None,
        metavar="N",
        help="with --skip-nonfinite: stop the run as failed once more than N steps were skipped "
        f"(default: {RunConfig.max_skipped}; also with --resume)",
    )
    rel.add_argument(
        "--from-previous",
        action="store_true",
        help="with --resume: continue from checkpoint.prev.pt when checkpoint.pt is damaged",
    )


def _add_quantization(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quantization")
    q.add_argument(
        "--init",
        default=None,
        help="the weights to start from: pre-trained full-precision weights (a checkpoint, a run directory, or "
        "the original MetaQuant code's state_dict, e.g. ResNet20-CIFAR10-pretrain.pth), or a quantization run "
        "to fine-tune (the weights it delivered: its average with --ema-decay)",
    )
    q.add_argument(
        "-q",
        "--quantizer",
        type=_lower,
        default="dorefa",
        choices=quantizer_names() + ["bwn-f"],
        help="forward quantizer (default: %(default)s)",
    )
    q.add_argument("-bw", "--bits", type=int, default=1, help="bit width (default: 1)")
    q.add_argument(
        "-meta",
        "--estimator",
        type=_estimator,
        default="ste",
        choices=ESTIMATORS,
        help="backward method: a classical estimator (ste, identity, ewgs) or a meta quantizer "
        "(fc-grad, multifc, lstmfc) trained by MetaQuant (default: ste)",
    )
    q.add_argument("--ewgs-delta", type=float, default=1e-3, help="EWGS scaling factor δ (default: 1e-3)")
    q.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        help="knowledge distillation from the --init model (or --teacher): the share λ in [0, 1] of the loss "
        "that matches its softened predictions (default: 0, labels only)",
    )
    q.add_argument(
        "--teacher",
        default=None,
        metavar="CHECKPOINT",
        help="the full-precision model to distil from, a checkpoint or run directory (default: the --init "
        "model); e.g. to fine-tune a quantized run given as --init",
    )
    q.add_argument(
        "--distill-temperature",
        type=float,
        default=4.0,
        help="the temperature T of the distillation, in [0.01, 1000] (default: %(default)s)",
    )

    m = p.add_argument_group("meta quantizer (with --estimator fc-grad, multifc or lstmfc)")
    m.add_argument("-hidden", "--hidden-size", type=int, default=100, help="hidden size (default: 100)")
    m.add_argument(
        "-nfc",
        "--num-fc",
        type=int,
        default=2,
        help="number of FC layers of FC-Grad and MultiFC (default: 2, the paper's)",
    )
    m.add_argument("-nlstm", "--num-lstm", type=int, default=1, help="number of LSTM layers of LSTMFC (default: 1)")
    m.add_argument(
        "-nonlinear",
        "--nonlinearity",
        type=_lower,
        default="none",
        choices=NONLINEARITIES,
        help="non-linearity between the FC layers (default: none)",
    )
    m.add_argument(
        "--meta-lr",
        type=float,
        default=1e-3,
        help="learning rate γ of the meta quantizer's Adam; follows the base schedule (default: 1e-3)",
    )
    m.add_argument(
        "--meta-weight-decay", type=float, default=0.0, help="weight decay of the meta optimizer (default: 0)"
    )
    m.add_argument(
        "--step-order",
        type=_lower,
        default="paper",
        choices=STEP_ORDERS,
        help="paper: Algorithm 1 (default); original: the original code's order, to reproduce its numbers",
    )
    m.add_argument(
        "--through",
        type=_lower,
        default="residual",
        choices=THROUGH,
        help="derivative of the optimizer's update w.r.t. the gradient: residual (identity, the "
        "paper's) or exact (e.g. through the whole Adam update) (default: residual)",
    )
    m.add_argument(
        "--fix-meta",
        action="store_true",
        help="freeze the meta quantizer from --fix-meta-epoch on (with --meta-init: reuse it as is)",
    )
    m.add_argument(
        "--fix-meta-epoch",
        type=int,
        default=None,
        help="first epoch with a frozen meta quantizer, with --fix-meta (default: 0)",
    )
    m.add_argument(
        "--meta-init",
        default=None,
        help="start from a trained meta quantizer: a run directory, its meta.pt or a checkpoint",
    )
    m.add_argument(
        "--meta-init-scheme",
        type=_lower,
        default="paper",
        choices=INIT_SCHEMES,
        help="where the meta quantizer starts: paper (random, the paper's) or ste (a learned correction of "
        "the STE whose last layer starts at zero: the first steps are STE steps) (default: paper)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``metaquant`` argument parser with its subcommands (``pretrain``, ``quantize``, ``demo``, ``sweep``,
    ``report``, ``export``, ``eval``, ``plot``); a usage error becomes a ``CLIError`` with status 2."""
    parser = _Parser(
        prog="metaquant",
        description="Train networks with 1-bit (or k-bit) weights, with MetaQuant's learned gradient through "
        "the quantizer or a classical straight-through estimator.",
    )
    parser.add_argument("--version", action="version", version=f"metaquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> subparser, for _given_options
    pre = sub.add_parser(
        "pretrain",
        help="train a full-precision model",
        description="Train a full-precision model and save it as a run directory.",
    )
    _add_common(pre, task="pretrain")
    quant = sub.add_parser(
        "quantize",
        help="quantization training from a pre-trained model",
        description="Train a model with quantized weights from a pre-trained one.",
    )
    _add_common(quant, task="quantize")
    _add_quantization(quant)
    demo = sub.add_parser(
        "demo",
        help="pre-train ResNet20 on Fashion-MNIST, then 1-bit quantize it with STE and with MetaQuant",
        description="The main job: pre-train ResNet20 on a Fashion-MNIST subset, then quantize it to 1 bit "
        "with STE and with MetaQuant (MultiFC); prints the accuracies. About ten minutes on two "
        "CPU cores with the defaults.",
    )
    defaults = DemoConfig()
    demo.add_argument("--run-dir", default=defaults.run_dir, help="where the three runs go (default: %(default)s)")
    demo.add_argument(
        "--train-size", type=int, default=defaults.train_size, help="training subset (default: %(default)s)"
    )
    demo.add_argument("--test-size", type=int, default=defaults.test_size, help="test subset (default: %(default)s)")
    demo.add_argument(
        "--pretrain-epochs",
        type=int,
        default=defaults.pretrain_epochs,
        help="full-precision epochs (default: %(default)s)",
    )
    demo.add_argument(
        "--quantize-epochs",
        type=int,
        default=defaults.quantize_epochs,
        help="quantization epochs per method (default: %(default)s)",
    )
    demo.add_argument(
        "-bs", "--batch-size", type=int, default=defaults.batch_size, help="batch size (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    demo.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--data-dir", default=None, help="where the Fashion-MNIST files are")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")

    sweep = sub.add_parser(
        "sweep",
        help="run a grid of quantization runs (models x quantizers x estimators x optimizers x trials)",
        description="Run every run of a sweep file (TOML) that is not finished yet, each in its own run "
        "directory; finished runs are skipped, unfinished ones restarted. CONFIG is a file or the "
        f"name of a preset ({', '.join(preset_names())}).",
    )
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
    sweep.add_argument("--progress", action="store_true", help="progress bars within each run (with --jobs 1)")
    sweep.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N runs side by side, each in its own process, on the same GPU or sharing the CPU "
        "cores; the results are those of runs one after another (default: 1)",
    )
    sweep.add_argument("--debug", action="store_true", help="show tracebacks")

    report = sub.add_parser(
        "report",
        help="results table (Markdown, CSV) and comparison figures from run directories",
        description="Summarize runs found under RUNS (this library's run directories and the original "
        "MetaQuant code's logs) as the paper's table and comparison figures.",
    )
    report.add_argument("runs", nargs="+", help="folders to search for runs")
    report.add_argument("--out", default="report", help="output folder (default: report)")
    report.add_argument("--no-figures", dest="figures", action="store_false", help="table only")
    report.add_argument("--debug", action="store_true", help="show tracebacks")

    export = sub.add_parser(
        "export",
        help="write a quantization run's model as a bit-packed file",
        description="Write the model of a quantization run with its weights' integer codes bit-packed (1 bit "
        "per weight at 1 bit), and print its size against the float model's.",
    )
    export.add_argument("run", help="the run directory")
    export.add_argument(
        "--format",
        default="packed",
        choices=["packed", "onnx"],
        help="packed: a safetensors file of bit-packed codes and scales (metaquant.export.load_packed "
        "reads it); onnx: the inference model, BatchNorm folded, with integer weights and "
        "DequantizeLinear (needs the onnx extra) (default: packed)",
    )
    export.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.safetensors or model.onnx)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (never a checkpoint or a file of a run)",
    )
    export.add_argument(
        "--from-previous",
        action="store_true",
        help="export the run's previous checkpoint (checkpoint.prev.pt), e.g. when checkpoint.pt is damaged",
    )
    export.add_argument("--debug", action="store_true", help="show tracebacks")

    plot = sub.add_parser(
        "plot",
        help="pictures of what a MetaQuant run's meta quantizer learned",
        description="Draw, for a finished MetaQuant run, the function its meta quantizer learned at several "
        "epochs next to STE's (learned-function.png), and each quantized layer's latent weight "
        "distribution at the start and the end (weights.png).",
    )
    plot.add_argument("run", help="the run directory")
    plot.add_argument("--out", default=None, help="output folder (default: the run directory)")
    plot.add_argument("--debug", action="store_true", help="show tracebacks")

    ev = sub.add_parser(
        "eval",
        help="test accuracy of a packed file or a run's checkpoint",
        description="Compute the test accuracy of an exported packed file or of a run directory's latest "
        "checkpoint, on the run's own test set, and compare it with the accuracy the run recorded.",
    )
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
    ev.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _export(args: argparse.Namespace) -> int:
    path, size, float_size = export_run(
        args.run, args.out, args.format, overwrite=args.overwrite, from_previous=args.from_previous
    )
    print(f"wrote {path}: {size:,} bytes; float model {float_size:,} bytes; {float_size / size:.1f}x smaller")
    return 0


def _plot(args: argparse.Namespace) -> int:
    written = plot_trace(args.run, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _eval(args: argparse.Namespace) -> int:
    result = evaluate_artifact(
        args.path,
        data_dir=args.data_dir,
        device=args.device,
        from_previous=args.from_previous,
        precise_bn_batches=args.precise_bn,
    )
    recorded = result["recorded"]
    note = f" (the run recorded {recorded:.2f}%)" if recorded is not None else ""
    bn = f", BatchNorm statistics recomputed from {args.precise_bn} training batches" if args.precise_bn else ""
    print(f"{args.path}: test accuracy {result['top1']:.2f}% top-1, {result['top5']:.2f}% top-5{bn}{note}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    try:  # the sweep file is the command's configuration: its mistakes are usage errors
        source = resolve_preset(args.config)
        spec = load_sweep(source)
        root = Path(args.run_dir or spec.run_dir or Path("runs") / spec.name)
        runs = plan(spec, root)
        if not runs:
            raise ValueError(f"sweep file {source} defines no run (a [[grid]] entry has an empty list)")
        selected = runs if args.only is None else select_runs(runs, args.only)
    except UnicodeDecodeError:
        raise CLIError(
            f"metaquant sweep: error: sweep file {args.config} is not a text (TOML) file", EXIT_USAGE
        ) from None
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"metaquant sweep: error: {err}", EXIT_USAGE) from None
    if args.dry_run:
        chosen = {run.path for run in selected}
        for i, run in enumerate(runs, 1):
            if run.path in chosen:
                print(f"[{i}] {run.path} ({run_state(run.path, run.config)})")
        return 0
    if args.jobs < 1:
        raise CLIError(f"metaquant sweep: error: --jobs must be at least 1, got {args.jobs}", EXIT_USAGE)
    with StopFlag().installed(exiting=True) as stop:
        try:
            run_sweep(spec, root, progress=args.progress, echo=print, stop=stop, jobs=args.jobs, only=args.only)
        except TrainingInterrupted as err:
            raise CLIError(f"metaquant: {err}; continue with the same command", 128 + err.signum) from None
    what = f"sweep {spec.name}" if args.only is None else f"the {len(selected)} selected run(s) of sweep {spec.name}"
    print(f"{what} finished; summarize it with: metaquant report {root}")
    return 0


def _report(args: argparse.Namespace) -> int:
    trials = collect(args.runs)
    rows = summarize(trials)
    out = Path(args.out)
    md, csv_path = write_table(rows, out)
    print(md.read_text())
    written = [md, csv_path]
    if args.figures:
        try:
            written += plot_comparisons(trials, out)
        except ImportError as err:  # the table is the report; the figures are the plot extra's
            print(f"metaquant report: no figures: {err}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _demo(args: argparse.Namespace) -> int:
    fields = {f: getattr(args, f) for f in DemoConfig.__dataclass_fields__}
    try:  # the options are the command's configuration: their mistakes are usage errors
        demo = DemoConfig(**fields)
    except (ValueError, TypeError) as err:
        raise CLIError(f"metaquant demo: error: {err}", EXIT_USAGE) from None
    with StopFlag().installed(exiting=True) as stop:
        try:
            results = run_demo(demo, progress=args.progress, stop=stop)
        except TrainingInterrupted as err:
            raise CLIError(f"metaquant: {err}; continue with the same command", 128 + err.signum) from None
    print(f"\nResNet20 on Fashion-MNIST ({args.train_size} training / {args.test_size} test images):")
    rows = {
        "full precision": f"float weights, SGD + momentum, {args.pretrain_epochs} epochs",
        "STE": f"1-bit DoReFa from it, clipped STE, Adam + cosine, {args.quantize_epochs} epochs",
        "MetaQuant (MultiFC)": "1-bit DoReFa from it, MultiFC meta quantizer, same recipe",
    }
    print(f"{'method':<20} {'final acc':>10} {'best acc':>9}  {'what it is':<62} run directory")
    for name, result in results.items():
        print(
            f"{name:<20} {result.final_acc:>9.2f}% {result.best_acc:>8.2f}%  {rows.get(name, ''):<62} {result.run_dir}"
        )
    fp = results["full precision"].final_acc
    quantized = max(r.final_acc for name, r in results.items() if name != "full precision")
    gap = quantized - fp
    where = f"{abs(gap):.2f} points {'above' if gap > 0 else 'under'}" if gap else "level with"
    print(
        f"\nThe better 1-bit model is {where} its full-precision model. The comparison "
        "under the paper's protocols (3 trials, whole data set):\n  metaquant sweep fashion-mnist-full   "
        "(results: docs/results/README.md)"
    )
    return 0


_NOT_CONFIG = {
    "command",
    "run_dir",
    "name",
    "progress",
    "debug",
    "fix_meta",
    "fix_meta_epoch",
    "resume",
    "from_previous",
}
# What may accompany --resume: how to continue, never what the run is (that is the run's config.json).
_WITH_RESUME = {"command", "resume", "progress", "debug", "on_nonfinite", "max_skipped", "from_previous"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated ``RunConfig`` of parsed ``pretrain``/``quantize`` options (``ValueError`` names a bad one)."""
    fields = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if fields.get("max_skipped") is None:
        fields.pop("max_skipped", None)  # RunConfig's default
    if getattr(args, "fix_meta", False):
        fields["freeze_meta_epoch"] = args.fix_meta_epoch or 0
    return RunConfig(task=args.command, **fields)


def _given_options(argv: Sequence[str] | None, command: str) -> dict[str, str]:
    """The options the user typed (dest -> its long spelling), told apart from defaults by parsing again with
    every default suppressed; abbreviations and ``--opt=value`` are recognised as argparse does."""
    parser = build_parser()
    sub = parser.commands[command]  # type: ignore[attr-defined]
    spelling = {}
    for action in sub._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            spelling[action.dest] = max(action.option_strings, key=len) if action.option_strings else action.dest
    given = vars(parser.parse_args(argv))
    return {dest: spelling.get(dest, dest) for dest in given if dest != "command"}


def _check_name(command: str, name: str | None) -> None:
    if name is None:
        return
    separators = sorted({os.sep, os.altsep or os.sep})
    if name in ("", ".", "..") or any(sep in name for sep in separators):
        raise CLIError(
            f"metaquant {command}: error: --name {name!r} must be a plain directory name (no "
            f"{' or '.join(repr(s) for s in sorted(separators))}, not '.' or '..'); choose the folder "
            "with --run-dir",
            EXIT_USAGE,
        )


def _write_failure(err: OSError, command: str, run_dir: Path) -> str:
    """One line for a file that could not be written during a run, saying what is intact and how to go on."""
    what = f"cannot write {err.filename}: {err.strerror}" if err.filename else str(err)
    if not (run_dir / "config.json").exists():
        return f"metaquant: error: {what}; nothing of the run was written"
    intact = describe_checkpoint(run_dir / "checkpoint.pt")
    saved = f"the checkpoint {intact} is intact" if intact else "no checkpoint was written yet"
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    return f"metaquant: error: {what}; {saved}: {fix}, then continue with: metaquant {command} --resume {run_dir}"


def _run(argv: Sequence[str] | None, process: _Process) -> int:
    args = build_parser().parse_args(argv)
    commands = {"demo": _demo, "sweep": _sweep, "report": _report, "export": _export, "eval": _eval, "plot": _plot}
    if args.command in commands:
        return commands[args.command](args)
    usage = f"metaquant {args.command}: error:"
    if args.resume:
        given = _given_options(argv, args.command)
        extra = sorted(spelling for dest, spelling in given.items() if dest not in _WITH_RESUME)
        if extra:
            raise CLIError(
                f"{usage} {', '.join(extra)} cannot be given with --resume: a resumed run takes its "
                f"options from {Path(args.resume) / 'config.json'} (with --resume only --skip-nonfinite, "
                "--max-skipped, --from-previous, --no-progress and --debug apply)",
                EXIT_USAGE,
            )
        saved = RunDir(args.resume).config() if RunDir(args.resume).config_path.exists() else None
        task = saved.task if saved is not None else args.command
        if task != args.command:
            raise CLIError(
                f"{usage} {args.resume} is a {task} run; use 'metaquant {task} --resume {args.resume}'", EXIT_USAGE
            )
        overrides = {
            "on_nonfinite": args.on_nonfinite if "on_nonfinite" in given else None,
            "max_skipped": args.max_skipped,
        }
        policy = overrides["on_nonfinite"] or (saved.on_nonfinite if saved is not None else "raise")
        if args.max_skipped is not None and policy != "skip":
            raise CLIError(
                f"{usage} --max-skipped needs --skip-nonfinite (the run in {args.resume} stops at the "
                "first non-finite step)",
                EXIT_USAGE,
            )
        run_dir = Path(args.resume)
    else:
        if args.from_previous:
            raise CLIError(f"{usage} --from-previous needs --resume RUN_DIR", EXIT_USAGE)
        if args.max_skipped is not None and args.on_nonfinite != "skip":
            raise CLIError(
                f"{usage} --max-skipped needs --skip-nonfinite (without it the run stops at the first non-finite step)",
                EXIT_USAGE,
            )
        if getattr(args, "fix_meta_epoch", None) is not None and not args.fix_meta:
            raise CLIError(
                f"{usage} --fix-meta-epoch needs --fix-meta (it says from which epoch on the meta quantizer is frozen)",
                EXIT_USAGE,
            )
        _check_name(args.command, args.name)
        try:
            config = config_from_args(args)
        except (ValueError, TypeError) as err:
            raise CLIError(f"{usage} {err}", EXIT_USAGE) from None
        run_dir = Path(args.run_dir) / (args.name or default_run_name(config))
    clean = False
    try:
        with StopFlag().installed(exiting=True) as stop:
            if args.resume:
                result = resume(
                    run_dir, progress=args.progress, stop=stop, from_previous=args.from_previous, **overrides
                )
            else:
                result = execute(config, run_dir, progress=args.progress, stop=stop)
        clean, reporter = True, is_main()  # asked while the process group still exists
    except TrainingInterrupted as err:
        raise CLIError(
            f"metaquant: {err}; continue with: metaquant {args.command} --resume {run_dir}", 128 + err.signum
        ) from None
    except SkipLimitError as err:
        raise CLIError(
            f"metaquant: error: {err}; to allow more skipped steps, continue with: metaquant "
            f"{args.command} --resume {run_dir} --max-skipped N"
        ) from None
    except NonFiniteError as err:
        raise CLIError(
            f"metaquant: error: {err}; to skip such steps, continue with: metaquant {args.command} "
            f"--resume {run_dir} --skip-nonfinite"
        ) from None
    except RunLockedError as err:
        raise CLIError(f"metaquant: error: {err}") from None
    except OSError as err:
        if isinstance(err, FileNotFoundError) or err.errno not in _WRITE_ERRORS:
            raise
        raise CLIError(_write_failure(err, args.command, run_dir)) from None
    finally:
        process.left_group = shutdown(clean=clean) or process.left_group
    if reporter:
        print(
            f"{args.command} finished: final test accuracy {result.final_acc:.2f}%, best {result.best_acc:.2f}% "
            f"({result.epochs} epochs); run directory {result.run_dir}"
        )
    return 0


# Errors of writing a file: the run's files stay intact (every write is atomic), so the run can continue.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _ignore_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


@dataclass
class _Process:
    """What one call of ``main`` learns about its process: whether it joined and left a torchrun process group
    (``main`` then ends the process itself)."""

    left_group: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``metaquant`` program: run the command in ``argv`` (default ``sys.argv[1:]``), return its exit status.

    A torchrun worker (a process that joined a process group) does not return: once every file is written and
    the output flushed, it ends with its status at once. The interpreter's own teardown would add nothing but
    the destruction of gloo's native threads, which can abort a process that has finished all its work
    (SIGABRT, "terminate called without an active exception") and turn a complete run into a failed job.
    """
    process = _Process()
    status = _main(argv, process)
    if process.left_group:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


def _main(argv: Sequence[str] | None, process: _Process) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("metaquant").setLevel(logging.INFO)  # our progress; other libraries: warnings only
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        status = _run(argv, process)
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, in the handlers below, not at exit
        return status
    except BrokenPipeError:
        # Whoever read the output stopped reading (e.g. `metaquant sweep NAME --dry-run | head`): nothing is left
        # to tell it. Status 141 as for a program ended by SIGPIPE; stdout goes nowhere, so that the
        # interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except CLIError as err:
        print(err, file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        _ignore_stop_signals()  # a second Ctrl-C while this prints must not end in a traceback
        print("metaquant: interrupted", file=sys.stderr)
        return 130
    except (
        RunExistsError,
        DatasetError,
        FileNotFoundError,
        ValueError,
        TypeError,
        ImportError,
        OSError,
        NonFiniteError,
        RunLockedError,
    ) as err:
        if debug:
            raise
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            print(f"metaquant: error: {err.filename}: {err.strerror}", file=sys.stderr)  # not "[Errno 28] ..."
        else:
            print(f"metaquant: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # a failure nobody foresaw: still one line, and --debug shows where
        if debug:
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(
            f"metaquant: error: unexpected {type(err).__name__}: {first_line} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
