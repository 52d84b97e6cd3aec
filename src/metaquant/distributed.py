"""Data-parallel training with ``torch.distributed``: set-up from ``torchrun``'s environment, and reductions.

Under ``torchrun --nproc_per_node N -m metaquant quantize ...`` every process trains the same model on its own
shard of each batch (``batch_size`` is per process). The model is wrapped in ``DistributedDataParallel``,
which averages the gradients of the ordinary parameters. MetaQuant adds two reductions of its own
(``algorithm.py``): the recorded ``g_Ŵ`` is averaged across processes before it reaches the meta quantizer,
and so are the meta quantizer's gradients, so that every process computes the same meta gradient, the same
``g_W`` and the same update. Only rank 0 writes files.

BatchNorm: by default each process normalizes with its own shard's statistics and DDP broadcasts rank 0's
running statistics at every forward pass (PyTorch's default); ``sync_bn=True`` (``--sync-bn``) uses
``SyncBatchNorm``, whose statistics span the whole batch, so the result does not depend on the number of
processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo", "init_from_env", "is_distributed", "is_main", "all_reduce_mean_", "all_reduce_sum", "any_process",
    "wrap", "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: global rank, number of processes, rank on this node."""

    rank: int
    world_size: int
    local_rank: int


def init_from_env(device: str = "auto") -> DistInfo | None:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE`` > 1); None otherwise.

    The backend is NCCL when the processes train on CUDA and gloo on the CPU; the rendezvous is torchrun's
    (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint`` for several machines).
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
    """Rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_mean_(tensors: Iterable[Tensor | None]) -> None:
    """Average each tensor across processes, in place (one flattened all-reduce); a no-op in one process."""
    if not is_distributed():
        return
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo works on the CPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers across processes (returns them unchanged in one process)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself in one process)."""
    if not is_distributed():
        return flag
    return all_reduce_sum([float(flag)])[0] > 0


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False, find_unused: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (with ``SyncBatchNorm`` if asked).

    ``find_unused``: MetaQuant's quantized weights receive no autograd gradient after iteration 0 (their
    gradient is the meta quantizer's ``g_W``), which DDP must be told.
    """
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
