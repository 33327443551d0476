"""Process-group setup and the few collectives the engine needs.

Works the same under ``python run.py`` (one process, no process group) and ``torchrun`` (gloo on
CPU, NCCL on GPU). Rank 0 decides anything that must be shared (the run folder), then broadcasts.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
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
        if local_rank >= torch.cuda.device_count() == 1:
            local_rank = 0  # SLURM's --gpus-per-task shows each rank its own GPU only
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device={device!r} is not one of auto, cpu, cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Start the process group when launched by torchrun; a no-op for a single process.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        timeout_s: how long a collective waits for every rank before failing (the run's
            ``dist_timeout``); None keeps PyTorch's default (30 min for gloo, 10 for NCCL).
    """
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
            timeout=None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s)),
        )
    info = DistInfo(rank, world_size, local_rank, dev)
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    heartbeat("started", info, force=True)
    return info


# ---- naming a stalled rank ------------------------------------------------------------------
# Every rank leaves its last sign of life (time, what it was doing) in the process group's key-
# value store, at most every HEARTBEAT_INTERVAL seconds. When a collective times out, the store
# (hosted by torchrun's agent, still alive) tells which rank stopped answering, and since when.
HEARTBEAT_INTERVAL = 2.0
_HEARTBEAT_KEY = "deflect/heartbeat/{}"
_last_beat = 0.0
_TIMEOUT_S: float | None = None


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def heartbeat(where: str, info: DistInfo, force: bool = False) -> None:
    """Record that this rank is alive and doing ``where`` (rate-limited; no-op in one process)."""
    global _last_beat
    if not info.distributed:
        return
    now = time.time()
    if not force and now - _last_beat < HEARTBEAT_INTERVAL:
        return
    store = _store()
    if store is None:
        return
    record = {"time": now, "where": where, "pid": os.getpid(), "host": socket.gethostname()}
    try:
        store.set(_HEARTBEAT_KEY.format(info.rank), json.dumps(record))
        _last_beat = now
    except RuntimeError:  # the store is gone: the job is ending anyway
        pass


def _looks_like_timeout(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 5:
        text = f"{type(error).__name__} {error}".lower()
        if "timed out" in text or "timeout" in text or "deadline" in text:
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


#: Seconds a rank that timed out waits for the other live ranks to time out too.
STALL_GRACE = 5.0
_TIMED_OUT_KEY = "deflect/timed_out/{}"


def explain_stall(error: BaseException | None, info: DistInfo) -> str | None:
    """When ``error`` is a collective's timeout, say which rank stopped answering.

    Every live rank blocked in the same collective times out at about the same moment; each
    marks it in the store and waits :data:`STALL_GRACE` seconds for the others. The ranks that
    never mark it are the stalled ones; their last heartbeat says what they were doing and how
    long ago. None for other errors, in one process, or when the store cannot tell.
    """
    if not info.distributed or not _looks_like_timeout(error):
        return None
    store = _store()
    if store is None:
        return None
    keys = [_TIMED_OUT_KEY.format(r) for r in range(info.world_size)]
    try:
        store.set(keys[info.rank], "1")
        deadline = time.time() + STALL_GRACE
        while time.time() < deadline and not store.check(keys):
            time.sleep(0.2)
        stalled = [r for r, key in enumerate(keys) if not store.check([key])]
    except RuntimeError:
        return None
    if not stalled:
        return None
    now = time.time()
    parts = []
    for rank in stalled:
        key = _HEARTBEAT_KEY.format(rank)
        try:
            rec = json.loads(store.get(key)) if store.check([key]) else None
        except (RuntimeError, ValueError):
            rec = None
        if rec is None:
            parts.append(f"rank {rank} (never reported)")
        else:
            parts.append(
                f"rank {rank} (pid {rec['pid']} on {rec['host']}), last seen "
                f"{now - rec['time']:.0f} s ago at: {rec['where']}"
            )
    limit = f"dist_timeout={_TIMEOUT_S:g} s" if _TIMEOUT_S is not None else "the timeout"
    return (
        f"stalled rank: {'; '.join(parts)}. Rank {info.rank} waited {limit} for it in a "
        "collective and gave up. A stopped (SIGSTOP), hung (file system, debugger) or "
        "overloaded process; raise dist_timeout if it is only slow"
    )


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
