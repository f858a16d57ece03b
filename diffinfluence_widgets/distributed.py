"""torch.distributed helpers: shard a dataset across ranks and all-reduce sums (gloo on CPU, NCCL on GPU).

Everything works unchanged without an initialised process group (one process = one shard).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "shard_slice", "all_reduce_sum_"]


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
