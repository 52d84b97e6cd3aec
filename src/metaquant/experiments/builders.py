"""What a run trains with, built from its ``RunConfig``: device, model, optimizer, trainer, meta quantizer,
teacher, and the data loaders of a session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..algorithm import MetaQuant
from ..averaging import ema_model
from ..data import make_loaders
from ..distill import Distillation
from ..distributed import init_from_env, wrap
from ..estimators import CLASSICAL_ESTIMATORS, EWGS, ClassicalEstimator
from ..layers import QuantConfig, quantize_, quantized_weight_keys
from ..layers.base import INPUT_QUANTIZER, LEARNED_PREFIX
from ..layout import apply_memory_format, preferred_memory_format
from ..meta import LSTMFC, META_QUANTIZERS, MetaQuantizer
from ..models import extract_state_dict, get_model, load_weights, read_checkpoint
from ..precision import make_grad_scaler
from ..quantizers import QUANTIZERS
from ..trainer import Trainer
from ..training import seed_everything
from .config import RunConfig
from .equivalent import equivalent_sgd, learned_gain
from .meta_files import load_meta, meta_config
from .runs import CHECKPOINT

__all__ = [
    "resolve_device",
    "build_optimizer",
    "classical_estimator",
    "build_meta",
    "lstm_keep_share",
    "quantized_numel",
    "build_model",
    "build_trainer",
    "build_teacher",
]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` named by ``RunConfig.device``: ``auto`` → CUDA when available, else CPU.

    Raises:
        ValueError: ``name`` asks for CUDA (``"cuda"``, ``"cuda:N"``) and CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use `device` cpu or auto")
    return torch.device(name)


def build_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    """The base optimizer named by ``config.optimizer`` with its options.

    ``sgd`` takes ``lr``, ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay``; ``adam`` and ``adamw``
    take ``lr`` and ``weight_decay``.
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


#: How much memory (bytes) the command line lets LSTMFC keep its gates in, on a CPU, for the backward pass instead
#: of recomputing them (a third of its matrix products): all of them for ResNet20 with hidden 100 (433 MB), a
#: share of a larger network's (rounded up to whole blocks of rows). Kept or recomputed, the values are the same
#: to the bit; with freed memory reused (``allocator.reuse_freed_memory``, which the program sets) keeping them is
#: the faster, with glibc's defaults about as fast (docs/performance.md). Not on a GPU, where it was not measured.
KEPT_GATES_BYTES = 2**30


def lstm_keep_share(num_weights: int, hidden: int, num_lstm: int, dtype: torch.dtype = torch.float32) -> float:
    """The share of coordinates whose gates an LSTMFC over ``num_weights`` quantized weights keeps within
    ``KEPT_GATES_BYTES`` (``N × 4·hidden`` gates per LSTM layer)."""
    size = num_weights * 4 * hidden * num_lstm * torch.finfo(dtype).bits // 8
    return 1.0 if size <= KEPT_GATES_BYTES else KEPT_GATES_BYTES / size


def build_meta(config: RunConfig, num_weights: int = 0, dtype: torch.dtype = torch.float32) -> MetaQuantizer:
    """The meta quantizer named by ``config.estimator`` with its options; an LSTMFC for ``num_weights`` quantized
    weights of ``dtype`` keeps the gates that fit in ``KEPT_GATES_BYTES`` (none for 0: off a CPU, or when it is
    built without a model)."""
    cls = META_QUANTIZERS[config.estimator]
    if cls is LSTMFC:
        keep = lstm_keep_share(num_weights, config.hidden_size, config.num_lstm, dtype) if num_weights else 0.0
        return LSTMFC(
            config.hidden_size,
            config.num_lstm,
            config.nonlinearity,
            keep_gates=keep,
            init_scheme=config.meta_init_scheme,
        )
    return cls(config.hidden_size, config.num_fc, config.nonlinearity, init_scheme=config.meta_init_scheme)


def quantized_numel(model: nn.Module) -> int:
    """The number of latent weights of ``model``'s quantized layers (a tied weight counted once)."""
    tensors = model.state_dict(keep_vars=True)
    return sum({id(tensors[key]): tensors[key].numel() for key in quantized_weight_keys(model)}.values())


