"""The configuration of one training run, validated when it is made, and the command-line options it declares.

``RunConfig`` is what the command line builds and what a run directory stores (``config.json``). Each field
with an option carries it in its metadata: flags, help text and group (``metaquant.experiments.options`` makes
the ``pretrain`` and ``quantize`` parsers from them). ``RunConfig.for_task`` starts from a task's recipe
(``TASK_DEFAULTS``, the command line's defaults); ``RunConfig(...)`` and ``from_fields`` (a sweep file's runs)
keep the dataclass defaults, and ``from_dict`` (a stored ``config.json``) gives a field added since the file was
written the value its run had (``ABSENT_MEANS``). Each bad value is refused in ``__post_init__`` with a
``ValueError`` that names it and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..activations import ACT_QUANTIZERS, SIGN_BACKWARDS, ActQuantConfig, LSQActivation, act_quantizer_names
from ..algorithm import STEP_ORDERS
from ..averaging import check_ema_decay
from ..data import AUGMENTATIONS, DATASETS
from ..distill import check_distillation
from ..estimators import CLASSICAL_ESTIMATORS
from ..guards import NONFINITE_POLICIES
from ..layout import MEMORY_FORMATS
from ..meta import DEFAULT_INIT_SCHEME, INIT_SCHEMES, META_QUANTIZERS, NONLINEARITIES
from ..models import model_names
from ..precision import AMP_MODES
from ..quantizers import get_quantizer, quantizer_names
from ..refine import THROUGH
from ..schedules import SCHEDULES
from ..validation import check_choice, check_int, check_number, is_int

__all__ = ["RunConfig", "OPTIMIZERS", "TASKS", "ESTIMATORS", "TASK_DEFAULTS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
TASKS = ("pretrain", "quantize")
#: Each task's recipe: where ``RunConfig.for_task`` (and so the command line) starts, over the dataclass defaults.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 10, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"},
    "quantize": {"epochs": 100, "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "step"},
}
#: Backward methods: the classical estimators, then the learned ones (meta quantizers).
META_ESTIMATORS = tuple(META_QUANTIZERS)
ESTIMATORS = tuple(CLASSICAL_ESTIMATORS) + META_ESTIMATORS
#: Spellings of the original code, accepted on input.
ESTIMATOR_ALIASES = {"mlpfc": "multifc", "fcgrad": "fc-grad", "fc_grad": "fc-grad", "lstm-fc": "lstmfc"}
DEVICES = ("auto", "cpu", "cuda")
#: The meta quantizer's settings and its step's: they change nothing in a run without a meta quantizer.
META_FIELDS = frozenset(
    {
        *("hidden_size", "num_fc", "num_lstm", "nonlinearity", "meta_lr", "meta_weight_decay", "step_order"),
        *("through", "freeze_meta_epoch", "meta_init", "meta_init_scheme"),
    }
)
#: Fields added after runs were made, with the value that reproduces a run whose config.json lacks them.
ABSENT_MEANS: dict[str, Any] = {"meta_init_scheme": "paper"}
#: Seeds reach NumPy's global generator, which takes 32-bit seeds.
MAX_SEED = 2**32 - 1
#: Examples in the standard training and test splits of each data set: a larger subset is a usage error.
SPLIT_SIZES = {
    "mnist": (60000, 10000),
    "fashion-mnist": (60000, 10000),
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
    "imagenet": (1281167, 50000),
}
#: The groups of options in ``--help``; the last three are the quantize command's only.
DATA, OPTIMIZATION, RELIABILITY, QUANTIZATION, ACTIVATIONS, META = (
    "data and model",
    "optimization",
    "reliability",
    "quantization",
    "activation quantization",
    "meta quantizer",
)
#: The activation width of a run that names an activation quantizer but no ``act_bits``, where the quantizer has
#: a choice (sign has one width).
ACT_DEFAULT_BITS = 4


def option(default: Any, *flags: str, group: str, help: str, **argparse_options: Any) -> Any:
    """A field with its command-line option: ``flags``, its ``group`` and ``help`` in ``--help`` (which adds the
    default unless ``help`` names it), and argparse's ``choices`` (a callable for a registry read when the parser
    is made), ``metavar``, ``type`` or ``const`` (a flag that sets this value)."""
    metadata = {"flags": flags, "group": group, "help": help, **argparse_options}
    return dataclasses.field(default=default, metadata=metadata)


def _estimator_name(name: str) -> str:
    return ESTIMATOR_ALIASES.get(name.lower(), name.lower())


def _quantizer_choices() -> list[str]:
    return [*quantizer_names(), "bwn-f"]


def _bits_or_none(text: str) -> int | None:
    """``--act-first-layer-bits``: a bit width, or ``none`` for float."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width or none, got {text!r}") from None


