"""Process-group setup and the few collectives the engine needs.

Works the same under ``python run.py`` (one process, no process group) and ``torchrun`` (gloo on
CPU, NCCL on GPU). Rank 0 decides anything that must be shared (the run folder), then broadcasts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, which alone writes logs, checkpoints and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this rank's GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or auto")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device={device!r} is not one of auto, cpu, cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    """Tear the process group down (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def distribute(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` as it is stepped: DDP-wrapped under torchrun (BatchNorm made SyncBatchNorm in
    place, on multi-GPU only), itself in one process."""
    if not info.distributed:
        return model
    if info.device.type == "cuda":  # SyncBatchNorm only where it can run: multi-GPU DDP
        # Replaces the BatchNorm children in place (the parameters are kept, so an optimiser
        # built on them stays valid); the root is not a BatchNorm, so `model` itself is kept.
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None
    )


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``value`` over ranks."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_reduce_max(value: float, info: DistInfo) -> float:
    """Largest ``value`` over ranks."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once across ranks.

    Unlike ``DistributedSampler`` it never pads with repeated samples, so an all-reduced
    confusion matrix counts each pixel once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
