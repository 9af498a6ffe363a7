"""Process group setup for `python train.py` (one process) and `torchrun` (DDP: nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_from_env() -> Dist:
    """Rank, world size and device as torchrun sets them (one CPU or GPU process without torchrun).

    Reading the environment does no communication, so every rank can check its inputs first and fail
    alone with one line instead of leaving the others waiting in a collective.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Dist(rank, world_size, local_rank, device)


def init(d: Dist, cpu_threads: int | None = None) -> None:
    """Join the process group (when there is more than one rank), pin this rank's GPU or set its CPU threads.

    On a busy CPU, OpenMP threads that wait for each other spin; one thread per process can then be
    several times faster (the CPU demo measured ~10x on 2 shared cores).
    """
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    elif cpu_threads:
        torch.set_num_threads(cpu_threads)
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=d.device if d.device.type == "cuda" else None)


T = TypeVar("T")


def local_rank_zero_first(d: Dist, fn: Callable[[], T], then: Callable[[], AbstractContextManager[Any]]) -> T:
    """fn() on each node's local rank 0 first, then on the node's other ranks inside `then()` (e.g. reading
    what the first one cached). When a local rank 0 fails, the others run fn() plainly and report for
    themselves, so no rank waits for a peer that has exited."""
    if not d.enabled:
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if d.local_rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised once every rank knows, below
            error = e
    failed = any_rank(error is not None, d.device)  # the other ranks wait here
    if error is not None:
        raise error
    if d.local_rank == 0:
        return result  # type: ignore[return-value]
    if failed:
        return fn()
    with then():
        return fn()


MIN_GPU_BATCH = 32


def small_batch_warning(d: Dist, batch_per_rank: int) -> str | None:
    """A warning when each GPU sees fewer than 32 images per step: BatchNorm's statistics, computed per GPU,
    then get noisy and accuracy drops."""
    if d.device.type != "cuda" or batch_per_rank >= MIN_GPU_BATCH:
        return None
    return (f"warning: {batch_per_rank} images per GPU; BatchNorm statistics get noisy below {MIN_GPU_BATCH}: "
            f"raise train.batch_size with the number of GPUs ({MIN_GPU_BATCH * d.world_size} or more for "
            f"{d.world_size}; the lr scales with it)")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    if not d.enabled:
        return model
    # Gradients live in DDP's communication buckets: no copy in or out of them, and less memory.
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), the ones a checkpoint saves.

    During training each rank updates its buffers from its own batches (DDP copies rank 0's only at the
    start of a training forward), and an EMA copy averages each rank's own; evaluating without this would
    score each validation shard with different statistics than the weights that get written.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def all_reduce_sum(t: torch.Tensor, async_op: bool = False) -> Any:
    """Sum `t` over the ranks in place; returns the work handle when `async_op` (None without a group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=async_op)
    return None


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one."""
    t = torch.tensor([float(flag)], device=device)
    all_reduce_sum(t)
    return t.item() > 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