def build_trainer(config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> Trainer | MetaQuant:
    """The object doing one step per batch: a ``Trainer`` for pre-training and classical estimators, ``MetaQuant``
    (with the meta quantizer, loaded from ``meta_init`` if given) for meta quantizers.

    Raises:
        ValueError: as ``MetaQuant`` (e.g. a model without quantized layers); ``meta_init`` holds no meta
            quantizer or one of another architecture.
        FileNotFoundError: ``meta_init`` names no ``meta.pt``, checkpoint or run directory.
    """
    weight = next(model.parameters())
    scaler = make_grad_scaler(config.amp, weight.device)  # fp16 only
    if config.task == "pretrain":
        return Trainer(model, optimizer, on_nonfinite=config.on_nonfinite, grad_scaler=scaler)
    if config.estimator in CLASSICAL_ESTIMATORS:
        return Trainer(
            model, optimizer, classical_estimator(config), on_nonfinite=config.on_nonfinite, grad_scaler=scaler
        )
    meta = build_meta(config, quantized_numel(model) if weight.device.type == "cpu" else 0, weight.dtype)
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


def init_path(init: str) -> Path:
    path = Path(init)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"`init` {init}: no such checkpoint file (or run directory with {CHECKPOINT})")
    return path


def build_model(config: RunConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The full-precision model, loaded from ``config.init`` when given, then quantized for ``quantize`` runs
    (weights, and activations with ``config.act_quantizer``). An ``init`` that holds what quantizers learn (input
    quantizers, or learned weight steps: a quantized run, fine-tuned here) is loaded into the quantized model: only
    that one has them."""
    model = get_model(config.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    init = init_path(config.init) if config.init else None
    fine_tuning = init is not None and config.task == "quantize" and _holds_quantizer_state(init)
    if init is not None and not fine_tuning:
        load_weights(model, init)
    if config.task == "quantize":
        weights = QuantConfig(
            config.quantizer, config.bits, activations=config.activations(), group_size=config.group_size
        )
        # per-group scales group the inputs of 2-D weights: the linear layers only, the convolutions stay float
        linear_only = _linear if weights.forward_quantizer.scale_group_size is not None else None
        quantize_(model, weights, filter_fn=linear_only)
    if init is not None and fine_tuning:
        load_weights(model, init)
    return model


def _linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def _holds_quantizer_state(path: Path) -> bool:
    try:
        state = extract_state_dict(read_checkpoint(path))
    except ValueError:
        return False  # load_weights says what is wrong with it, naming the file
    learned = tuple(f".{LEARNED_PREFIX}{name}" for cls in QUANTIZERS.values() for name in cls.learned)
    return any(f".{INPUT_QUANTIZER}." in key or key.endswith(learned) for key in state)


def with_learned_gain(config: RunConfig) -> RunConfig:
    """``config`` as the equivalent STE of its ``lr_gain_from`` FC-Grad run: ``lr`` times the gain ``k̄`` that run
    learned, ``weight_decay`` divided by it (``equivalent.equivalent_sgd``; docs/design.md §6.2).

    Raises:
        ValueError: the run cannot be that run's equivalent (``equivalent.check_equivalent``), or ``k̄ <= 0``.
    """
    if config.lr_gain_from is None:
        return config
    gain = learned_gain(config.lr_gain_from, config.to_dict())
    if not gain > 0:
        raise ValueError(
            f"the FC-Grad run {config.lr_gain_from} learned a mean gain {gain:g} <= 0: no STE "
            "learning rate is equivalent to it"
        )
    lr, weight_decay = equivalent_sgd(config.lr, config.weight_decay, gain)
    logger.info(
        "equivalent STE: lr %g x the gain %.4f that %s learned = %g, weight decay %g / %.4f = %g",
        config.lr,
        gain,
        config.lr_gain_from,
        lr,
        config.weight_decay,
        gain,
        weight_decay,
    )
    return dataclasses.replace(config, lr=lr, weight_decay=weight_decay)


@dataclass
class Session:
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
    """
    path = teacher_path(config)
    checkpoint = read_checkpoint(path)
    owner = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if isinstance(owner, dict) and owner.get("task") == "quantize":
        raise ValueError(
            f"the teacher {path} is a checkpoint of a quantization run: its latent weights are not a "
            "full-precision model; name a pre-trained model as the teacher (`teacher`)"
        )
    teacher = get_model(config.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    load_weights(teacher, checkpoint)
    return teacher


def teacher_path(config: RunConfig) -> Path:
    """The checkpoint of a distilling run's teacher; checked before any data is read."""
    if config.teacher:
        source, field = config.teacher, "teacher"
    elif config.init:
        source, field = config.init, "init"
    else:
        raise ValueError(
            f"distill_weight {config.distill_weight} distils from a full-precision model: give teacher "
            "(`teacher`) or init (`init`), a pre-trained checkpoint or run directory"
        )
    try:
        return init_path(source)
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


def prepare_session(config: RunConfig, *, load_init: bool = True, checkpoint: dict[str, Any] | None = None) -> Session:
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
    optimizer = build_optimizer(model.parameters(), with_learned_gain(config))
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
    return Session(model, trainer, train_loader, test_loader, criterion, digest, averaged)
