"""torch.distributed helpers: shard a dataset across ranks and all-reduce sums (gloo on CPU, NCCL on GPU).

Everything works unchanged without an initialised process group (one process = one shard).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "shard_slice", "all_reduce_sum_", "init_from_env",
           "env_rank", "rank0_first", "barrier"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shard_slice(n: int, rank: int | None = None, world: int | None = None) -> slice:
    """Contiguous block of ``range(n)`` owned by ``rank`` (sizes differ by at most one)."""
    r, w = rank_and_world()
    r = r if rank is None else rank
    w = w if world is None else world
    if not (0 <= r < w):
        raise ValueError(f"rank {r} is outside 0..{w - 1}")
    lo = (n * r) // w
    hi = (n * (r + 1)) // w
    return slice(lo, hi)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process). NCCL needs CUDA tensors; gloo takes CPU tensors."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def init_from_env(device: str | torch.device | None = None, *, timeout_s: float = 6 * 3600) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); no-op otherwise.

    NCCL when the work runs on CUDA (``device`` CUDA, or ``None`` with CUDA available), gloo otherwise. Each rank
    on CUDA uses GPU ``LOCAL_RANK``. ``timeout_s`` bounds how long collectives wait (retraining jobs are long).
    Returns whether a process group is initialised afterwards.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def env_rank() -> int:
    """This process's rank as ``torchrun`` sets it (``RANK``; 0 outside torchrun)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def rank0_first(fn, device: str | torch.device | None = None):
    """``fn()`` on rank 0 *before* the process group exists, then :func:`init_from_env` on every rank, then
    ``fn()`` on the other ranks (which find what rank 0 cached on the shared filesystem and reuse it).

    For single-process steps (training the base model, building the index) that must not run on every rank at
    once; the other ranks wait in the rendezvous meanwhile. Returns ``fn()``'s result on every rank.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return fn()
    first = env_rank() == 0
    out = fn() if first else None
    init_from_env(device)
    return out if first else fn()
