"""The configuration of one training run, validated when it is made.

``RunConfig`` is what the command line builds and what a run directory stores (``config.json``). Every field
has a default suited to a quick Fashion-MNIST run; each bad value is refused in ``__post_init__`` with a
``ValueError`` that names the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..algorithm import STEP_ORDERS
from ..averaging import check_ema_decay
from ..data import AUGMENTATIONS, DATASETS
from ..distill import check_distillation
from ..estimators import CLASSICAL_ESTIMATORS
from ..guards import NONFINITE_POLICIES
from ..layout import MEMORY_FORMATS
from ..meta import INIT_SCHEMES, META_QUANTIZERS, NONLINEARITIES
from ..models import model_names
from ..precision import AMP_MODES
from ..quantizers import get_quantizer
from ..refine import THROUGH
from ..schedules import SCHEDULES

__all__ = ["RunConfig", "OPTIMIZERS", "TASKS", "ESTIMATORS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
TASKS = ("pretrain", "quantize")
#: Backward methods: the classical estimators, then the learned ones (meta quantizers).
META_ESTIMATORS = tuple(META_QUANTIZERS)
ESTIMATORS = tuple(CLASSICAL_ESTIMATORS) + META_ESTIMATORS
#: Spellings of the original code, accepted on input.
ESTIMATOR_ALIASES = {"mlpfc": "multifc", "fcgrad": "fc-grad", "fc_grad": "fc-grad", "lstm-fc": "lstmfc"}
DEVICES = ("auto", "cpu", "cuda")
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


def _choice(field: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not supported; allowed: {', '.join(allowed)}")


def _positive(field: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    bound = ">= 0" if allow_zero else "> 0"
    if ok and not integer and not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number {bound}, got {value!r}")
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{field} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


@dataclass
class RunConfig:
    """One run of ``metaquant pretrain`` or ``metaquant quantize``.

    Names are validated against the registries (``metaquant.models``, ``metaquant.data``,
    ``metaquant.quantizers``); numbers against their ranges. The names (``model``, ``dataset``, ``optimizer``,
    ``quantizer``, ``estimator``) are lower-cased and the original code's estimator spellings (``mlpfc``,
    ``fcgrad``, ``fc_grad``, ``lstm-fc``) become the names used here, so that equal runs have equal
    configurations. The fields are grouped in the source: data and model, optimization
    (``lr`` is ``α``), reliability, quantization (``quantizer``, ``bits``, ``estimator``: docs/design.md §3-§4) and the
    meta quantizer (``meta_lr`` is ``γ``; ``step_order`` ``"paper"`` is Algorithm 1 of docs/design.md §5,
    ``"original"`` the original code's order of docs/design.md §5.1).

    Raises:
        ValueError: a string or boolean field given a value of another type, or a value outside its registry
            or range; the message names the field, the value and what is allowed. Also: ``nesterov`` without
            ``sgd``, momentum > 0 and dampening 0; ``meta_init`` or ``freeze_meta_epoch`` with a classical
            estimator.

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> config = RunConfig(model="ResNet20", dataset="cifar10", estimator="mlpfc", optimizer="adam")
        >>> config.model, config.estimator, config.uses_meta
        ('resnet20', 'multifc', True)
        >>> try:
        ...     RunConfig(optimizer="rmsprop")
        ... except ValueError as err:
        ...     print(err)
        optimizer 'rmsprop' is not supported; allowed: sgd, adam, adamw
        >>> import pathlib
        >>> config.save(pathlib.Path("config.json"))  # what a run directory stores
        >>> RunConfig.load("config.json") == config, RunConfig.from_dict(config.to_dict()) == config
        (True, True)
    """

    task: str = "quantize"
    # data and model
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    # training augmentation: "auto" (the data set's own: crop_flip for CIFAR, none for the others) or a name
    augment: str = "auto"
    train_size: int | None = None
    test_size: int | None = None
    # seed of the training subset (default: ``seed``); fix it to compare trials on the same examples
    subset_seed: int | None = None
    batch_size: int = 128
    test_batch_size: int = 500
    # optimization
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_step: int = 30
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    # speed: the layout of convolutional models and batches, and mixed precision of the forward pass
    memory_format: str = "auto"
    amp: str = "none"
    # data-parallel training under torchrun: SyncBatchNorm instead of per-process BatchNorm statistics
    sync_bn: bool = False
    # evaluation: recompute BatchNorm statistics from this many training batches before each test (0: keep the
    # running averages; metaquant.batchnorm)
    precise_bn_batches: int = 0
    # also record each epoch's test accuracy with BatchNorm statistics recomputed from this many training batches
    # (test_acc_precise_bn), on a copy: the run's own statistics and test_acc stay as they are (0: not recorded)
    record_precise_bn: int = 0
    # deliver an exponential moving average of the weights, with this decay per step (0: the last weights;
    # metaquant.averaging)
    ema_decay: float = 0.0
    # reliability
    on_nonfinite: str = "raise"
    # with on_nonfinite="skip": the run stops as failed once more steps than this were skipped
    max_skipped: int = 10
    checkpoint_every: int = 0
    # quantization
    init: str | None = None
    quantizer: str = "dorefa"
    bits: int = 1
    estimator: str = "ste"
    ewgs_delta: float = 1e-3
    # meta quantizer (estimator fc-grad, multifc or lstmfc)
    hidden_size: int = 100
    num_fc: int = 2
    num_lstm: int = 1
    nonlinearity: str = "none"
    meta_lr: float = 1e-3
    meta_weight_decay: float = 0.0
    step_order: str = "paper"
    through: str = "residual"
    freeze_meta_epoch: int | None = None
    meta_init: str | None = None
    # where the meta quantizer starts: "paper" (random, the paper's) or "ste" (a correction of STE that starts at 0)
    meta_init_scheme: str = "paper"
    # the "equivalent STE": multiply lr by the mean gain that the FC-Grad run in this directory learned
    lr_gain_from: str | None = None
    # knowledge distillation (quantize runs): lambda and T of metaquant.distill
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    # the full-precision model to distil from: a checkpoint or run directory (None: the init model)
    teacher: str | None = None
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
        for name in ("model", "dataset", "optimizer", "quantizer", "estimator"):
            setattr(self, name, getattr(self, name).lower())
        _choice("task", self.task, TASKS)
        _choice("model", self.model, model_names())
        _choice("dataset", self.dataset, DATASETS)
        _choice("augment", self.augment, ("auto", *AUGMENTATIONS))
        if self.augment != "auto" and self.dataset == "imagenet":
            raise ValueError("augment applies to the in-memory data sets; ImageNet's training transforms are fixed")
        for name, available, split in zip(("train_size", "test_size"), SPLIT_SIZES[self.dataset], ("training", "test")):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value, integer=True)
                if value > available:
                    raise ValueError(
                        f"{name} {value} is more than the {available} {split} examples of "
                        f"{self.dataset}; allowed: 1..{available}, or none for all"
                    )
        for name in ("seed", "subset_seed"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value, integer=True, allow_zero=True)
                if value > MAX_SEED:
                    raise ValueError(f"{name} must be an integer in 0..{MAX_SEED}, got {value!r}")
        for name in ("batch_size", "test_batch_size", "epochs", "lr_step"):
            _positive(name, getattr(self, name), integer=True)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("lr", self.lr)
        for name in ("momentum", "dampening"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0 and dampening 0")
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if not (isinstance(self.lr_gamma, (int, float)) and 0 < self.lr_gamma <= 1):
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        if not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device {self.device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
        _choice("memory_format", self.memory_format, MEMORY_FORMATS)
        _choice("amp", self.amp, AMP_MODES)
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp 'fp16' needs a CUDA device (its gradient scaler is for CUDA); on cpu use amp 'bf16'")
        _choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _positive("max_skipped", self.max_skipped, integer=True, allow_zero=True)
        _positive("checkpoint_every", self.checkpoint_every, integer=True, allow_zero=True)
        _positive("precise_bn_batches", self.precise_bn_batches, integer=True, allow_zero=True)
        _positive("record_precise_bn", self.record_precise_bn, integer=True, allow_zero=True)
        check_ema_decay(self.ema_decay, allow_zero=True)
        _positive("bits", self.bits, integer=True)
        get_quantizer(self.quantizer, self.bits)  # raises with the allowed names / bit widths
        self.estimator = ESTIMATOR_ALIASES.get(self.estimator, self.estimator)
        _choice("estimator", self.estimator, ESTIMATORS)
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
                "(--distill-weight)"
            )
        _positive("ewgs_delta", self.ewgs_delta, allow_zero=True)
        for name in ("hidden_size", "num_fc", "num_lstm"):
            _positive(name, getattr(self, name), integer=True)
        _choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _choice("meta_init_scheme", self.meta_init_scheme, INIT_SCHEMES)
        _positive("meta_lr", self.meta_lr)
        _positive("meta_weight_decay", self.meta_weight_decay, allow_zero=True)
        _choice("step_order", self.step_order, STEP_ORDERS)
        _choice("through", self.through, THROUGH)
        if self.freeze_meta_epoch is not None:
            _positive("freeze_meta_epoch", self.freeze_meta_epoch, integer=True, allow_zero=True)
        if self.estimator not in META_ESTIMATORS:
            for name in ("meta_init", "freeze_meta_epoch"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} needs a meta quantizer estimator ({', '.join(META_ESTIMATORS)}), "
                        f"not {self.estimator!r}"
                    )

    @property
    def uses_meta(self) -> bool:
        """Whether this run trains a meta quantizer (MetaQuant) rather than a classical estimator."""
        return self.task == "quantize" and self.estimator in META_ESTIMATORS

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**{**ABSENT_MEANS, **data})

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