def _check_width(name: str, value: Any, low: int, high: int, context: str, also: str = "") -> None:
    if not (is_int(value) and low <= value <= high):
        allowed = f"{low}" if low == high else f"{low}..{high}"
        raise ValueError(f"`{name}` {value!r} is not supported {context}; allowed: {allowed}{also}")


def _check_count(name: str, value: Any) -> None:
    # check_int(minimum=1) would say ">= 1"; messages of counts say "> 0"
    if not (is_int(value) and value > 0):
        raise ValueError(f"{name} must be an integer > 0, got {value!r}")


@dataclass
class RunConfig:
    """One run of ``metaquant pretrain`` or ``metaquant quantize``; ``RunConfig.for_task(task, **fields)`` starts
    from the task's recipe, as the command does, where ``RunConfig(**fields)`` starts from the defaults below.

    Names are checked against the registries (``metaquant.models``, ``metaquant.data``, ``metaquant.quantizers``)
    and lower-cased, the original code's estimator spellings (``mlpfc``, ``fcgrad``, ``fc_grad``, ``lstm-fc``)
    becoming ours, so that equal runs have equal configurations; numbers are checked against their ranges. The
    fields are grouped as the command's options: data and model, optimization (``lr`` is ``α``), reliability,
    quantization (docs/design.md §3-§4), activation quantization (float activations unless ``act_quantizer``
    names one of ``metaquant.activations``; ``act_bits`` is then set to the quantizer's default, 1 for sign and 4
    for the others, when not given) and the meta quantizer (``meta_lr`` is ``γ``; ``step_order`` ``"paper"`` is
    Algorithm 1 of docs/design.md §5, ``"original"`` the original code's order, §5.1).

    Raises:
        ValueError: a field of the wrong type or outside its registry or range (the message names the field, the
            value and what is allowed); ``nesterov`` without ``sgd``, momentum > 0 and dampening 0; ``meta_init``
            or ``freeze_meta_epoch`` with a classical estimator; another ``act_*`` field than its default without
            ``act_quantizer``, or ``act_quantizer`` on a pretrain run.
    """

    task: str = "quantize"
    model: str = option("resnet20", "-m", "--model", group=DATA, help="architecture", choices=model_names)
    dataset: str = option("fashion-mnist", "-d", "--dataset", group=DATA, help="dataset", choices=DATASETS)
    data_dir: str | None = option(
        None,
        "--data-dir",
        group=DATA,
        help="where the dataset files are, and only there (default: ~/.cache/metaquant/<dataset>, and for "
        "Fashion-MNIST also /usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)",
    )
    download: bool = option(True, "--no-download", group=DATA, help="never download a missing dataset; fail instead")
    augment: str = option(
        "auto",
        "--augment",
        group=DATA,
        help="training augmentation: auto (the data set's own: crop_flip for CIFAR, none for the others), none, or "
        "crop_flip (pad 4, random crop, random horizontal flip)",
        choices=("auto", *AUGMENTATIONS),
    )
    train_size: int | None = option(
        None, "--train-size", group=DATA, help="train on a fixed, seeded random subset of N examples (default: all)"
    )
    test_size: int | None = option(
        None,
        "--test-size",
        group=DATA,
        help="evaluate on a fixed, seeded random subset of N test examples (default: all)",
    )
    subset_seed: int | None = option(
        None,
        "--subset-seed",
        group=DATA,
        help="seed of the --train-size subset (default: --seed); fix it to keep the same images across trials",
    )
    batch_size: int = option(128, "-bs", "--batch-size", group=DATA, help="training batch size")
    test_batch_size: int = option(500, "--test-batch-size", group=DATA, help="evaluation batch size")
    epochs: int = option(10, "-n", "--epochs", group=OPTIMIZATION, help="number of epochs")
    optimizer: str = option("sgd", "-o", "--optimizer", group=OPTIMIZATION, help="base optimizer", choices=OPTIMIZERS)
    lr: float = option(1e-3, "--lr", group=OPTIMIZATION, help="initial learning rate")
    momentum: float = option(0.0, "--momentum", group=OPTIMIZATION, help="SGD momentum")
    dampening: float = option(0.0, "--dampening", group=OPTIMIZATION, help="SGD dampening")
    nesterov: bool = option(False, "--nesterov", group=OPTIMIZATION, help="Nesterov momentum (SGD)")
    weight_decay: float = option(0.0, "--weight-decay", group=OPTIMIZATION, help="weight decay")
    lr_schedule: str = option(
        "step", "--lr-schedule", group=OPTIMIZATION, help="learning-rate schedule", choices=SCHEDULES
    )
    lr_step: int = option(
        30,
        "-ad",
        "--lr-step",
        group=OPTIMIZATION,
        help="step schedule: divide the learning rate by 1/--lr-gamma every N epochs",
    )
    lr_gamma: float = option(0.1, "--lr-gamma", group=OPTIMIZATION, help="step schedule factor")
    seed: int = option(0, "--seed", group=OPTIMIZATION, help="random seed")
    device: str = option("auto", "--device", group=OPTIMIZATION, help="auto, cpu, cuda or cuda:N")
    memory_format: str = option(
        "auto",
        "--memory-format",
        group=OPTIMIZATION,
        help="layout of convolutional models: auto (channels-last for models with 2-D convolutions, faster on CPU "
        "and CUDA), channels-last or contiguous",
        choices=MEMORY_FORMATS,
    )
    amp: str = option(
        "none",
        "--amp",
        group=OPTIMIZATION,
        help="mixed precision of the forward pass: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a gradient scaler); "
        "weights and the meta quantizer stay float32",
        choices=AMP_MODES,
    )
    sync_bn: bool = option(
        False,
        "--sync-bn",
        group=OPTIMIZATION,
        help="under torchrun: SyncBatchNorm (statistics over the whole batch) instead of each process's own "
        "BatchNorm statistics",
    )
    precise_bn_batches: int = option(
        0,
        "--precise-bn",
        group=OPTIMIZATION,
        help="before each evaluation, recompute the BatchNorm statistics for the current weights from the epoch's "
        "first N training batches instead of the running averages (default: %(default)s, off)",
        metavar="N",
    )
    record_precise_bn: int = option(
        0,
        "--record-precise-bn",
        group=OPTIMIZATION,
        help="also record each epoch's test accuracy with BatchNorm statistics recomputed from N training batches "
        "(test_acc_precise_bn), on a copy: the run itself is unchanged (default: %(default)s, off)",
        metavar="N",
    )
    ema_decay: float = option(
        0.0,
        "--ema-decay",
        group=OPTIMIZATION,
        help="deliver an exponential moving average of the weights (decay D per step, in (0, 1), e.g. 0.999) "
        "instead of the last ones; each test reports both; pair it with --precise-bn (default: %(default)s, off)",
        metavar="D",
    )
    on_nonfinite: str = option(
        "raise",
        "--skip-nonfinite",
        group=RELIABILITY,
        help="skip steps with a non-finite loss, gradient or meta output, or whose update overflows the weights, "
        "instead of stopping (also with --resume)",
        const="skip",
    )
    max_skipped: int = option(
        10,
        "--max-skipped",
        group=RELIABILITY,
        help="with --skip-nonfinite: stop the run as failed once more than N steps were skipped (default: "
        "%(default)s; also with --resume)",
        metavar="N",
    )
    checkpoint_every: int = option(
        0,
        "--checkpoint-every",
        group=RELIABILITY,
        help="also checkpoint every N steps within an epoch (default: %(default)s, at epoch ends only)",
        metavar="N",
    )
    init: str | None = option(
        None,
        "--init",
        group=QUANTIZATION,
        help="the weights to start from: pre-trained full-precision weights (a checkpoint, a run directory, or the "
        "original MetaQuant code's state_dict, e.g. ResNet20-CIFAR10-pretrain.pth), or a quantization run to "
        "fine-tune (the weights it delivered: its average with --ema-decay)",
    )
    quantizer: str = option(
        "dorefa", "-q", "--quantizer", group=QUANTIZATION, help="forward quantizer", choices=_quantizer_choices
    )
    bits: int = option(1, "-bw", "--bits", group=QUANTIZATION, help="bit width")
    group_size: int | None = option(
        None,
        "--group-size",
        group=QUANTIZATION,
        help="weights per scale of --quantizer uniform-group, which quantizes the linear layers only (the "
        "convolutions stay float) (default: 128)",
        metavar="N",
    )
    estimator: str = option(
        "ste",
        "-meta",
        "--estimator",
        group=QUANTIZATION,
        help="backward method: a classical estimator (ste, identity, ewgs) or a meta quantizer (fc-grad, multifc, "
        "lstmfc) trained by MetaQuant",
        choices=ESTIMATORS,
        type=_estimator_name,
    )
    ewgs_delta: float = option(1e-3, "--ewgs-delta", group=QUANTIZATION, help="EWGS scaling factor δ")
    act_quantizer: str | None = option(
        None,
        "--act-quantizer",
        group=ACTIVATIONS,
        help="also quantize the input of each quantized layer: sign (1 bit), lsq or pact (2..8 bits) (default: none, "
        "float activations)",
        choices=act_quantizer_names,
    )
    act_bits: int | None = option(
        None,
        "--act-bits",
        group=ACTIVATIONS,
        help="bit width of the activations (default: 1 for sign, 4 for lsq and pact)",
        metavar="N",
    )
    act_backward: str = option(
        "ste",
        "--act-backward",
        group=ACTIVATIONS,
        help="gradient of sign activations: ste (1 for |x| <= 1) or approxsign (Bi-Real's 2 - 2|x|); lsq and pact "
        "have their own",
        choices=SIGN_BACKWARDS,
    )
    act_first_layer_bits: int | None = option(
        8,
        "--act-first-layer-bits",
        group=ACTIVATIONS,
        help="bit width of the first quantized layer's input (the network's input: LSQ, 2..8 bits), or none to keep "
        "it float",
        type=_bits_or_none,
        metavar="N|none",
    )
    hidden_size: int = option(100, "-hidden", "--hidden-size", group=META, help="hidden size")
    num_fc: int = option(
        2,
        "-nfc",
        "--num-fc",
        group=META,
        help="number of FC layers of FC-Grad and MultiFC (default: %(default)s, the paper's)",
    )
    num_lstm: int = option(1, "-nlstm", "--num-lstm", group=META, help="number of LSTM layers of LSTMFC")
    nonlinearity: str = option(
        "none",
        "-nonlinear",
        "--nonlinearity",
        group=META,
        help="non-linearity between the FC layers",
        choices=NONLINEARITIES,
    )
    meta_lr: float = option(
        1e-3,
        "--meta-lr",
        group=META,
        help="learning rate γ of the meta quantizer's Adam; follows the base schedule",
    )
    meta_weight_decay: float = option(0.0, "--meta-weight-decay", group=META, help="weight decay of the meta optimizer")
    step_order: str = option(
        "paper",
        "--step-order",
        group=META,
        help="paper: Algorithm 1; original: the original code's order, to reproduce its numbers",
        choices=STEP_ORDERS,
    )
    through: str = option(
        "residual",
        "--through",
        group=META,
        help="derivative of the optimizer's update w.r.t. the gradient: residual (identity, the paper's) or exact "
        "(e.g. through the whole Adam update)",
        choices=THROUGH,
    )
    # from this epoch on the meta quantizer is frozen (the command line's --fix-meta and --fix-meta-epoch)
    freeze_meta_epoch: int | None = None
    meta_init: str | None = option(
        None,
        "--meta-init",
        group=META,
        help="start from a trained meta quantizer: a run directory, its meta.pt or a checkpoint",
    )
    meta_init_scheme: str = option(
        DEFAULT_INIT_SCHEME,
        "--meta-init-scheme",
        group=META,
        help="where the meta quantizer starts: ste (a learned correction of the STE whose last layer starts at "
        "zero: the first steps are STE steps) or paper (the paper's random start, a random multiple of the STE's "
        "gradient at first)",
        choices=INIT_SCHEMES,
    )
    # the "equivalent STE": multiply lr by the mean gain that the FC-Grad run in this directory learned
    lr_gain_from: str | None = None
    distill_weight: float = option(
        0.0,
        "--distill-weight",
        group=QUANTIZATION,
        help="knowledge distillation from the --init model (or --teacher): the share λ in [0, 1] of the loss that "
        "matches its softened predictions (default: %(default)s, labels only)",
    )
    distill_temperature: float = option(
        4.0,
        "--distill-temperature",
        group=QUANTIZATION,
        help="the temperature T of the distillation, in [0.01, 1000]",
    )
    teacher: str | None = option(
        None,
        "--teacher",
        group=QUANTIZATION,
        help="the full-precision model to distil from, a checkpoint or run directory (default: the --init model); "
        "e.g. to fine-tune a quantized run given as --init",
        metavar="CHECKPOINT",
    )
    # reports: how tables and figures name this run's backward method (default: derived from the options)
    label: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a wrong type (e.g. from a sweep file) is refused, not crashed on
            value = getattr(self, f.name)
            if f.type in ("str", "str | None") and not (isinstance(value, str) or (value is None and "None" in f.type)):
                raise ValueError(f"{f.name} must be a string, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
        # Registry names are case-insensitive: keep one spelling, so run names and reports group them.
        for name in ("model", "dataset", "optimizer", "quantizer", "act_quantizer", "act_backward"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).lower())
        self.estimator = _estimator_name(self.estimator)
        check_choice("task", self.task, TASKS)
        self._check_data()
        self._check_optimization()
        self._check_reliability()
        self._check_quantization()
        self._check_activations()
        self._check_meta_quantizer()

    def _check_data(self) -> None:
        check_choice("model", self.model, model_names())
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("augment", self.augment, ("auto", *AUGMENTATIONS))
        if self.augment != "auto" and self.dataset == "imagenet":
            raise ValueError("augment applies to the in-memory data sets; ImageNet's training transforms are fixed")
        for name, available, split in zip(("train_size", "test_size"), SPLIT_SIZES[self.dataset], ("training", "test")):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value)
                if value > available:
                    raise ValueError(
                        f"{name} {value} is more than the {available} {split} examples of "
                        f"{self.dataset}; allowed: 1..{available}, or none for all"
                    )
        for name in ("seed", "subset_seed"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=0)  # a negative seed is told as such, before the range
                check_int(name, value, minimum=0, maximum=MAX_SEED)
        for name in ("batch_size", "test_batch_size"):
            _check_count(name, getattr(self, name))

    def _check_optimization(self) -> None:
        for name in ("epochs", "lr_step"):
            _check_count(name, getattr(self, name))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("lr", self.lr, low=0, low_open=True)
        for name in ("momentum", "dampening"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0 and dampening 0")
        check_number("weight_decay", self.weight_decay, low=0)
        check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if not (isinstance(self.lr_gamma, (int, float)) and 0 < self.lr_gamma <= 1):
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        if not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device {self.device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)
        check_choice("amp", self.amp, AMP_MODES)
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp 'fp16' needs a CUDA device (its gradient scaler is for CUDA); on cpu use amp 'bf16'")
        for name in ("precise_bn_batches", "record_precise_bn"):
            check_int(name, getattr(self, name), minimum=0)
        check_ema_decay(self.ema_decay, allow_zero=True)

    def _check_reliability(self) -> None:
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for name in ("max_skipped", "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=0)

    def _check_quantization(self) -> None:
        _check_count("bits", self.bits)
        if self.group_size is not None and self.quantizer != "uniform-group":
            raise ValueError(
                f"`group_size` {self.group_size!r} applies to `quantizer` 'uniform-group' only, not to "
                f"{self.quantizer!r}"
            )
        # raises with the allowed names / bit widths / group sizes
        quantizer = get_quantizer(self.quantizer, self.bits, group_size=self.group_size)
        if quantizer.scale_group_size is not None:  # stored as it runs: config.json says the size
            self.group_size = quantizer.scale_group_size
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_number("ewgs_delta", self.ewgs_delta, low=0)
        if self.lr_gain_from is not None and (self.task != "quantize" or self.uses_meta):
            raise ValueError(
                "lr_gain_from (the equivalent STE) applies to quantize runs with a classical "
                f"estimator (ste, identity, ewgs), not to task {self.task!r} with estimator "
                f"{self.estimator!r}"
            )
        check_distillation(self.distill_weight, self.distill_temperature)
        if self.distill_weight > 0 and self.task != "quantize":
            raise ValueError(
                f"distill_weight {self.distill_weight!r} applies to quantize runs (their teacher is the init "
                f"model or teacher), not to task {self.task!r}"
            )
        for name in ("init", "teacher", "meta_init", "lr_gain_from"):  # a checkpoint or run directory, if given
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must name a checkpoint or run directory, got {value!r}")
        if self.teacher is not None and self.distill_weight == 0:
            raise ValueError(
                f"teacher {self.teacher!r} is the model a run distils from: give distill_weight > 0 too "
                "(`distill_weight`)"
            )

    def _check_activations(self) -> None:
        if self.act_quantizer is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in ("act_bits", "act_backward", "act_first_layer_bits"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(
                        f"`{name}` {getattr(self, name)!r} needs `act_quantizer` "
                        f"({', '.join(act_quantizer_names())}); without it the activations stay float"
                    )
            return
        if self.task != "quantize":  # a pretrain run has no quantized layers to put the quantizers in front of
            raise ValueError(
                f"`act_quantizer` {self.act_quantizer!r} applies to quantize runs, not to task {self.task!r}: the "
                "activation quantizers sit in front of the quantized layers; pre-train with float activations and "
                "quantize weights and activations from that model"
            )
        check_choice("`act_quantizer`", self.act_quantizer, act_quantizer_names())
        cls = ACT_QUANTIZERS[self.act_quantizer]
        if self.act_bits is None:  # stored as it runs: config.json says the width
            self.act_bits = cls.min_bits if cls.min_bits == cls.max_bits else ACT_DEFAULT_BITS
        _check_width(
            "act_bits", self.act_bits, cls.min_bits, cls.max_bits, f"by `act_quantizer` {self.act_quantizer!r}"
        )
        check_choice("`act_backward`", self.act_backward, SIGN_BACKWARDS)
        if self.act_backward != "ste" and self.act_quantizer != "sign":
            raise ValueError(
                f"`act_backward` {self.act_backward!r} is a gradient of sign activations, not of `act_quantizer` "
                f"{self.act_quantizer!r} (which has its own); allowed with it: ste"
            )
        if self.act_first_layer_bits is not None:
            low, high = LSQActivation.min_bits, LSQActivation.max_bits
            first, context = self.act_first_layer_bits, "(LSQ on the network's input)"
            _check_width("act_first_layer_bits", first, low, high, context, also=", or none for float")
        self.activations()  # and the library's own checks, should they refuse more

    def _check_meta_quantizer(self) -> None:
        for name in ("hidden_size", "num_fc", "num_lstm"):
            _check_count(name, getattr(self, name))
        check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        check_choice("meta_init_scheme", self.meta_init_scheme, INIT_SCHEMES)
        check_number("meta_lr", self.meta_lr, low=0, low_open=True)
        check_number("meta_weight_decay", self.meta_weight_decay, low=0)
        check_choice("step_order", self.step_order, STEP_ORDERS)
        check_choice("through", self.through, THROUGH)
        if self.freeze_meta_epoch is not None:
            check_int("freeze_meta_epoch", self.freeze_meta_epoch, minimum=0)
        if self.estimator not in META_ESTIMATORS:
            for name in ("meta_init", "freeze_meta_epoch"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} needs a meta quantizer estimator ({', '.join(META_ESTIMATORS)}), "
                        f"not {self.estimator!r}"
                    )

    @classmethod
    def for_task(cls, task: str, **fields: Any) -> RunConfig:
        """A ``task`` run (``"pretrain"`` or ``"quantize"``) from that task's recipe, ``TASK_DEFAULTS``: what
        ``metaquant pretrain`` and ``metaquant quantize`` run without options; ``fields`` set any other value.

        Raises:
            ValueError: an unknown task, or a value ``RunConfig`` refuses.
            TypeError: ``fields`` names no field, or holds ``task``.
        """
        check_choice("task", task, TASKS)
        return cls(task=task, **{**TASK_DEFAULTS[task], **fields})

    def activations(self) -> ActQuantConfig | None:
        """The library's activation quantization of this run, or None for float activations."""
        if self.act_quantizer is None:
            return None
        assert self.act_bits is not None  # __post_init__ gives every activation quantizer its width
        return ActQuantConfig(self.act_quantizer, self.act_bits, self.act_backward, self.act_first_layer_bits)

    @property
    def uses_meta(self) -> bool:
        """Whether this run trains a meta quantizer (MetaQuant) rather than a classical estimator."""
        return self.task == "quantize" and self.estimator in META_ESTIMATORS

    def differences(self, other: RunConfig) -> list[str]:
        """The fields in which ``other`` makes another run: those that differ, except the meta quantizer's own
        (``META_FIELDS``) when neither run has one (a default of theirs may change; the run does not).

        Example:
            >>> from metaquant.experiments.config import RunConfig
            >>> RunConfig(estimator="ste", hidden_size=50).differences(RunConfig(estimator="ste", epochs=3))
            ['epochs']
        """
        ignored = META_FIELDS if not (self.uses_meta or other.uses_meta) else frozenset()
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ignored and getattr(self, f.name) != getattr(other, f.name)
        ]

    # --- persistence --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A validated configuration from ``to_dict``'s form; missing fields take their defaults, except the
        fields of ``ABSENT_MEANS``, added after runs were made, which take the value those runs had.

        Raises:
            ValueError: an unknown key (the message lists the allowed ones), or a value ``RunConfig`` refuses.
        """
        return cls.from_fields({**ABSENT_MEANS, **data})

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RunConfig:
        """A validated configuration of a new run from some of its fields (a sweep file's); the others take
        their defaults, today's (``from_dict`` reads a stored configuration).

        Raises:
            ValueError: an unknown key (the message lists the allowed ones), or a value ``RunConfig`` refuses.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        """Write the configuration as indented JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read a configuration written by ``save`` (or a run directory's ``config.json``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a JSON object, an unknown key or a refused value; the message names the file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid configuration (not JSON: {err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a valid configuration (a JSON object of options is expected)")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
