"""The ``metaquant`` command line: ``pretrain``, ``quantize``, ``demo``, ``sweep``, ``report``, ``export``, ``eval``.

The options of ``pretrain`` and ``quantize`` are ``RunConfig``'s fields (``options.py`` makes them from the fields'
metadata) with the defaults of ``RunConfig.for_task``; the configuration validates itself, so the command line
and the Python API refuse the same bad values with the same messages, and the parameters that messages name are
printed as their flags. Bad input exits with status 2 and one line on stderr, missing data or files with
status 1; neither prints a traceback (``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..data.errors import DatasetError
from ..distributed import is_main, shutdown
from ..guards import NonFiniteError, SkipLimitError, StopFlag, TrainingInterrupted
from .allocator import reuse_freed_memory
from .artifacts import evaluate_artifact, export_run
from .commands import command_parser
from .config import ACTIVATIONS, DATA, META, OPTIMIZATION, QUANTIZATION, RELIABILITY, RunConfig
from .demo import DemoConfig, run_demo
from .lifecycle import RunResult, describe_checkpoint, execute, resume
from .naming import default_run_name
from .options import OPTION_FIELDS, add_config_options, add_dataclass_options, flag, parameter_flags, to_flags
from .paired import paired_differences
from .plots import plot_comparisons, plot_trace
from .presets import resolve_preset
from .report import collect, summarize, told_apart
from .runs import RunDir, RunExistsError, RunLockedError
from .scheduler import run_sweep
from .sweep import load_sweep, plan, run_state, select_runs
from .tables import OPTIONAL_TABLES, write_paired_table, write_precise_table, write_table

__all__ = ["main", "run_program", "build_parser"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE, *, printed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.printed = printed  # said already (by every process of a group, before they left it together)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``metaquant quantize: error: ...``), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: error: {message}", EXIT_USAGE)


def _add_run_options(p: argparse.ArgumentParser, *, task: str) -> None:
    """``RunConfig``'s options (``options.py``), then those of the command itself."""
    groups = {group: p.add_argument_group(group) for group in (DATA, OPTIMIZATION, "output", RELIABILITY)}
    if task == "quantize":
        groups[QUANTIZATION] = p.add_argument_group(QUANTIZATION)
        groups[ACTIVATIONS] = p.add_argument_group(ACTIVATIONS)
        groups[META] = p.add_argument_group(f"{META} (with --estimator fc-grad, multifc or lstmfc)")
    add_config_options(groups, task)
    out = groups["output"]
    out.add_argument("--run-dir", default="runs", help="folder that receives the run directory (default: runs)")
    out.add_argument(
        "--name",
        default=None,
        help="run directory name, a plain name inside --run-dir (default: derived from the options)",
    )
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    groups[RELIABILITY].add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the interrupted run in RUN_DIR from its latest checkpoint, exactly; every other "
        "option is taken from RUN_DIR/config.json",
    )
    groups[RELIABILITY].add_argument(
        "--from-previous",
        action="store_true",
        help="with --resume: continue from checkpoint.prev.pt when checkpoint.pt is damaged",
    )
    if task == "quantize":
        groups[META].add_argument(
            "--fix-meta",
            action="store_true",
            help="freeze the meta quantizer from --fix-meta-epoch on (with --meta-init: reuse it as is)",
        )
        groups[META].add_argument(
            "--fix-meta-epoch",
            type=int,
            default=None,
            help="first epoch with a frozen meta quantizer, with --fix-meta (default: 0)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``metaquant`` argument parser with its subcommands (``pretrain``, ``quantize``, ``demo``, ``sweep``,
    ``report``, ``export``, ``eval``, ``plot``); a usage error becomes a ``CLIError`` with status 2."""
    parser, commands = command_parser(_Parser, __version__)
    parser.commands = commands  # type: ignore[attr-defined]  # name -> subparser
    _add_run_options(commands["pretrain"], task="pretrain")
    _add_run_options(commands["quantize"], task="quantize")
    _add_demo(commands["demo"])
    _add_export(commands["export"])
    return parser


def _add_demo(demo: argparse.ArgumentParser) -> None:
    add_dataclass_options(demo, DemoConfig())
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_export(export: argparse.ArgumentParser) -> None:
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
    export.add_argument(
        "--opset",
        type=int,
        default=None,
        metavar="N",
        help="with --format onnx: the ONNX opset, at least 13; 21 stores the weights as INT4, 25 as INT2 for 1-bit "
        "and ternary weights (default: 21)",
    )


def _export(args: argparse.Namespace) -> int:
    path, size, float_size = export_run(
        args.run, args.out, args.format, overwrite=args.overwrite, from_previous=args.from_previous, opset=args.opset
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
    bn = ""
    if args.precise_bn:  # what was read: the training set may hold fewer batches than asked
        used, examples = result["precise_bn_batches"], result["precise_bn_examples"]
        short = (
            f"; --precise-bn asked for {args.precise_bn}, the training set has no more"
            if used < args.precise_bn
            else ""
        )
        bn = (
            f", BatchNorm statistics recomputed from {used} training batches ({examples} examples{short})"
            if used
            else ", no BatchNorm statistics to recompute"  # a model without BatchNorm reads no batch
        )
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
    out = Path(args.out)
    taken = [p.name for p in (out / "results.md", out / "results.csv") if p.exists()]
    if taken and not args.overwrite:
        raise CLIError(
            f"metaquant report: error: --out {out} already holds a table ({', '.join(taken)}); choose another "
            "--out, or replace it with --overwrite"
        )
    trials = told_apart(collect(args.runs))  # the figures name experiments as the table does
    rows = summarize(trials)
    md, csv_path = write_table(rows, out)
    print(md.read_text())
    written = [md, csv_path]
    for optional in (write_precise_table(rows, out), write_paired_table(paired_differences(trials), out)):
        if optional:
            print(optional[0].read_text())
            written += optional
    for stale in (out / f"{stem}.{ext}" for stem in OPTIONAL_TABLES for ext in ("md", "csv")):
        if stale not in written:  # a table of the runs reported before, which these runs do not make
            stale.unlink(missing_ok=True)
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
    recipe = f"Adam + cosine, {args.quantize_epochs} epochs"
    rows = {
        "full precision": f"float weights, SGD + momentum, {args.pretrain_epochs} epochs",
        "full precision, tuned": f"float weights from it, {recipe}: the reference",
        "STE": f"1-bit DoReFa from it, clipped STE, {recipe}",
        "MetaQuant (MultiFC)": "1-bit DoReFa from it, MultiFC (STE start), same recipe",
    }
    print(f"{'method':<22} {'final acc':>10} {'best acc':>9}  {'what it is':<58} run directory")
    for name, result in results.items():
        print(
            f"{name:<22} {result.final_acc:>9.2f}% {result.best_acc:>8.2f}%  {rows.get(name, ''):<58} {result.run_dir}"
        )
    print("\n" + _demo_verdict(results) + " The comparison under the paper's protocols (3 trials, whole data set):")
    print("  metaquant sweep fashion-mnist-full   (results: docs/results/README.md)")
    return 0


def _demo_verdict(results: dict[str, RunResult]) -> str:
    """The better 1-bit model against the float model of the same training (not against its shorter start)."""
    name, best = max(
        ((n, r) for n, r in results.items() if not n.startswith("full precision")), key=lambda x: x[1].final_acc
    )
    gap = best.final_acc - results["full precision, tuned"].final_acc
    where = f"{abs(gap):.2f} points {'above' if gap > 0 else 'under'}" if gap else "level with"
    return (
        f"The better 1-bit model ({name}) is {where} the float model trained as long from the same start with "
        "the same recipe (full precision, tuned)."
    )


# What may accompany --resume: how to continue, never what the run is (that is the run's config.json).
_WITH_RESUME = {"command", "resume", "progress", "debug", "on_nonfinite", "max_skipped", "from_previous"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated ``RunConfig`` of parsed ``pretrain``/``quantize`` options (``ValueError`` names a bad one)."""
    fields = {f.name: getattr(args, f.name) for f in OPTION_FIELDS if hasattr(args, f.name)}
    if getattr(args, "fix_meta", False):
        fields["freeze_meta_epoch"] = args.fix_meta_epoch or 0
    return RunConfig.for_task(args.command, **fields)


