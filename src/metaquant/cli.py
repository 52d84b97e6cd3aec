"""The ``metaquant`` command line: ``pretrain`` and ``quantize``.

Every option maps onto a ``RunConfig`` field; the configuration validates itself, so the command line and the
Python API refuse the same bad values with the same messages. Bad input exits with status 2 and one line on
stderr, missing data or files with status 1; neither prints a traceback (``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .algorithm import STEP_ORDERS
from .config import ESTIMATOR_ALIASES, ESTIMATORS, OPTIMIZERS, RunConfig
from .meta import NONLINEARITIES
from .refine import THROUGH
from .data import DATASETS
from .data.errors import DatasetError
from .models import model_names
from .pipeline import default_run_name, execute
from .quantizers import quantizer_names
from .runs import RunExistsError
from .schedules import SCHEDULES

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
    data.add_argument("-m", "--model", type=_lower, default="resnet20", choices=model_names(),
                      help="architecture (default: %(default)s)")
    data.add_argument("-d", "--dataset", type=_lower, default="fashion-mnist", choices=DATASETS,
                      help="dataset (default: %(default)s)")
    data.add_argument("--data-dir", default=None,
                      help="where the dataset files are (Fashion-MNIST is also found in /usr/share/datasets/"
                           "fashion-mnist from the Debian package dataset-fashion-mnist)")
    data.add_argument("--no-download", dest="download", action="store_false",
                      help="never download a missing dataset; fail instead")
    data.add_argument("--train-size", type=int, default=None,
                      help="train on a fixed, seeded random subset of N examples (default: all)")
    data.add_argument("--test-size", type=int, default=None,
                      help="evaluate on a fixed, seeded random subset of N test examples (default: all)")
    data.add_argument("-bs", "--batch-size", type=int, default=128, help="training batch size (default: 128)")
    data.add_argument("--test-batch-size", type=int, default=500, help="evaluation batch size (default: 500)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("-n", "--epochs", type=int, default=10 if task == "pretrain" else 100,
                     help="number of epochs (default: %(default)s)")
    opt.add_argument("-o", "--optimizer", type=_lower, default="sgd", choices=OPTIMIZERS,
                     help="base optimizer (default: %(default)s)")
    opt.add_argument("--lr", type=float, default=default_lr, help="initial learning rate (default: %(default)s)")
    opt.add_argument("--momentum", type=float, default=0.9 if task == "pretrain" else 0.0,
                     help="SGD momentum (default: %(default)s)")
    opt.add_argument("--dampening", type=float, default=0.0, help="SGD dampening (default: 0)")
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    opt.add_argument("--weight-decay", type=float, default=5e-4 if task == "pretrain" else 0.0,
                     help="weight decay (default: %(default)s)")
    opt.add_argument("--lr-schedule", type=_lower, default="cosine" if task == "pretrain" else "step",
                     choices=SCHEDULES, help="learning-rate schedule (default: %(default)s)")
    opt.add_argument("-ad", "--lr-step", type=int, default=30,
                     help="step schedule: divide the learning rate by 1/--lr-gamma every N epochs (default: 30)")
    opt.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule factor (default: 0.1)")
    opt.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    opt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    out = p.add_argument_group("output")
    out.add_argument("--run-dir", default="runs", help="folder that receives the run directory (default: runs)")
    out.add_argument("--name", default=None, help="run directory name (default: derived from the options)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    out.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_quantization(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quantization")
    q.add_argument("--init", default=None,
                   help="pre-trained full-precision weights: a checkpoint, a run directory, or the original "
                        "MetaQuant code's state_dict (e.g. ResNet20-CIFAR10-pretrain.pth)")
    q.add_argument("-q", "--quantizer", type=_lower, default="dorefa", choices=quantizer_names() + ["bwn-f"],
                   help="forward quantizer (default: %(default)s)")
    q.add_argument("-bw", "--bits", type=int, default=1, help="bit width (default: 1)")
    q.add_argument("-meta", "--estimator", type=_estimator, default="ste", choices=ESTIMATORS,
                   help="backward method: a classical estimator (ste, identity, ewgs) or a meta quantizer "
                        "(fc-grad, multifc, lstmfc) trained by MetaQuant (default: ste)")
    q.add_argument("--ewgs-delta", type=float, default=1e-3, help="EWGS scaling factor δ (default: 1e-3)")

    m = p.add_argument_group("meta quantizer (with --estimator fc-grad, multifc or lstmfc)")
    m.add_argument("-hidden", "--hidden-size", type=int, default=100, help="hidden size (default: 100)")
    m.add_argument("-nfc", "--num-fc", type=int, default=2,
                   help="number of FC layers of FC-Grad and MultiFC (default: 2, the paper's)")
    m.add_argument("-nlstm", "--num-lstm", type=int, default=1, help="number of LSTM layers of LSTMFC (default: 1)")
    m.add_argument("-nonlinear", "--nonlinearity", type=_lower, default="none", choices=NONLINEARITIES,
                   help="non-linearity between the FC layers (default: none)")
    m.add_argument("--meta-lr", type=float, default=1e-3,
                   help="learning rate γ of the meta quantizer's Adam; follows the base schedule (default: 1e-3)")
    m.add_argument("--meta-weight-decay", type=float, default=0.0,
                   help="weight decay of the meta optimizer (default: 0)")
    m.add_argument("--step-order", type=_lower, default="paper", choices=STEP_ORDERS,
                   help="paper: Algorithm 1 (default); original: the original code's order, to reproduce its "
                        "numbers")
    m.add_argument("--through", type=_lower, default="residual", choices=THROUGH,
                   help="derivative of the optimizer's update w.r.t. the gradient: residual (identity, the "
                        "paper's) or exact (e.g. through the whole Adam update) (default: residual)")
    m.add_argument("--fix-meta", action="store_true",
                   help="freeze the meta quantizer from --fix-meta-epoch on (with --meta-init: reuse it as is)")
    m.add_argument("--fix-meta-epoch", type=int, default=0,
                   help="first epoch with a frozen meta quantizer, with --fix-meta (default: 0)")
    m.add_argument("--meta-init", default=None,
                   help="start from a trained meta quantizer: a run directory, its meta.pt or a checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="metaquant",
        description="Train networks with 1-bit (or k-bit) weights, with MetaQuant's learned gradient through "
                    "the quantizer or a classical straight-through estimator.",
    )
    parser.add_argument("--version", action="version", version=f"metaquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pre = sub.add_parser("pretrain", help="train a full-precision model",
                         description="Train a full-precision model and save it as a run directory.")
    _add_common(pre, task="pretrain")
    quant = sub.add_parser("quantize", help="quantization training from a pre-trained model",
                           description="Train a model with quantized weights from a pre-trained one.")
    _add_common(quant, task="quantize")
    _add_quantization(quant)
    return parser


_NOT_CONFIG = {"command", "run_dir", "name", "progress", "debug", "fix_meta", "fix_meta_epoch"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    fields = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if getattr(args, "fix_meta", False):
        fields["freeze_meta_epoch"] = args.fix_meta_epoch
    return RunConfig(task=args.command, **fields)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as err:
        raise CLIError(f"metaquant {args.command}: error: {err}", EXIT_USAGE) from None
    run_dir = Path(args.run_dir) / (args.name or default_run_name(config))
    result = execute(config, run_dir, progress=args.progress)
    print(f"{args.command} finished: final test accuracy {result.final_acc:.2f}%, best {result.best_acc:.2f}% "
          f"({result.epochs} epochs); run directory {result.run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return _run(argv)
    except CLIError as err:
        print(err, file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print("metaquant: interrupted", file=sys.stderr)
        return 130
    except (RunExistsError, DatasetError, FileNotFoundError, ValueError, TypeError, ImportError, OSError) as err:
        if debug:
            raise
        print(f"metaquant: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
