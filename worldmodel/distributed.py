"""Process-group setup for single-process and ``torchrun`` training (DistributedDataParallel).

The same script runs both ways: launched with ``torchrun --nproc-per-node N`` the environment holds
RANK / WORLD_SIZE / LOCAL_RANK and we join a process group (gloo on CPU, nccl on CUDA); launched with
plain ``python`` we are rank 0 of 1 and nothing distributed is touched. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from worldmodel.devices import resolve_device
from worldmodel.machine import available_cores

# resolve_device lives in worldmodel.devices; re-exported for callers that import it from here.
__all__ = ["DistInfo", "barrier", "cleanup", "gather_to_main", "mean_over_ranks", "resolve_device", "setup"]


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and pictures."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> DistInfo:
    """Join the process group if launched by torchrun; pick the device; split CPU threads fairly."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = resolve_device(device_name, local_rank)
    if device.type == "cpu" and local_world_size > 1:
        # N processes on one machine must share its cores instead of each spawning cores threads.
        torch.set_num_threads(max(1, available_cores() // local_world_size))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, local_world_size, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: Tensor) -> Tensor:
    """Average a tensor of scalars over all ranks (for logging: every rank sees the same numbers)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the other ranks. A single process
    gets ``[value]``. A collective: every rank must call it at the same point."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
    return [value]
