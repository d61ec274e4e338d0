"""The device and the process group of a run: one process, or DistributedDataParallel under torchrun.

``init_distributed`` joins the process group that torchrun describes in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): NCCL on CUDA, gloo on CPU. Every helper here also
works without a process group (one process: rank 0 of 1), so the training code has one path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_ranks_ok",
    "all_reduce_mean",
    "broadcast_object",
    "check_same_on_all_ranks",
    "init_distributed",
    "is_distributed",
    "rank_world",
    "resolve_device",
    "synchronize",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_name: str = "auto") -> tuple[int, int, int]:
    """Join torchrun's process group if the environment describes one; returns (rank, world, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 or is_distributed():
        rank, world = rank_world()
        return rank, world, local_rank
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` means this process's GPU."""
    from .record import RunError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer reads real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_mean(total: float, count: int, device: torch.device | str) -> float:
    """Σ total / Σ count over the ranks (total / count in one process)."""
    if is_distributed():
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank says ok (a collective: every rank must call it); ok itself in one process."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank (picklable objects; obj itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_on_all_ranks(x: torch.Tensor, device: torch.device) -> None:
    """Raise unless x (the data-dependent init batch) has the same sums on every rank."""
    from .record import RunError

    if not is_distributed():
        return
    digest = torch.tensor([float(x.double().sum()), float((x.double() ** 2).sum())], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, digest) for g in gathered):
        raise RunError("the data-dependent init batch differs between ranks; check that every rank sees the same data")
