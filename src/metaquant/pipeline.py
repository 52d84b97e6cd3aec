"""From a ``RunConfig`` to a finished run: build data, model, optimizer and trainer, then ``fit``.

This is what ``metaquant pretrain`` and ``metaquant quantize`` execute; it is also the easiest way to start a
run from Python: ``execute(RunConfig(task="quantize", init="runs/pretrain/checkpoint.pt"), "runs/q")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .algorithm import MetaQuant
from .averaging import ema_model
from .config import RunConfig
from .data import dataset_info, make_loaders, make_test_loader
from .distill import Distillation
from .distributed import any_process, init_from_env, is_main, unwrap, wrap
from .equivalent import learned_gain
from .estimators import CLASSICAL_ESTIMATORS, EWGS, ClassicalEstimator
from .guards import StopFlag
from .integrity import read_verified, with_digest
from .layers import QuantConfig, dequantize_, quantize_
from .layout import apply_memory_format, preferred_memory_format
from .meta import LSTMFC, META_QUANTIZERS, MetaQuantizer
from .models import get_model, load_weights, read_checkpoint
from .precision import make_grad_scaler
from .runs import (
    CHECKPOINT,
    DAMAGED_CHECKPOINT,
    RUN_FILES,
    RunDir,
    RunLock,
    RunLockedError,
    atomic_write_bytes,
    load_checkpoint,
)
from .trace import TRACE_FILE, MetaTrace
from .trainer import Trainer
from .training import FitState, evaluate, fit, precise_bn_metrics, restore_fit, seed_everything, step_schedule

__all__ = [
    "execute",
    "resume",
    "export_run",
    "evaluate_artifact",
    "resolve_device",
    "build_optimizer",
    "build_trainer",
    "build_teacher",
    "default_run_name",
    "RunResult",
    "describe_checkpoint",
]

#: The trained meta quantizer of a finished MetaQuant run, for ``--meta-init``.
META_FILE = "meta.pt"

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports: the value of ``execute`` and ``resume``.

    Attributes:
        run_dir: the run directory, or None when the run wrote nothing (``execute(config, None)``).
        final_acc: test accuracy (percent, top-1) after the last epoch.
        best_acc: the best test accuracy of all epochs.
        epochs: the number of epochs trained.

    Example:
        >>> from metaquant.pipeline import RunResult
        >>> result = RunResult(run_dir=None, final_acc=88.5, best_acc=89.25, epochs=100)
        >>> result.best_acc - result.final_acc, result.epochs
        (0.75, 100)
    """

    run_dir: Path | None
    final_acc: float
    best_acc: float
    epochs: int


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` named by ``RunConfig.device``: ``auto`` → CUDA when available, else CPU.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device.

    Raises:
        ValueError: ``name`` asks for CUDA (``"cuda"``, ``"cuda:N"``) and CUDA is not available.

    Example:
        >>> from metaquant.pipeline import resolve_device
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
        True
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def build_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    """The base optimizer named by ``config.optimizer`` with its options.

    ``sgd`` takes ``lr``, ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay``; ``adam`` and ``adamw``
    take ``lr`` and ``weight_decay``.

    Args:
        params: the parameters (or parameter groups) to optimize.
        config: the run's configuration.

    Returns:
        A ``torch.optim.SGD``, ``Adam`` or ``AdamW``.

    Raises:
        ValueError: an optimizer name other than ``sgd``, ``adam``, ``adamw`` (``RunConfig`` already refuses it).

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import build_optimizer
        >>> net = torch.nn.Linear(4, 2)
        >>> opt = build_optimizer(net.parameters(), RunConfig(optimizer="adam", lr=1e-3, weight_decay=5e-4))
        >>> type(opt).__name__, opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        ('Adam', 0.001, 0.0005)
    """
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            dampening=config.dampening,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer {config.optimizer!r} is not supported")  # RunConfig already refuses it


def classical_estimator(config: RunConfig) -> ClassicalEstimator:
    """The hand-designed backward method named by ``config.estimator`` (STE, identity, EWGS) with its options."""
    if config.estimator == "ewgs":
        return EWGS(config.ewgs_delta)
    return CLASSICAL_ESTIMATORS[config.estimator]()


def build_meta(config: RunConfig) -> MetaQuantizer:
    """The meta quantizer named by ``config.estimator`` with its options."""
    cls = META_QUANTIZERS[config.estimator]
    if cls is LSTMFC:
        return LSTMFC(config.hidden_size, config.num_lstm, config.nonlinearity, init_scheme=config.meta_init_scheme)
    return cls(config.hidden_size, config.num_fc, config.nonlinearity, init_scheme=config.meta_init_scheme)


def meta_config(config: RunConfig) -> dict[str, Any]:
    """What identifies a meta quantizer's architecture, stored beside its weights."""
    keys = ("estimator", "hidden_size", "nonlinearity") + (
        ("num_lstm",) if config.estimator == "lstmfc" else ("num_fc",)
    )
    found = {k: getattr(config, k) for k in keys}
    if config.meta_init_scheme != "paper":  # another function of the same weights (files of paper runs lack it)
        found["init_scheme"] = config.meta_init_scheme
    return found


def load_meta(meta: MetaQuantizer, source: str, expected: dict[str, Any]) -> None:
    """Load a trained meta quantizer from ``source``: a ``meta.pt``, a checkpoint, or a run directory.

    Raises:
        FileNotFoundError: nothing to load there.
        ValueError: the saved meta quantizer has another architecture (the message names both).
    """
    path = Path(source)
    if path.is_dir():
        path = path / META_FILE if (path / META_FILE).exists() else path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--meta-init {source}: no {META_FILE} or {CHECKPOINT} there")
    try:
        saved = torch.load(io.BytesIO(read_verified(path)), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--meta-init {path} cannot be read ({type(err).__name__}: {err})") from None
    if "trainer" in saved:  # a checkpoint
        state, found = saved["trainer"].get("meta"), saved.get("meta_config")
    else:
        state, found = saved.get("meta"), saved.get("meta_config")
    if state is None or found is None:
        raise ValueError(f"--meta-init {path} holds no meta quantizer")
    if found != expected:
        raise ValueError(f"--meta-init {path} holds a meta quantizer {found}, this run needs {expected}")
    meta.load_state_dict(state)


def build_trainer(config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> Trainer | MetaQuant:
    """The object doing one step per batch: plain back-propagation for pre-training and classical estimators,
    MetaQuant for meta quantizers.

    Args:
        config: the run's configuration: ``task``, ``estimator`` (with ``ewgs_delta``), the meta quantizer's
            options (``hidden_size``, ``num_fc``, ``num_lstm``, ``nonlinearity``, ``meta_lr``,
            ``meta_weight_decay``, ``step_order``, ``through``, ``freeze_meta_epoch``, ``meta_init``) and
            ``on_nonfinite``.
        model: the model; for ``quantize`` runs, already converted by ``quantize_``.
        optimizer: the base optimizer over the model's parameters (``build_optimizer``).

    Returns:
        A ``Trainer`` (``pretrain``, or ``quantize`` with ``ste``, ``identity`` or ``ewgs``) or a ``MetaQuant``
        (``quantize`` with ``fc-grad``, ``multifc`` or ``lstmfc``).

    Raises:
        ValueError: as ``MetaQuant`` (e.g. a model without quantized layers); ``meta_init`` holds no meta
            quantizer or one of another architecture.
        FileNotFoundError: ``meta_init`` names no ``meta.pt``, checkpoint or run directory.

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import build_trainer
        >>> model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        >>> type(build_trainer(RunConfig(estimator="ste"), model, opt)).__name__
        'Trainer'
        >>> trainer = build_trainer(RunConfig(estimator="multifc", hidden_size=8), model, opt)
        >>> type(trainer).__name__, type(trainer.meta).__name__
        ('MetaQuant', 'MultiFC')
    """
    device = next(model.parameters()).device
    scaler = make_grad_scaler(config.amp, device)  # fp16 only
    if config.task == "pretrain":
        return Trainer(model, optimizer, on_nonfinite=config.on_nonfinite, grad_scaler=scaler)
    if config.estimator in CLASSICAL_ESTIMATORS:
        return Trainer(
            model, optimizer, classical_estimator(config), on_nonfinite=config.on_nonfinite, grad_scaler=scaler
        )
    meta = build_meta(config)
    if config.meta_init:
        load_meta(meta, config.meta_init, meta_config(config))
    return MetaQuant(
        model,
        optimizer,
        meta,
        meta_lr=config.meta_lr,
        meta_weight_decay=config.meta_weight_decay,
        step_order=config.step_order,
        through=config.through,
        freeze_meta_epoch=config.freeze_meta_epoch,
        on_nonfinite=config.on_nonfinite,
        grad_scaler=scaler,
    )


def default_run_name(config: RunConfig) -> str:
    """A readable directory name for a run: task, model, dataset, then the options that tell runs apart.

    ``pretrain`` runs are named by optimizer and seed; ``quantize`` runs also by quantizer, bit width,
    estimator and (for meta quantizers run in the original code's order) ``-original-order``.

    Args:
        config: the run's configuration.

    Returns:
        The name (no directory part).

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import default_run_name
        >>> default_run_name(RunConfig(model="resnet20", dataset="cifar10", estimator="multifc", seed=2))
        'quantize-resnet20-cifar10-dorefa1-multifc-sgd-seed2'
        >>> default_run_name(RunConfig(task="pretrain", dataset="cifar10", optimizer="adam"))
        'pretrain-resnet20-cifar10-adam-seed0'
    """
    base = f"{config.task}-{config.model}-{config.dataset}"
    if config.task == "pretrain":
        return f"{base}-{config.optimizer}-seed{config.seed}"
    order = "-original-order" if config.uses_meta and config.step_order == "original" else ""
    start = "-ste-start" if config.uses_meta and config.meta_init_scheme == "ste" else ""
    return (
        f"{base}-{config.quantizer}{config.bits}-{config.estimator}{start}{order}-{config.optimizer}-seed{config.seed}"
    )


def _init_path(init: str) -> Path:
    path = Path(init)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no such checkpoint file (or run directory with {CHECKPOINT})")
    return path


def build_model(config: RunConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The full-precision model, loaded from ``config.init`` when given, then quantized for ``quantize`` runs."""
    model = get_model(config.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if config.init:
        load_weights(model, _init_path(config.init))
    if config.task == "quantize":
        quantize_(model, QuantConfig(config.quantizer, config.bits))
    return model


def _extra(config: RunConfig, teacher_digest: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"config": config.to_dict()}
    if config.uses_meta:
        extra["meta_config"] = meta_config(config)
    if teacher_digest is not None:  # a distilling run: resume checks that its teacher is the same model
        extra["teacher"] = teacher_digest
    return extra


def save_meta(path: Path, meta: MetaQuantizer, config: RunConfig) -> None:
    """Write the trained meta quantizer, with its architecture, for ``--meta-init`` in another run."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in meta.state_dict().items()}  # readable without the GPU it ran on
    torch.save({"meta": state, "meta_config": meta_config(config)}, buffer)
    atomic_write_bytes(path, with_digest(buffer.getvalue()))


def _with_learned_gain(config: RunConfig) -> RunConfig:
    """``config`` with ``lr`` multiplied by the gain its ``lr_gain_from`` FC-Grad run learned (the equivalent STE)."""
    if config.lr_gain_from is None:
        return config
    gain = learned_gain(config.lr_gain_from)
    if not gain > 0:
        raise ValueError(
            f"the FC-Grad run {config.lr_gain_from} learned a mean gain {gain:g} <= 0: no STE "
            "learning rate is equivalent to it"
        )
    logger.info(
        "equivalent STE: lr %g x the gain %.4f that %s learned = %g",
        config.lr,
        gain,
        config.lr_gain_from,
        config.lr * gain,
    )
    return dataclasses.replace(config, lr=config.lr * gain)


@dataclass
class _Session:
    """Everything a run trains with, built from its configuration."""

    model: nn.Module
    trainer: Trainer | MetaQuant
    train_loader: Any
    test_loader: Any
    criterion: Distillation | None = None
    # the teacher's state digest, kept in each checkpoint: a resumed run checks that its teacher is the same
    teacher_digest: str | None = None
    # the moving average of the weights that the run delivers (config.ema_decay > 0)
    averaged: AveragedModel | None = None


def build_teacher(config: RunConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The teacher of a run with ``distill_weight > 0``: the full-precision model named by ``config.teacher``,
    or by ``config.init`` when the run names no teacher.

    Raises:
        ValueError: the run names neither: there is no full-precision model to distil from; or the checkpoint
            is a quantization run's (its latent weights are not a full-precision model).
        FileNotFoundError: the teacher names no checkpoint.

    Example:
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import build_teacher
        >>> fp = mq.models.resnet8(num_classes=10, in_channels=1)
        >>> torch.save({"model": fp.state_dict()}, "fp.pt")
        >>> teacher = build_teacher(RunConfig(model="resnet8", init="fp.pt", distill_weight=0.9), 10, 1, 28)
        >>> torch.equal(teacher.fc.weight, fp.fc.weight), len(mq.quantized_layers(teacher))  # not quantized
        (True, 0)
        >>> try:
        ...     build_teacher(RunConfig(distill_weight=0.9), 10, 1, 28)
        ... except ValueError as err:
        ...     print(str(err)[:60])
        distill_weight 0.9 distils from a full-precision model: give
    """
    path = _teacher_path(config)
    checkpoint = read_checkpoint(path)
    owner = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if isinstance(owner, dict) and owner.get("task") == "quantize":
        raise ValueError(
            f"the teacher {path} is a checkpoint of a quantization run: its latent weights are not a "
            "full-precision model; name a pre-trained model as the teacher (--teacher)"
        )
    teacher = get_model(config.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    load_weights(teacher, checkpoint)
    return teacher


def _teacher_path(config: RunConfig) -> Path:
    """The checkpoint of a distilling run's teacher; checked before any data is read."""
    if config.teacher:
        source, field = config.teacher, "teacher"
    elif config.init:
        source, field = config.init, "init"
    else:
        raise ValueError(
            f"distill_weight {config.distill_weight} distils from a full-precision model: give teacher "
            "(--teacher) or init (--init), a pre-trained checkpoint or run directory"
        )
    try:
        return _init_path(source)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the teacher of this run, {field} {source!r}, is not there (no checkpoint file, or run directory "
            f"with {CHECKPOINT}; a relative path is taken from the working directory, {Path.cwd()})"
        ) from None


def _digest_of(model: nn.Module) -> str:
    """A SHA-256 of a model's state (names, dtypes, shapes and values): tells whether a teacher changed."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prepare(config: RunConfig, *, load_init: bool = True, checkpoint: dict[str, Any] | None = None) -> _Session:
    """Data, model (loaded from ``init`` or from ``checkpoint``), optimizer and trainer of a run; under
    ``torchrun``, this process's shard of the data and the model in DistributedDataParallel."""
    dist_info = init_from_env(config.device)
    device = resolve_device(config.device)
    if dist_info is not None and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(config.seed)
    train_loader, test_loader, info = make_loaders(
        config.dataset,
        data_dir=config.data_dir,
        batch_size=config.batch_size,
        test_batch_size=config.test_batch_size,
        device=device,
        seed=config.seed,
        train_size=config.train_size,
        test_size=config.test_size,
        subset_seed=config.subset_seed,
        download=config.download,
        rank=dist_info.rank if dist_info else 0,
        world_size=dist_info.world_size if dist_info else 1,
        augment=None if config.augment == "auto" else config.augment,
    )
    build_config = config if load_init else dataclasses.replace(config, init=None, meta_init=None)
    model = build_model(build_config, info.num_classes, info.in_channels, info.image_size)
    if checkpoint is not None:
        load_weights(model, checkpoint["model"])
    model = model.to(device)
    # Channels-last for convolutional models (unless the run says otherwise): the batches follow the first layer.
    apply_memory_format(model, preferred_memory_format(model, config.memory_format))
    if dist_info is not None:
        model = wrap(model, dist_info, sync_bn=config.sync_bn, find_unused=config.uses_meta)
    optimizer = build_optimizer(model.parameters(), _with_learned_gain(config))
    trainer = build_trainer(build_config, model, optimizer)
    criterion, digest = None, None
    if config.distill_weight > 0:  # the teacher (or the init model), also when resuming (load_init=False)
        teacher = build_teacher(config, info.num_classes, info.in_channels, info.image_size)
        digest = _digest_of(teacher)
        teacher = teacher.to(device)
        apply_memory_format(teacher, preferred_memory_format(teacher, config.memory_format))
        criterion = Distillation(teacher, weight=config.distill_weight, temperature=config.distill_temperature)
        logger.info("distilling from %s (%s)", config.teacher or config.init, criterion)
    # after the weights are in place and on the device: the average is a copy of the model as it is now
    averaged = ema_model(model, config.ema_decay) if config.ema_decay > 0 else None
    where = f"rank {dist_info.rank} of {dist_info.world_size}, " if dist_info else ""
    logger.info("%s on %s (%s%d training batches per epoch)", config.model, device, where, len(train_loader))
    return _Session(model, trainer, train_loader, test_loader, criterion, digest, averaged)


def _train(
    config: RunConfig, session: _Session, run: RunDir | None, state: FitState, progress: bool, stop: StopFlag | None
) -> RunResult:
    on_epoch_end = None
    if run is not None and isinstance(session.trainer, MetaQuant):
        trace = MetaTrace(run.path / TRACE_FILE, config.epochs)
        model = unwrap(session.model)
        on_epoch_end = lambda epoch: trace.snapshot(epoch, session.trainer, model)  # noqa: E731
    state = fit(
        session.model,
        session.trainer,
        session.train_loader,
        session.test_loader,
        epochs=config.epochs,
        schedule=step_schedule(config.lr_schedule, config.epochs, config.lr_step, config.lr_gamma),
        run=run,
        state=state,
        extra_checkpoint=lambda: _extra(config, session.teacher_digest),
        progress=progress,
        stop=stop,
        checkpoint_every=config.checkpoint_every,
        on_epoch_end=on_epoch_end,
        max_skipped=config.max_skipped if config.on_nonfinite == "skip" else None,
        amp=config.amp,
        criterion=session.criterion,
        precise_bn_batches=config.precise_bn_batches,
        averaged=session.averaged,
        extra_metrics=(
            precise_bn_metrics(session.train_loader, session.test_loader, config.record_precise_bn)
            if config.record_precise_bn
            else None
        ),
    )
    if run is not None:
        if isinstance(session.trainer, MetaQuant):
            save_meta(run.path / META_FILE, session.trainer.meta, config)
        run.mark_done()
    return RunResult(
        run_dir=run.path if run else None, final_acc=state.last_acc, best_acc=state.best_acc, epochs=state.epoch
    )


def execute(
    config: RunConfig, run_dir: str | Path | None, *, progress: bool = True, stop: StopFlag | None = None
) -> RunResult:
    """Run ``config`` to the end, writing into a new ``run_dir`` (None: write nothing).

    Builds the data, the model (loaded from ``config.init``, then quantized for ``quantize`` runs), the
    optimizer and the trainer, and trains for ``config.epochs`` epochs. The run directory receives
    ``config.json``, ``metrics.jsonl``, ``loss.csv``, ``checkpoint.pt`` and, once finished, ``done``; a
    MetaQuant run also its trained meta quantizer (``meta.pt``, for ``meta_init``) and ``trace.pt``. Under
    ``torchrun`` every process trains and only rank 0 writes.

    Args:
        config: the run's configuration.
        run_dir: a directory that holds no run yet (created if needed), or None to write nothing.
        progress: show a progress bar per epoch.
        stop: a ``StopFlag``; when it becomes true the run stops after the current step with a checkpoint.

    Returns:
        A ``RunResult`` (final and best test accuracy, epochs).

    Raises:
        RunExistsError: ``run_dir`` already holds a run (it is left untouched; resume it with ``resume``), or
            it is a directory holding other files (not a run): a new run needs a missing or empty directory.
        RunLockedError: another process is creating a run in ``run_dir`` at the same time.
        TrainingInterrupted: ``stop`` was set; the run can be continued with ``resume``.
        NonFiniteError: a step produced a non-finite value; the last good checkpoint is intact.
        FileNotFoundError: ``config.init`` names no checkpoint, ``meta_init`` nothing to load, or the data set
            is not found and cannot be downloaded (``DatasetNotFoundError``).
        DatasetError: the data set's files are damaged (``DatasetFormatError``) or its download fails.
        ValueError: ``config.device`` asks for CUDA without CUDA; ``init`` or ``meta_init`` does not fit the
            model.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import execute
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, estimator="multifc", hidden_size=8, device="cpu")
        >>> result = execute(config, "runs/quick", progress=False)  # two steps of MetaQuant, one test
        >>> result.epochs, sorted(p.name for p in result.run_dir.iterdir())
        (1, ['checkpoint.pt', 'config.json', 'done', 'loss.csv', 'meta.pt', 'metrics.jsonl', 'trace.pt'])
        >>> try:
        ...     execute(config, "runs/quick")
        ... except mq.runs.RunExistsError:
        ...     print("refused: runs/quick already holds a run")
        refused: runs/quick already holds a run
    """
    if run_dir is not None:
        RunDir.check_free(run_dir)  # raises before any work is done, and before anything is written
    if config.init:
        _init_path(config.init)  # a missing init or teacher is named before the data set is read
    if config.distill_weight > 0:
        _teacher_path(config)
    session = _prepare(config)
    if run_dir is None:
        return _train(config, session, None, FitState(), progress, stop)
    with _owning(Path(run_dir), create=config) as run:  # under torchrun only rank 0 writes
        result = _train(config, session, run, FitState(), progress, stop)
    return dataclasses.replace(result, run_dir=Path(run_dir))


@contextlib.contextmanager
def _owning(path: Path, create: RunConfig | None = None) -> Iterator[RunDir | None]:
    """Hold the run directory's lock for the duration, on the writing process (rank 0); with ``create``, make
    the run there first (under the lock). Every process learns whether that worked, so that under torchrun
    all of them stop together when it did not.

    Yields:
        The ``RunDir`` on the writing process, None on the others.
    """
    lock, run, error = None, None, None
    if is_main():
        try:
            if create is not None:
                RunDir.check_free(path)
                path.mkdir(parents=True, exist_ok=True)
            lock = RunLock(path)
            run = RunDir.create(path, create) if create is not None else RunDir(path)
        except Exception as err:  # reported on this process, after the others were told
            error = err
            if lock is not None:
                lock.release()
    if any_process(error is not None):
        if error is not None:
            raise error
        raise RunLockedError(f"rank 0 could not take the run directory {path}; its message says why")
    try:
        yield run
    finally:
        if lock is not None:
            lock.release()


def _position(checkpoint: dict[str, Any]) -> str:
    """Where a checkpoint stands, e.g. ``after epoch 2`` or ``at epoch 3, step 5``."""
    fit_state = checkpoint.get("fit") or {}
    epoch, batch = int(fit_state.get("epoch", checkpoint["epoch"])), fit_state.get("batch", 0)
    return f"at epoch {epoch + 1}, step {batch}" if batch else f"after epoch {epoch}"


def describe_checkpoint(path: str | Path) -> str | None:
    """``"<path> (after epoch E)"`` when ``path`` is an intact checkpoint, None when it is missing or damaged.

    What the command line tells a user whose run stopped: which checkpoint a resume would continue from.

    Args:
        path: a checkpoint file.

    Returns:
        The description, or None.

    Example:
        >>> from metaquant.pipeline import describe_checkpoint
        >>> from metaquant.runs import save_checkpoint
        >>> state = {"model": {}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 2}
        >>> save_checkpoint("checkpoint.pt", {**state, "fit": {"epoch": 2, "batch": 3}})
        >>> describe_checkpoint("checkpoint.pt"), describe_checkpoint("missing.pt")
        ('checkpoint.pt (at epoch 3, step 3)', None)
    """
    try:
        return f"{path} ({_position(load_checkpoint(Path(path)))})"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _previous_note(run: RunDir) -> str:
    previous = run.previous_checkpoint_path
    if not previous.exists():
        return "there is no previous checkpoint"
    described = describe_checkpoint(previous)
    if described is None:
        return f"the previous checkpoint {previous} is damaged too"
    return f"the previous checkpoint {described} is intact: use it with --from-previous"


def _latest_checkpoint(run: RunDir, from_previous: bool = False) -> tuple[dict[str, Any] | None, Path | None]:
    """``checkpoint.pt`` of ``run``, verified, and its path; ``(None, None)`` when the run has none yet.

    ``checkpoint.prev.pt`` is used only when asked for (``from_previous``): a damaged or missing latest
    checkpoint is refused with a message that names the previous one, never replaced by it silently.
    """
    current, previous = run.checkpoint_path, run.previous_checkpoint_path
    if from_previous:
        if not previous.exists():
            raise FileNotFoundError(f"--from-previous: {previous} does not exist")
        return load_checkpoint(previous), previous
    if not current.exists():
        if previous.exists():
            raise ValueError(f"{current} is missing; {_previous_note(run)}")
        return None, None
    try:
        return load_checkpoint(current), current
    except ValueError as err:
        raise ValueError(f"{err}; {_previous_note(run)}") from None


# What decides the shapes a checkpoint must fit: a checkpoint of a run that differs in one of these is not this
# run's (the number of epochs, say, may be changed in config.json to extend a run).
_IDENTITY = (
    "task",
    "model",
    "dataset",
    "quantizer",
    "bits",
    "estimator",
    "hidden_size",
    "num_fc",
    "num_lstm",
    "nonlinearity",
    "meta_init_scheme",
    "optimizer",
    "step_order",
    "through",
)


def _check_owner(checkpoint: dict[str, Any], path: Path, config: RunConfig, run: RunDir) -> None:
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return  # written by other code: the restore below still checks what it loads
    relevant = _IDENTITY if config.task == "quantize" else ("task", "model", "dataset", "optimizer")
    differ = [k for k in relevant if k in saved and saved[k] != getattr(config, k)]
    if differ:
        theirs = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        ours = ", ".join(f"{k}={getattr(config, k)!r}" for k in differ)
        raise ValueError(
            f"checkpoint {path} was written by another run ({theirs}), not by the run of {run.config_path} ({ours})"
        )
    # The average's weights are part of the checkpoint: a run cannot gain or lose one half-way (its decay may change).
    was = saved.get("ema_decay", 0.0)
    if isinstance(was, (int, float)) and (was > 0) != (config.ema_decay > 0):
        raise ValueError(
            f"{run.config_path} sets ema_decay={config.ema_decay!r}, but checkpoint {path} was written with "
            f"ema_decay={was!r}: a run cannot {'drop its' if was > 0 else 'start a'} weight average half-way; "
            f"put ema_decay back to {was!r}, or start a new run"
        )


def resume(
    run_dir: str | Path,
    *,
    progress: bool = True,
    stop: StopFlag | None = None,
    from_previous: bool = False,
    on_nonfinite: str | None = None,
    max_skipped: int | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, to the same result as an uninterrupted run.

    Everything is restored: model, base optimizer, the trainer's state (MetaQuant: meta quantizer, its
    optimizer, the recorded ``g_Ŵ`` and ``W̃``, LSTM states), the position within the epoch, RNG states. A run
    killed before its first checkpoint starts again from its beginning. A finished run is left as it is.

    The run's files are read through before anything trains (a malformed one is named), the checkpoint is
    verified (CRCs and content digest) and must belong to the run; the process holds the directory's lock
    while it works, so a second process on the same run is refused.

    Args:
        run_dir: a run directory made by ``execute`` (or ``metaquant pretrain``/``quantize``).
        progress: show a progress bar per epoch.
        stop: a ``StopFlag``, as for ``execute``.
        from_previous: continue from ``checkpoint.prev.pt`` (when ``checkpoint.pt`` is damaged); the damaged
            file is kept as ``checkpoint.damaged.pt``.
        on_nonfinite: ``"raise"`` or ``"skip"`` for this continuation, instead of the run's own setting (the
            run's ``config.json`` is not changed).
        max_skipped: the limit of skipped steps for this continuation, instead of the run's own.

    Returns:
        A ``RunResult``; for a finished run, read from its ``metrics.jsonl`` without training.

    Raises:
        FileNotFoundError: no run in ``run_dir`` (no ``config.json``); ``from_previous`` without a previous
            checkpoint.
        ValueError: a malformed ``config.json``, ``metrics.jsonl`` or ``loss.csv``; a damaged checkpoint (the
            message says whether the previous one is intact), or one of another run or model; a bad
            ``on_nonfinite`` or ``max_skipped``.
        RunLockedError: another process is working in ``run_dir``.
        TrainingInterrupted: ``stop`` was set again; the run can be resumed once more.
        NonFiniteError: as for ``execute``.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.config import RunConfig
        >>> from metaquant.guards import StopFlag, TrainingInterrupted
        >>> from metaquant.pipeline import execute, resume
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, estimator="multifc", hidden_size=8, device="cpu")
        >>> stop = StopFlag(); stop.request(2)  # as if SIGINT arrived during the first of the two steps
        >>> try:
        ...     execute(config, "runs/interrupted", progress=False, stop=stop)
        ... except TrainingInterrupted as err:
        ...     print(err)
        stopped by signal 2 at epoch 1, step 1; checkpoint written to runs/interrupted/checkpoint.pt
        >>> resumed = resume("runs/interrupted", progress=False)
        >>> straight = execute(config, "runs/straight", progress=False)  # the same run, never interrupted
        >>> resumed.final_acc == straight.final_acc, (resumed.run_dir / "done").exists()
        (True, True)
        >>> (resumed.run_dir / "loss.csv").read_text() == (straight.run_dir / "loss.csv").read_text()
        True
    """
    run = RunDir(run_dir)
    if not run.path.is_dir() or not run.config_path.exists():
        raise FileNotFoundError(f"--resume {run_dir}: no run there (config.json is missing)")
    config = run.config()
    overrides = {k: v for k, v in (("on_nonfinite", on_nonfinite), ("max_skipped", max_skipped)) if v is not None}
    if overrides:
        config = RunConfig.from_dict({**config.to_dict(), **overrides})  # validates them
        logger.info("continuing %s with %s", run.path, ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    run.check_files()  # a malformed file stops the run now, not after an epoch of training
    if run.is_done():
        metrics = run.metrics()
        if not metrics:
            raise ValueError(f"{run.metrics_path} holds no epoch, yet {run.done_path} says the run has finished")
        logger.info("run %s is already finished", run.path)
        return RunResult(run.path, metrics[-1]["test_acc"], max(m["test_acc"] for m in metrics), len(metrics))
    if config.distill_weight > 0:
        _teacher_path(config)
    init_from_env(config.device)  # join the process group first: every process learns whether the lock was taken
    with _owning(run.path) as writer:
        if writer is not None:
            for stale in run.path.glob(".*.tmp"):  # a write that a kill interrupted; never a complete file
                stale.unlink(missing_ok=True)
        if from_previous and describe_checkpoint(run.checkpoint_path) is not None:
            raise ValueError(
                f"--from-previous: {run.checkpoint_path} is intact; continue from it (without --from-previous)"
            )
        checkpoint, source = _latest_checkpoint(run, from_previous)
        if checkpoint is None:
            logger.info("run %s has no checkpoint yet: starting it from its beginning", run.path)
            session = _prepare(config)
            result = _train(config, session, writer, FitState(), progress, stop)
            return dataclasses.replace(result, run_dir=run.path)
        assert source is not None  # a checkpoint comes with its path
        _check_owner(checkpoint, source, config, run)
        session = _prepare(config, load_init=False, checkpoint=checkpoint)
        if checkpoint.get("teacher", session.teacher_digest) != session.teacher_digest:
            raise ValueError(
                f"the teacher of {run.path}, {_teacher_path(config)}, is not the model the run started with (its "
                "weights changed since); put that model back there, or start a new run"
            )
        try:
            state = restore_fit(checkpoint, session.trainer, averaged=session.averaged)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            reason = " ".join(str(err).split())  # torch's messages span lines; this one is one line
            raise ValueError(
                f"checkpoint {source} does not fit the run of {run.config_path} ({type(err).__name__}: {reason})"
            ) from None
        if not is_main():  # the saved running sums are those of all processes: counted once, by rank 0
            state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0.0, 0, 0
            state.epoch_objective_sum = 0.0
        if writer is not None and source != run.checkpoint_path:
            _adopt_previous(run)
        logger.info("resuming %s at epoch %d, step %d", run.path, state.epoch + 1, state.batch)
        result = _train(config, session, writer, state, progress, stop)
    return dataclasses.replace(result, run_dir=run.path)


def _adopt_previous(run: RunDir) -> None:
    """Make the previous checkpoint the latest again, keeping the damaged one aside (never deleted): the next
    save then copies an intact checkpoint to ``checkpoint.prev.pt``."""
    damaged = run.path / DAMAGED_CHECKPOINT
    if run.checkpoint_path.exists():
        os.replace(run.checkpoint_path, damaged)
        logger.warning(
            "kept the damaged %s as %s; continuing from %s",
            run.checkpoint_path.name,
            damaged.name,
            run.previous_checkpoint_path.name,
        )
    atomic_write_bytes(run.checkpoint_path, run.previous_checkpoint_path.read_bytes())


def _run_model(run: RunDir, device: str | None = None, from_previous: bool = False) -> tuple[RunConfig, nn.Module, Any]:
    """A run's configuration, its model at the latest checkpoint (quantized as it trained, in eval mode, on
    ``device`` or the run's), and its dataset's ``DatasetInfo``; no data is read."""
    config = run.config()
    checkpoint, _ = _latest_checkpoint(run, from_previous)
    if checkpoint is None:
        raise ValueError(f"{run.path} has no checkpoint yet")
    info = dataset_info(config.dataset)
    model = build_model(dataclasses.replace(config, init=None), info.num_classes, info.in_channels, info.image_size)
    load_weights(model, checkpoint)  # reads the average, when the run kept one
    return config, model.to(resolve_device(device or config.device)).eval(), info


def _train_loader(config: RunConfig, device: str, data_dir: str | None) -> Any:
    """The run's training batches as it drew them (batch size, subset, augmentation, seed), on one process."""
    train_loader, _, _ = make_loaders(
        config.dataset,
        data_dir=data_dir or config.data_dir,
        batch_size=config.batch_size,
        device=resolve_device(device),
        seed=config.seed,
        train_size=config.train_size,
        subset_seed=config.subset_seed,
        download=config.download,
        augment=None if config.augment == "auto" else config.augment,
    )
    return train_loader


def _test_loader(config: RunConfig, device: str, data_dir: str | None) -> Any:
    test_loader, _ = make_test_loader(
        config.dataset,
        data_dir=data_dir or config.data_dir,
        batch_size=config.test_batch_size,
        device=resolve_device(device),
        seed=config.seed,
        test_size=config.test_size,
        download=config.download,
    )
    return test_loader


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse an export target that would destroy something: a run's own file or any torch checkpoint (even
    with ``overwrite``), or any existing file without ``overwrite``."""
    if (path.parent / "config.json").is_file() and path.name in RUN_FILES:
        raise ValueError(
            f"--out {path} is a file of the run in {path.parent}; an export never replaces one (choose another --out)"
        )
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file name")
    if path.exists():
        try:
            with zipfile.ZipFile(path) as archive:
                checkpoint = any(n.endswith("data.pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            checkpoint = False
        if checkpoint:
            raise ValueError(f"--out {path} is a torch checkpoint; an export never replaces one (choose another --out)")
        if not overwrite:
            raise FileExistsError(f"--out {path} already exists; choose another --out, or replace it with --overwrite")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {path}: the folder {path.parent} does not exist")


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "packed",
    *,
    overwrite: bool = False,
    from_previous: bool = False,
) -> tuple[Path, int, int]:
    """Write a quantization run's model as a packed file (default ``RUN_DIR/model.safetensors``) or as ONNX
    (``fmt="onnx"``, default ``RUN_DIR/model.onnx``).

    The model is the run's latest checkpoint, quantized as it trained (the weight average, when the run kept
    one: the model it delivers); the file's metadata holds the run's configuration and its final test
    accuracy, so ``evaluate_artifact`` can test it on the run's own data.

    Args:
        run_dir: a ``quantize`` run directory with a checkpoint.
        out: the file to write (default: ``model.safetensors`` or ``model.onnx`` in ``run_dir``).
        fmt: ``"packed"`` (``export.export_packed``) or ``"onnx"`` (``export.export_onnx``).
        overwrite: replace an existing file at the target; a torch checkpoint or a file of a run is never
            replaced.
        from_previous: export the run's previous checkpoint (``checkpoint.prev.pt``), e.g. when the latest
            one is damaged; the latest one is verified (CRCs and digest) before use and refused when damaged.

    Returns:
        ``(path, file size in bytes, float model size in bytes)``; the float size is that of the model's
        ``state_dict`` saved with ``torch.save``.

    Raises:
        FileNotFoundError: no run in ``run_dir``; the folder of ``out`` does not exist.
        FileExistsError: the target exists and ``overwrite`` is False.
        ValueError: the run has no checkpoint yet or a damaged one (the message says whether the previous one
            is intact), is a ``pretrain`` run, or ``fmt`` is neither ``packed`` nor ``onnx``; the target is a
            torch checkpoint, a file of a run or a directory.
        ImportError: ``fmt="onnx"`` without the ``onnx`` extra.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import execute, export_run
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, device="cpu")
        >>> _ = execute(config, "runs/to-export", progress=False)
        >>> path, size, float_size = export_run("runs/to-export")
        >>> path.name, size < float_size / 10  # 1 bit per quantized weight instead of 32
        ('model.safetensors', True)
    """
    from .export import export_onnx, export_packed

    run = RunDir(run_dir)
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: no run there (config.json is missing)")
    config, model, info = _run_model(run, "cpu", from_previous)
    if config.task != "quantize":
        raise ValueError(f"{run_dir} is a {config.task} run; only quantization runs can be exported packed")
    metrics = run.metrics()
    metadata = {
        "run": config.to_dict(),
        "test_acc": metrics[-1]["test_acc"] if metrics else None,
        "epochs": len(metrics),
    }
    arch = {
        "model": config.model,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size,
    }
    if fmt == "onnx":
        path = Path(out) if out else run.path / "model.onnx"
        _check_output(path, overwrite)
        example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        size = export_onnx(model.cpu(), path, example, metadata=metadata)
    elif fmt == "packed":
        path = Path(out) if out else run.path / "model.safetensors"
        _check_output(path, overwrite)
        size = export_packed(model.cpu(), path, architecture=arch, metadata=metadata)
    else:
        raise ValueError(f"export format {fmt!r} is not supported; allowed: packed, onnx")
    buffer = io.BytesIO()
    torch.save(dequantize_(model).state_dict(), buffer)
    return path, size, buffer.tell()


def evaluate_artifact(
    path: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    from_previous: bool = False,
    precise_bn_batches: int = 0,
) -> dict[str, Any]:
    """Test accuracy of a run directory's checkpoint or of a packed file, on the run's own test set.

    The test set is the one named by the run's configuration (stored in a packed or ONNX file's metadata by
    ``export_run``), with ``data_dir`` in place of the run's own when given. With ``precise_bn_batches``, the
    BatchNorm running statistics are first recomputed from that many batches of the run's training set (its
    batch size, augmentation and seed; ``batchnorm.recompute_batchnorm_stats``): a 1-bit model's running
    statistics can lag behind its last weights, and this tells a model's accuracy from that of its statistics.

    Args:
        path: a run directory, a packed file (``export_packed``) or an ONNX file (``.onnx``).
        data_dir: where the data set lies, if not where the run found it.
        device: where to evaluate (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        from_previous: for a run directory, evaluate its previous checkpoint (``checkpoint.prev.pt``); the
            latest one is verified (CRCs and digest) before use and refused when damaged.
        precise_bn_batches: 0 (the model's own statistics), or the number of training batches to recompute the
            BatchNorm statistics from before testing (not for an ONNX file).

    Returns:
        ``{"top1", "top5", "loss", "recorded"}``: top-1 and top-5 accuracy in percent, mean cross-entropy,
        and the run's recorded final test accuracy (None if it has none).

    Raises:
        FileNotFoundError: no run in the directory, no such file, or the data set is not found.
        ValueError: a run without checkpoint, or with a damaged one (the message says whether the previous
            one is intact); a damaged packed or ONNX file, or one whose metadata does not name its run;
            ``device`` asks for CUDA without CUDA; ``from_previous`` for a file; ``precise_bn_batches`` not an
            integer >= 0, or given for an ONNX file.
        ImportError: an ONNX file without ``onnxruntime`` installed.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.config import RunConfig
        >>> from metaquant.pipeline import evaluate_artifact, execute, export_run
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, device="cpu")
        >>> _ = execute(config, "runs/to-evaluate", progress=False)
        >>> path, _, _ = export_run("runs/to-evaluate")  # runs/to-evaluate/model.safetensors
        >>> result = evaluate_artifact(path, device="cpu")  # the packed file computes what the run computed
        >>> result["top1"] == result["recorded"], sorted(result)
        (True, ['loss', 'recorded', 'top1', 'top5'])
    """
    from .batchnorm import recompute_batchnorm_stats
    from .export import load_packed, read_packed

    if isinstance(precise_bn_batches, bool) or not isinstance(precise_bn_batches, int) or precise_bn_batches < 0:
        raise ValueError(f"precise_bn_batches must be an integer >= 0, got {precise_bn_batches!r}")
    path = Path(path)
    if precise_bn_batches and path.suffix == ".onnx":
        raise ValueError(f"precise_bn_batches applies to a run directory or a packed file, not to the ONNX file {path}")
    if path.is_dir():
        run = RunDir(path)
        if not run.config_path.exists():
            raise FileNotFoundError(f"{path}: no run there (config.json is missing)")
        config, model, _ = _run_model(run, device, from_previous)
        metrics = run.metrics()
        # the recorded accuracy is that of the latest checkpoint
        recorded = metrics[-1]["test_acc"] if metrics and not from_previous else None
    else:
        if from_previous:
            raise ValueError(f"--from-previous applies to a run directory, not to the file {path}")
        if path.suffix == ".onnx":
            header, onnx_model = _onnx_model(path)
            # evaluate() uses only .training, .eval(), .train(mode) and calls, which _OnnxClassifier provides
            model = cast(nn.Module, onnx_model)
        else:
            header, _ = read_packed(path)
            model = load_packed(path).to(resolve_device(device))
        run_config = header.get("metadata", {}).get("run")
        if run_config is None:
            raise ValueError(f"{path} does not say which data it was trained on (no run in its metadata)")
        config = RunConfig.from_dict(run_config)
        recorded = header["metadata"].get("test_acc")
    test_loader = _test_loader(config, device, data_dir)
    if precise_bn_batches:
        recompute_batchnorm_stats(model, _train_loader(config, device, data_dir), precise_bn_batches)
    result = evaluate(model, test_loader)
    return {**result, "recorded": recorded}


class _OnnxClassifier:
    """An ONNX model behind the call signature ``evaluate`` needs: logits from a batch tensor."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.training = False
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input: x.detach().cpu().numpy()})
        return torch.from_numpy(logits).to(x.device)

    def eval(self) -> _OnnxClassifier:
        return self

    def train(self, mode: bool = True) -> _OnnxClassifier:
        return self


def _onnx_model(path: Path) -> tuple[dict[str, Any], _OnnxClassifier]:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("evaluating ONNX files needs onnxruntime: pip install 'metaquant-torch[onnx]'") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    meta = session.get_modelmeta().custom_metadata_map
    metadata = {k: json.loads(v) for k, v in meta.items()}
    return {"metadata": metadata}, _OnnxClassifier(session)