def _given_options(argv: Sequence[str] | None, command: str) -> dict[str, str]:
    """The options the user typed (dest -> its long spelling), told apart from defaults by parsing again with
    every default suppressed; abbreviations and ``--opt=value`` are recognised as argparse does."""
    parser = build_parser()
    sub = parser.commands[command]  # type: ignore[attr-defined]
    spelling = {}
    for action in sub._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            spelling[action.dest] = flag(action) if action.option_strings else action.dest
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
    parser = build_parser()
    args = parser.parse_args(argv)
    process.flags = parameter_flags(parser.commands.values())  # type: ignore[attr-defined]
    commands = {"demo": _demo, "sweep": _sweep, "report": _report, "export": _export, "eval": _eval, "plot": _plot}
    if args.command in commands:
        return commands[args.command](args)
    given = _given_options(argv, args.command)
    if args.resume:
        process.flags["run_dir"] = "--resume"  # the run directory that resume() is given
        return _make_run(args, None, Path(args.resume), _resume_overrides(args, given), process)
    config = _new_config(args, given)
    process.flags["run_dir"] = "--name or --run-dir"  # the run directory that execute() is given
    return _make_run(args, config, Path(args.run_dir) / (args.name or default_run_name(config)), {}, process)


def _resume_overrides(args: argparse.Namespace, given: dict[str, str]) -> dict[str, Any]:
    """What ``--resume`` changes of the run's own options, after checking that nothing else was given."""
    usage = f"metaquant {args.command}: error:"
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
    overrides = {name: getattr(args, name) if name in given else None for name in ("on_nonfinite", "max_skipped")}
    policy = overrides["on_nonfinite"] or (saved.on_nonfinite if saved is not None else "raise")
    if overrides["max_skipped"] is not None and policy != "skip":
        raise CLIError(
            f"{usage} --max-skipped needs --skip-nonfinite (the run in {args.resume} stops at the "
            "first non-finite step)",
            EXIT_USAGE,
        )
    return overrides


