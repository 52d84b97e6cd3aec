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
    """This process's place: global rank, number of processes, rank on this node.

    Returned by ``init_from_env`` under ``torchrun``; ``local_rank`` picks the process's GPU.

    Attributes:
        rank: global rank, 0 … ``world_size`` − 1 (rank 0 writes the files).
        world_size: number of processes.
        local_rank: rank on this machine (``LOCAL_RANK``).

    Example:
        >>> import dataclasses
        >>> from metaquant.distributed import DistInfo
        >>> info = DistInfo(rank=3, world_size=4, local_rank=1)  # the second process of the second machine
        >>> info.rank == info.world_size - 1
        True
        >>> try:
        ...     info.rank = 0
        ... except dataclasses.FrozenInstanceError:
        ...     print("read-only")
        read-only
    """

    rank: int
    world_size: int
    local_rank: int


def init_from_env(device: str = "auto") -> DistInfo | None:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE`` > 1); None otherwise.

    The backend is NCCL when the processes train on CUDA and gloo on the CPU; the rendezvous is torchrun's
    (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint`` for several machines). On CUDA, the process's device
    becomes ``cuda:LOCAL_RANK``. A process group that already exists is joined as it is.

    Args:
        device: the run's ``RunConfig.device``; ``"cpu"`` selects gloo even where CUDA is available.

    Returns:
        This process's ``DistInfo``, or None when ``WORLD_SIZE`` is unset or 1 (a plain single process).

    Raises:
        ValueError: ``WORLD_SIZE`` or ``LOCAL_RANK`` is not an integer, or a variable of the ``env://``
            rendezvous (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is missing.
        RuntimeError: ``torch.distributed`` cannot form the group (e.g. the other processes do not join
            before the timeout).

    Example:
        >>> from metaquant.distributed import init_from_env
        >>> init_from_env("cpu") is None  # this process was not started by torchrun
        True
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
    """Whether this process belongs to a process group of more than one process.

    Returns:
        False without ``torch.distributed``, without a process group, or in a group of one process.

    Example:
        >>> from metaquant.distributed import is_distributed
        >>> is_distributed()  # a single process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or the only process: whether this process writes files and logs.

    Returns:
        True in a single process and on rank 0 of a process group.

    Example:
        >>> from metaquant.distributed import is_main
        >>> is_main()  # a single process is its own rank 0
        True
    """
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_mean_(tensors: Iterable[Tensor | None]) -> None:
    """Average each tensor across processes, in place (one flattened all-reduce); a no-op in one process.

    MetaQuant averages the recorded ``g_Ŵ`` and the meta quantizer's gradients this way, so that every process
    computes the same ``g_W`` (see the module docstring).

    Args:
        tensors: tensors of one dtype and device (``None`` entries are skipped); each is overwritten with its
            mean over the processes.

    Example:
        >>> from metaquant.distributed import all_reduce_mean_
        >>> grads = [torch.tensor([1.0, 2.0]), None, torch.tensor([[3.0]])]
        >>> all_reduce_mean_(grads)  # one process: the mean of one value is that value
        >>> grads[0].tolist(), grads[2].tolist()
        ([1.0, 2.0], [[3.0]])
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
    """Sum a few numbers across processes (returns them unchanged in one process).

    The evaluation and the epoch's training statistics (loss sum, correct predictions, examples) are summed
    this way, so that each process sees the totals over the whole data.

    Args:
        values: the numbers of this process.

    Returns:
        The element-wise sums over all processes, as floats (``values`` itself in one process).

    Example:
        >>> from metaquant.distributed import all_reduce_sum
        >>> all_reduce_sum([12.5, 3.0, 40.0])  # loss sum, correct, seen: one process holds them all
        [12.5, 3.0, 40.0]
    """
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself in one process).

    The training loop stops on all processes together when any of them received a stop signal.

    Args:
        flag: this process's value.

    Returns:
        True if ``flag`` is true on at least one process.

    Example:
        >>> from metaquant.distributed import any_process
        >>> any_process(True), any_process(False)
        (True, False)
    """
    if not is_distributed():
        return flag
    return all_reduce_sum([float(flag)])[0] > 0


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False, find_unused: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (with ``SyncBatchNorm`` if asked).

    ``find_unused``: MetaQuant's quantized weights receive no autograd gradient after iteration 0 (their
    gradient is the meta quantizer's ``g_W``), which DDP must be told.

    Args:
        model: the model, on this process's device.
        info: this process's place, from ``init_from_env``; on CUDA the model is bound to ``info.local_rank``.
        sync_bn: convert every BatchNorm to ``SyncBatchNorm`` first.
        find_unused: tell DDP that some parameters may receive no gradient (MetaQuant runs).

    Returns:
        The ``DistributedDataParallel`` module (``unwrap`` gives the model back).

    Raises:
        ValueError: there is no process group (``init_from_env`` returned None: use the model as it is).

    Example:
        >>> from metaquant.distributed import DistInfo, init_from_env, wrap
        >>> model, info = torch.nn.Linear(4, 2), init_from_env("cpu")
        >>> (wrap(model, info, sync_bn=True) if info is not None else model) is model  # one process: no wrapper
        True
        >>> try:
        ...     wrap(model, DistInfo(rank=0, world_size=1, local_rank=0))
        ... except ValueError as err:  # DDP needs the process group that torchrun's processes form
        ...     print(err)
        Default process group has not been initialized...
    """
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP or ``torch.compile`` wrapper (or the module itself).

    Checkpoints, traces and exports use the unwrapped model, so that their keys do not depend on the number
    of processes.

    Args:
        model: a model, wrapped by ``wrap`` or not.

    Returns:
        ``model.module`` for a ``DistributedDataParallel`` wrapper, the compiled module of a ``torch.compile``
        wrapper (inside DDP or not), else ``model``.

    Example:
        >>> from metaquant.distributed import unwrap
        >>> model = torch.nn.Linear(4, 2)
        >>> unwrap(model) is model
        True
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    # torch.compile's wrapper holds the module it compiles as ``_orig_mod`` (same parameters, same names).
    return getattr(model, "_orig_mod", model)


def shutdown(clean: bool = True) -> bool:
    """Leave the process group, if this process joined one; a no-op otherwise. Call it on every exit path.

    On a clean exit every process first waits for the others (a barrier), so that none tears down its
    connections while another still uses them. Then the objects that hold the group (DDP's reducer, pending
    work) are collected while the interpreter is fully alive, and the group is destroyed: left to the
    interpreter's exit, gloo's threads can abort the process ("terminate called without an active
    exception", SIGABRT) after all the work was done. After a failure no barrier is attempted (the other
    processes may be stuck elsewhere; torchrun stops them).

    Args:
        clean: whether every process reached the same end (success, or a stop they all agreed on).

    Returns:
        Whether there was a process group to leave.

    Example:
        >>> from metaquant.distributed import is_distributed, shutdown
        >>> shutdown()  # a single process: nothing to leave
        False
        >>> is_distributed()
        False
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    return True
