"""PNG bytes of one image in ``[-1, 1]`` with NumPy and Pillow only (no torch).

:func:`diffinfluence_widgets.data.to_png` (tensors or arrays) is this function; the session's thumbnails use it
directly, so a thin explorer kernel (:mod:`diffinfluence_widgets.remote`) never imports torch.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_bytes", "uint8_image"]


def uint8_image(image: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` floats -> uint8 ``0..255`` (float32 arithmetic, rounded half to even, clipped)."""
    x = np.clip(np.asarray(image, dtype=np.float32), np.float32(-1), np.float32(1))
    return np.rint((x + np.float32(1)) * np.float32(127.5)).astype(np.uint8)


def png_bytes(image: np.ndarray, scale: int = 1, *, size: int | None = None) -> bytes:
    """PNG bytes of one image ``[C, H, W]`` (or ``[H, W]``) in ``[-1, 1]``.

    ``scale`` > 1 enlarges each pixel to a ``scale × scale`` block (nearest neighbour), which keeps tiny
    thumbnails crisp in a browser. ``size`` instead picks the largest whole scale that keeps the longer edge within
    ``size`` pixels (at least 1; the thumbnails of the explorer).
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"png_bytes expects a numpy array [C, H, W] in [-1, 1], got {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"to_png expects one image [C, H, W] with C = 1 or 3, got shape {tuple(image.shape)}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if size:
        scale = max(1, int(size) // max(image.shape[-2:]))
    u8 = uint8_image(image)
    if scale > 1:
        u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    arr = u8.transpose(1, 2, 0)
    pil = Image.fromarray(np.ascontiguousarray(arr[..., 0]) if arr.shape[2] == 1 else np.ascontiguousarray(arr))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