def _new_config(args: argparse.Namespace, given: dict[str, str]) -> RunConfig:
    """The configuration of a new run, refusing options that only apply to another one."""
    usage = f"metaquant {args.command}: error:"
    if args.from_previous:
        raise CLIError(f"{usage} --from-previous needs --resume RUN_DIR", EXIT_USAGE)
    if "max_skipped" in given and args.on_nonfinite != "skip":
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
        return config_from_args(args)
    except (ValueError, TypeError) as err:
        raise CLIError(f"{usage} {err}", EXIT_USAGE) from None


def _make_run(
    args: argparse.Namespace,
    config: RunConfig | None,
    run_dir: Path,
    overrides: dict[str, Any],
    process: _Process,
) -> int:
    """Execute ``config`` in ``run_dir``, or resume the run there (``config`` None), and report the outcome."""
    clean = False
    try:
        with StopFlag().installed(exiting=True) as stop:
            if config is None:
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
    except (SkipLimitError, NonFiniteError) as err:
        # Every process meets these at the same step (the checks are collective): each says so, then they leave
        # together (a barrier), so that torchrun, which stops the others once one has exited, stops none unsaid.
        failure = CLIError(
            f"metaquant: error: {err}; to allow more skipped steps, continue with: metaquant "
            f"{args.command} --resume {run_dir} --max-skipped N"
            if isinstance(err, SkipLimitError)
            else f"metaquant: error: {err}; to skip such steps, continue with: metaquant {args.command} "
            f"--resume {run_dir} --skip-nonfinite",
            printed=True,
        )
        print(to_flags(str(failure), process.flags), file=sys.stderr, flush=True)
        clean = True
        raise failure from None
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
    (``main`` then ends the process itself), and the flag of each parameter that its messages may name."""

    left_group: bool = False
    flags: dict[str, str] = field(default_factory=dict)


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


def run_program(argv: Sequence[str] | None = None) -> int:
    """``main`` as the ``metaquant`` program runs it, in a process of its own: with glibc keeping freed memory for
    the next step's large tensors (``allocator.reuse_freed_memory``), a setting of the whole process."""
    reuse_freed_memory()
    return main(argv)


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
        if not err.printed:
            print(to_flags(str(err), process.flags), file=sys.stderr)
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
            print(f"metaquant: error: {to_flags(str(err), process.flags)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # a failure nobody foresaw: still one line, and --debug shows where
        if debug:
            raise
        first_line = (to_flags(str(err), process.flags).strip().splitlines() or [""])[0]
        print(
            f"metaquant: error: unexpected {type(err).__name__}: {first_line} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_program())
