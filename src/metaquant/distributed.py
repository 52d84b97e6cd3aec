"""Data-parallel training with ``torch.distributed``: set-up from ``torchrun``'s environment, and reductions.

Every process trains the same model on its own shard of each batch (``batch_size`` is per process) inside
``DistributedDataParallel``, which averages the ordinary gradients. MetaQuant also averages the recorded
``g_Ŵ`` and the meta quantizer's gradients (``algorithm.py``), so every process computes the same update.
Only rank 0 writes files. BatchNorm uses each shard's statistics (PyTorch's default) unless ``sync_bn=True``
selects ``SyncBatchNorm``, whose statistics span the whole batch.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "init_from_env",
    "is_distributed",
    "is_main",
    "all_reduce_mean_",
    "all_reduce_sum",
    "any_process",
    "wrap",
    "unwrap",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: global ``rank`` (0 writes the files), ``world_size``, ``local_rank`` on this node."""

    rank: int
    world_size: int
    local_rank: int


def init_from_env(device: str = "auto") -> DistInfo | None:
    """Join the process group described by ``torchrun``'s environment; None unless ``WORLD_SIZE`` > 1.

    The backend is NCCL on CUDA (the device becomes ``cuda:LOCAL_RANK``) and gloo on the CPU or with
    ``device="cpu"``; a process group that already exists is joined as it is.

    Raises:
        ValueError: ``WORLD_SIZE``/``LOCAL_RANK`` is not an integer, or a variable of the ``env://``
            rendezvous (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is missing.
        RuntimeError: the group cannot form (e.g. the other processes do not join before the timeout).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def is_distributed() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process writes files and logs: rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_mean_(tensors: Iterable[Tensor | None]) -> None:
    """Average each tensor (``None`` skipped) across processes in place, in one all-reduce; a no-op in one process.

    MetaQuant averages the recorded ``g_Ŵ`` and the meta quantizer's gradients this way.
    """
    if not is_distributed():
        return
    present = [t for t in tensors if t is not None]
    if not present:
        return
    flat = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in present:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo works on the CPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of a few numbers over all processes (``values`` itself in one process)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process: all processes stop together when one received a stop signal."""
    if not is_distributed():
        return flag
    return all_reduce_sum([float(flag)])[0] > 0


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False, find_unused: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel``, its BatchNorms converted to ``SyncBatchNorm`` if ``sync_bn``.

    ``find_unused`` must be set for MetaQuant: its quantized weights get no autograd gradient after iteration 0
    (their gradient is the meta quantizer's ``g_W``).

    Raises:
        ValueError: there is no process group (``init_from_env`` returned None: use the model as it is).
    """
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP and/or ``torch.compile`` wrapper, or ``model`` itself.

    Checkpoints, traces and exports use it, so their keys do not depend on the number of processes.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    # torch.compile's wrapper holds the module it compiles as ``_orig_mod`` (same parameters, same names).
    return getattr(model, "_orig_mod", model)


def shutdown(clean: bool = True) -> bool:
    """Leave the process group if this process joined one; returns whether it did. Call it on every exit path.

    On a clean exit the processes first meet at a barrier, so none tears down connections another still uses.
    The group is destroyed explicitly (after collecting DDP's reducer): left to the interpreter's exit, gloo's
    threads can abort the process with SIGABRT after all the work was done. After a failure (``clean=False``)
    there is no barrier: the other processes may be stuck elsewhere and torchrun stops them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    return True
