"""Recycled CPU memory for batches of per-example gradients.

A batch of per-example gradients is ``B × P`` floats (180 MB for 64 examples of the demo UNet). On Linux a fresh
buffer that size is new memory, and the kernel zeroes every page on first touch: a sizeable part of the cost of
computing into it (``bench/gradients.py``: the ``out=`` line against the plain one). The store builders, the
feature builder and the backend's rescoring ask for one batch after another and drop each before asking for the
next, so the memory of a dropped batch can serve the next one. PyTorch caches GPU memory this way; it does not cache
CPU memory.

:func:`take` hands out a flat CPU tensor whose memory comes back here once every tensor viewing it is gone (a NumPy
array owns the memory; a finaliser on the array PyTorch holds gives it back). **One** such block is kept, the last
one given back, and only up to :data:`MAX_FREE_BYTES`: a request it does not fit releases it before allocating, so
the process never holds more than it would without recycling, plus at most that one idle block between batches.
A recycled block holds the previous batch's values: callers overwrite every element (``torch.empty``'s contract).
The explorer's backend calls :func:`clear` after each request's gradients, so a serving process holds no idle block.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

__all__ = ["take", "clear", "free_bytes", "MAX_FREE_BYTES", "MIN_BYTES"]

#: the largest idle block kept for the next batch (a 64-example batch of the demo UNet is 180 MB)
MAX_FREE_BYTES = 256 << 20
#: smaller requests are left to the ordinary allocator, which keeps small freed blocks itself
MIN_BYTES = 4 << 20
#: a kept block serves a request of at least this fraction of its size (a smaller one would hold memory idle)
MIN_FILL = 0.5

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_ALIGN = 64  # bytes, as PyTorch aligns its own CPU buffers
_lock = threading.Lock()
_kept: list[np.ndarray] = []  # at most one block


def take(numel: int, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised flat tensor of ``numel`` elements, in recycled memory where the request allows."""
    device = torch.device(device)
    nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or dtype not in _DTYPES or nbytes < MIN_BYTES:
        return torch.empty(int(numel), dtype=dtype, device=device)
    with _lock:
        base = _kept.pop() if _kept else None
    if base is not None and not MIN_FILL * _usable(base) <= nbytes <= _usable(base):
        base = None  # released before the new allocation, not after
    if base is None:
        base = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    off = -base.ctypes.data % _ALIGN
    view = base[off:off + nbytes].view(_DTYPES[dtype])  # holds ``base``; the tensor holds ``view``
    weakref.finalize(view, _give_back, base)
    return torch.from_numpy(view)


def _usable(base: np.ndarray) -> int:
    return base.nbytes - (-base.ctypes.data % _ALIGN)


def _give_back(base: np.ndarray) -> None:
    if base.nbytes > MAX_FREE_BYTES + _ALIGN:
        return
    with _lock:
        _kept[:] = [base]  # the last block given back replaces an older one


def free_bytes() -> int:
    """Bytes kept idle for the next batch."""
    with _lock:
        return sum(b.nbytes for b in _kept)


def clear() -> None:
    """Release the kept block to the system."""
    with _lock:
        _kept.clear()
