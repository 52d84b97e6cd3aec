"""A run's model out of its directory: exported as a packed or ONNX file, or evaluated (a run, a packed or an
ONNX file) on the run's own test set.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..batchnorm import recompute_batchnorm_stats_counted
from ..data import dataset_info, make_loaders, make_test_loader
from ..export import (
    DIGEST_KEY,
    MIN_OPSET,
    export_onnx,
    export_packed,
    load_packed,
    onnx_session_options,
    read_onnx,
    read_packed,
)
from ..layers import dequantize_
from ..models import load_weights
from ..training import evaluate
from .builders import build_model, resolve_device
from .config import RunConfig
from .lifecycle import latest_checkpoint
from .runs import RUN_FILES, RunDir

__all__ = ["export_run", "evaluate_artifact"]

logger = logging.getLogger(__name__)

#: The fields of a run's configuration that describe the machine it trained on (paths, the device), which an
#: exported file leaves out: evaluating it needs none of them.
MACHINE_FIELDS = ("data_dir", "device", "init", "teacher", "meta_init", "lr_gain_from")


def _run_model(run: RunDir, device: str | None = None, from_previous: bool = False) -> tuple[RunConfig, nn.Module, Any]:
    """A run's configuration, its model at the latest checkpoint (quantized as it trained, in eval mode, on
    ``device`` or the run's), and its dataset's ``DatasetInfo``; no data is read."""
    config = run.config()
    checkpoint, _ = latest_checkpoint(run, from_previous)
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
            f"`out` {path} is a file of the run in {path.parent}; an export never replaces one (choose another `out`)"
        )
    if path.is_dir():
        raise ValueError(f"`out` {path} is a directory; give a file name")
    if path.exists():
        try:
            with zipfile.ZipFile(path) as archive:
                checkpoint = any(n.endswith("data.pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            checkpoint = False
        if checkpoint:
            raise ValueError(f"`out` {path} is a torch checkpoint; an export never replaces one (choose another `out`)")
        if not overwrite:
            raise FileExistsError(f"`out` {path} already exists; choose another `out`, or replace it with `overwrite`")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"`out` {path}: the folder {path.parent} does not exist")


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "packed",
    *,
    overwrite: bool = False,
    from_previous: bool = False,
    opset: int | None = None,
) -> tuple[Path, int, int]:
    """Write a quantization run's model as a packed file (default ``RUN_DIR/model.safetensors``) or as ONNX
    (``fmt="onnx"``, default ``RUN_DIR/model.onnx``).

    The model is the run's latest checkpoint, quantized as it trained (the weight average, when the run kept
    one: the model it delivers); the file's metadata holds the run's configuration (without the fields of
    ``MACHINE_FIELDS``: the paths and device of the machine that trained it), its final test accuracy and the
    input normalisation, so ``evaluate_artifact`` can test it on the run's own data.

    Args:
        run_dir: a ``quantize`` run directory with a checkpoint.
        out: the file to write (default: ``model.safetensors`` or ``model.onnx`` in ``run_dir``).
        fmt: ``"packed"`` (``export.export_packed``) or ``"onnx"`` (``export.export_onnx``).
        overwrite: replace an existing file at the target; a torch checkpoint or a file of a run is never
            replaced.
        from_previous: export the run's previous checkpoint (``checkpoint.prev.pt``), e.g. when the latest
            one is damaged; the latest one is verified (CRCs and digest) before use and refused when damaged.
        opset: for ``fmt="onnx"``, the ONNX opset (``export.export_onnx``; default 21).

    Returns:
        ``(path, file size in bytes, float model size in bytes)``; the float size is that of the model's
        ``state_dict`` saved with ``torch.save``.

    Raises:
        FileNotFoundError: no run in ``run_dir``; the folder of ``out`` does not exist.
        FileExistsError: the target exists and ``overwrite`` is False.
        ValueError: the run has no checkpoint yet or a damaged one (the message says whether the previous one
            is intact), is a ``pretrain`` run, or ``fmt`` is neither ``packed`` nor ``onnx``; the target is a
            torch checkpoint, a file of a run or a directory; ``opset`` below 13, or given for ``packed``.
        ImportError: ``fmt="onnx"`` without the ``onnx`` extra.

    Example:
        >>> for split in ("train", "t10k"):  # a tiny stand-in for MNIST, in its real format: 8 + 8 images
        ...     images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        ...     _ = mq.data.write_idx(f"mnist/{split}-images-idx3-ubyte", images)
        ...     _ = mq.data.write_idx(f"mnist/{split}-labels-idx1-ubyte", torch.randint(0, 10, (8,), dtype=torch.uint8))
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.artifacts import export_run
        >>> from metaquant.experiments.lifecycle import execute
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, device="cpu")
        >>> _ = execute(config, "runs/to-export", progress=False)
        >>> path, size, float_size = export_run("runs/to-export")
        >>> path.name, size < float_size / 10  # 1 bit per quantized weight instead of 32
        ('model.safetensors', True)
    """
    if fmt not in ("packed", "onnx"):
        raise ValueError(f"export format {fmt!r} is not supported; allowed: packed, onnx")
    if opset is not None and (
        fmt != "onnx" or isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET
    ):
        raise ValueError(f"`opset` applies to the onnx format and must be an integer >= {MIN_OPSET}, got {opset!r}")
    run = RunDir(run_dir)
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: no run there (config.json is missing)")
    config, model, info = _run_model(run, "cpu", from_previous)
    if config.task != "quantize":
        raise ValueError(f"{run_dir} is a {config.task} run; only quantization runs can be exported packed")
    metrics = run.metrics()
    normalization = {"rule": "(pixels / 255 - mean) / std", "mean": list(info.mean), "std": list(info.std)}
    metadata = {
        "run": {k: v for k, v in config.to_dict().items() if k not in MACHINE_FIELDS},
        "test_acc": metrics[-1]["test_acc"] if metrics else None,
        "epochs": len(metrics),
    }
    path = Path(out) if out else run.path / ("model.onnx" if fmt == "onnx" else "model.safetensors")
    _check_output(path, overwrite)
    if fmt == "onnx":
        example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        metadata["input_normalization"] = normalization
        size = export_onnx(model.cpu(), path, example, metadata=metadata, **({} if opset is None else {"opset": opset}))
    else:
        arch = {"model": config.model, "num_classes": info.num_classes}
        arch |= {"in_channels": info.in_channels, "image_size": info.image_size}
        size = export_packed(model.cpu(), path, architecture=arch, input_normalization=normalization, metadata=metadata)
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
    ``export_run``), with ``data_dir`` in place of the run's own when given. A file does not carry the data
    folder of the machine that trained it: without ``data_dir``, a file in a run directory reads that run's, any
    other file the default places (``data.make_loaders``). With ``precise_bn_batches``, the
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
        and the run's recorded final test accuracy (None if it has none); with ``precise_bn_batches`` also
        ``"precise_bn_batches"`` and ``"precise_bn_examples"``: the training batches and examples the statistics
        were recomputed from (fewer than asked when the training set has fewer).

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
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.artifacts import evaluate_artifact, export_run
        >>> from metaquant.experiments.lifecycle import execute
        >>> config = RunConfig(model="resnet8", dataset="mnist", data_dir="mnist", download=False, batch_size=4,
        ...                    epochs=1, device="cpu")
        >>> _ = execute(config, "runs/to-evaluate", progress=False)
        >>> path, _, _ = export_run("runs/to-evaluate")  # runs/to-evaluate/model.safetensors
        >>> result = evaluate_artifact(path, device="cpu")  # the packed file computes what the run computed
        >>> result["top1"] == result["recorded"], sorted(result)
        (True, ['loss', 'recorded', 'top1', 'top5'])
    """
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
            raise ValueError(f"`from_previous` applies to a run directory, not to the file {path}")
        if path.suffix == ".onnx":
            header, onnx_model = _onnx_model(path)  # its content digest checked
            # evaluate() uses only .training, .eval(), .train(mode) and calls, which _OnnxClassifier provides
            model = cast(nn.Module, onnx_model)
        else:
            header, _ = read_packed(path)  # both check the file's content digest
            model = load_packed(path).to(resolve_device(device))
        run_config = header.get("metadata", {}).get("run")
        if run_config is None:
            raise ValueError(f"{path} does not say which data it was trained on (no run in its metadata)")
        config = RunConfig.from_dict(run_config)
        recorded = header["metadata"].get("test_acc")
        data_dir = data_dir or _local_data_dir(path)
    test_loader = _test_loader(config, device, data_dir)
    used: dict[str, int] = {}
    if precise_bn_batches:
        source = recompute_batchnorm_stats_counted(model, _train_loader(config, device, data_dir), precise_bn_batches)
        used = {"precise_bn_batches": source.batches, "precise_bn_examples": source.examples}
    result = evaluate(model, test_loader)
    return {**result, "recorded": recorded, **used}


def _local_data_dir(path: Path) -> str | None:
    """The data folder of the run whose directory holds the exported file ``path``, if it lies in one."""
    try:
        return RunConfig.load(path.parent / "config.json").data_dir
    except (ValueError, OSError):
        return None


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
        raise ImportError(
            "evaluating ONNX files needs onnxruntime (of the onnx extra): pip install onnxruntime"
        ) from None
    data = read_onnx(path)  # the bytes whose digest was checked are the bytes run
    try:  # with the options that fold the weights' DequantizeLinear once (export.runtime)
        session = onnxruntime.InferenceSession(data, onnx_session_options(), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    meta = session.get_modelmeta().custom_metadata_map
    metadata = {k: json.loads(v) for k, v in meta.items() if k != DIGEST_KEY}
    return {"metadata": metadata}, _OnnxClassifier(session)
