"""From a ``RunConfig`` to a finished run: build data, model, optimizer and trainer, then ``fit``.

This is what ``metaquant pretrain`` and ``metaquant quantize`` execute; it is also the easiest way to start a
run from Python: ``execute(RunConfig(task="quantize", init="runs/pretrain/checkpoint.pt"), "runs/q")``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from .config import RunConfig
from .data import make_loaders
from .estimators import CLASSICAL_ESTIMATORS, EWGS, ClassicalEstimator
from .layers import QuantConfig, quantize_
from .models import get_model, load_weights
from .runs import CHECKPOINT, RunDir
from .trainer import Trainer
from .training import FitState, fit, seed_everything, step_schedule

__all__ = ["execute", "resolve_device", "build_optimizer", "build_trainer", "default_run_name", "RunResult"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports."""

    run_dir: Path | None
    final_acc: float
    best_acc: float
    epochs: int


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def build_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    """The base optimizer named by ``config.optimizer`` with its options."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, dampening=config.dampening,
            nesterov=config.nesterov, weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer {config.optimizer!r} is not supported")  # RunConfig already refuses it


def classical_estimator(config: RunConfig) -> ClassicalEstimator:
    if config.estimator == "ewgs":
        return EWGS(config.ewgs_delta)
    return CLASSICAL_ESTIMATORS[config.estimator]()


def build_trainer(config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
    """The object doing one step per batch: plain back-propagation for pre-training and classical estimators."""
    if config.task == "pretrain":
        return Trainer(model, optimizer)
    if config.estimator in CLASSICAL_ESTIMATORS:
        return Trainer(model, optimizer, classical_estimator(config))
    raise ValueError(f"estimator {config.estimator!r} is not available in this version")


def default_run_name(config: RunConfig) -> str:
    """A readable, unique-per-configuration directory name."""
    base = f"{config.task}-{config.model}-{config.dataset}"
    if config.task == "pretrain":
        return f"{base}-{config.optimizer}-seed{config.seed}"
    return f"{base}-{config.quantizer}{config.bits}-{config.estimator}-{config.optimizer}-seed{config.seed}"


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


def execute(config: RunConfig, run_dir: str | Path | None, *, progress: bool = True) -> RunResult:
    """Run ``config`` to the end, writing into a new ``run_dir`` (None: write nothing)."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    train_loader, test_loader, info = make_loaders(
        config.dataset, data_dir=config.data_dir, batch_size=config.batch_size,
        test_batch_size=config.test_batch_size, device=device, seed=config.seed,
        train_size=config.train_size, test_size=config.test_size, download=config.download,
    )
    model = build_model(config, info.num_classes, info.in_channels, info.image_size).to(device)
    optimizer = build_optimizer(model.parameters(), config)
    trainer = build_trainer(config, model, optimizer)
    run = RunDir.create(run_dir, config) if run_dir is not None else None
    logger.info("run %s: %s on %s, %d training batches per epoch", run.path if run else "-", config.model,
                device, len(train_loader))
    state = fit(
        model, trainer, train_loader, test_loader, epochs=config.epochs,
        schedule=step_schedule(config.lr_schedule, config.epochs, config.lr_step, config.lr_gamma),
        run=run, state=FitState(), extra_checkpoint=lambda: {"config": config.to_dict()}, progress=progress,
    )
    if run is not None:
        run.mark_done()
    return RunResult(run_dir=run.path if run else None, final_acc=state.last_acc, best_acc=state.best_acc,
                     epochs=state.epoch)
