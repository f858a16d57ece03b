"""Image <-> tensor conversion: resizing, PNG thumbnails, image folders and torch datasets."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .dataset import ImageDataset

__all__ = ["IMAGE_SUFFIXES", "resize", "to_uint8", "to_png", "from_image_folder", "from_torch_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F", "P;L"}


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size × size`` (antialiased when shrinking).

    Non-square images are centre-cropped to a square first, so nothing is stretched.
    """
    h, w = images.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top:top + s, left:left + s]
    if images.shape[-1] == size:
        return images
    shrink = images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _check_size(size: int | None) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer (pixels per side) or None, got {size!r}")
    return int(size)


def _check_channels(channels: int | None) -> int | None:
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (decide from the images), got {channels!r}")
    return channels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> uint8 ``0..255`` (same layout; values outside the range are clipped)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("to_uint8 expects a float tensor in [-1, 1]")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_png(image: torch.Tensor | np.ndarray, scale: int = 1, *, size: int | None = None) -> bytes:
    """PNG bytes of one image ``[C, H, W]`` (or ``[H, W]``) in ``[-1, 1]`` (a tensor or a NumPy array).

    ``scale`` > 1 enlarges each pixel to a ``scale × scale`` block (nearest neighbour), which keeps tiny
    thumbnails crisp in a browser. ``size`` instead picks the largest whole scale that keeps the longer edge within
    ``size`` pixels (at least 1; the thumbnails of the explorer).
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"to_png expects a torch.Tensor or numpy array [C, H, W] in [-1, 1], got {type(image).__name__}")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"to_png expects one image [C, H, W] with C = 1 or 3, got shape {tuple(image.shape)}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if size:
        scale = max(1, int(size) // max(image.shape[-2:]))
    u8 = to_uint8(image)
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = u8.permute(1, 2, 0).numpy()
    pil = Image.fromarray(np.ascontiguousarray(arr[..., 0]) if arr.shape[2] == 1 else np.ascontiguousarray(arr))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------- decoding
def _pil_to_tensor(img, mode: str) -> torch.Tensor:
    """PIL image -> float ``[C, H, W]`` in ``[0, 1]``."""
    arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _stack(images: list[torch.Tensor], size: int | None, sources: list[str]) -> torch.Tensor:
    """Resize (or insist on equal sizes) and stack ``[C, H, W]`` tensors."""
    if size is not None:
        return torch.cat([resize(im[None], size) for im in images])
    shapes = {tuple(im.shape[-2:]) for im in images}
    if len(shapes) > 1:
        first = tuple(images[0].shape[-2:])
        k = next(i for i, im in enumerate(images) if tuple(im.shape[-2:]) != first)
        raise ValueError(f"images have different sizes ({sources[0]} is {first[0]}×{first[1]}, {sources[k]} is "
                         f"{images[k].shape[-2]}×{images[k].shape[-1]}); pass size=... to resize them all")
    return torch.stack(images)


def from_image_folder(path: str | Path, size: int | None = None, channels: int | None = None,
                      name: str | None = None) -> ImageDataset:
    """Read every png/jpg/jpeg/bmp/webp file under ``path`` (recursively).

    Files are sorted by their relative path, and an image's id is its index in that order (stable as long as
    the folder does not change). ``names`` holds the relative paths. When every file sits in a sub-folder, the
    top-level sub-folder is the class: ``labels`` index ``meta["classes"]`` (sorted folder names).

    ``channels``: 1 (grey), 3 (RGB) or ``None`` (grey if every file is grey, else RGB).
    ``size``: resize to ``size × size`` (centre-crop non-square images); without it all files must share a size.
    """
    size, channels = _check_size(size), _check_channels(channels)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(path)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a folder")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"image folder {str(path)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    rel = [p.relative_to(root).as_posix() for p in files]
    pils = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                pils.append(im.copy())
        except Exception as e:  # a corrupt file: name it
            raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
    if channels is None:
        channels = 1 if all(im.mode in _GREY_MODES for im in pils) else 3
    mode = "L" if channels == 1 else "RGB"
    images = _stack([_pil_to_tensor(im, mode) for im in pils], size, rel)
    labels, meta = None, {"root": str(root.resolve())}
    if all("/" in r for r in rel):
        top = [r.split("/", 1)[0] for r in rel]
        classes = sorted(set(top))
        labels = torch.tensor([classes.index(c) for c in top], dtype=torch.long)
        meta["classes"] = classes
    return ImageDataset(images=(images * 2 - 1).clamp(-1, 1), ids=torch.arange(len(files)), labels=labels,
                        name=name or root.name, names=rel, meta=meta)


def _item_to_tensor(img: Any, channels: int | None, where: str) -> torch.Tensor:
    """One dataset item's image -> float ``[C, H, W]`` (not yet rescaled)."""
    try:
        if isinstance(img, Image.Image):
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if img.mode in _GREY_MODES else "RGB")
            return _pil_to_tensor(img, mode) * 255.0  # back to 0..255 so that it is treated like uint8
    except ImportError:  # pragma: no cover
        pass
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, array or PIL image, got {type(img).__name__}")
    if img.dim() == 2:
        img = img[None]
    elif img.dim() == 3 and img.shape[0] not in (1, 3, 4) and img.shape[-1] in (1, 3, 4):
        img = img.permute(2, 0, 1)  # HWC (numpy / PIL layout) -> CHW
    if img.dim() != 3 or img.shape[0] not in (1, 3, 4):
        raise ValueError(f"{where}: expected an image [C, H, W] (or [H, W], [H, W, C]) with 1 or 3 channels, "
                         f"got shape {tuple(img.shape)}")
    if img.shape[0] == 4:
        img = img[:3]  # drop alpha
    if img.dtype == torch.uint8:
        return img.float()
    if not img.is_floating_point():
        raise TypeError(f"{where}: images must be uint8 (0..255) or float, got dtype {img.dtype}")
    return img.float()


def from_torch_dataset(ds: Any, size: int | None = None, limit: int | None = None, *,
                       channels: int | None = None, name: str | None = None) -> ImageDataset:
    """Copy a (map-style) torch ``Dataset`` into an :class:`ImageDataset`; ids are the dataset indices.

    Items may be an image or an ``(image, label, ...)`` tuple; images may be PIL images, uint8 tensors/arrays
    (0..255), or float tensors in ``[0, 1]`` (as from ``ToTensor()``; rescaled to ``[-1, 1]``) or already in
    ``[-1, 1]`` (recognised by negative values anywhere in the dataset).
    """
    size, channels = _check_size(size), _check_channels(channels)
    n = len(ds)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        n = min(n, int(limit))
    if n == 0:
        raise ValueError("the dataset is empty")
    imgs, labels, uint8_like = [], [], []
    for i in range(n):
        item = ds[i]
        label = None
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"item {i} is an empty tuple")
            img = item[0]
            if len(item) > 1:
                lab = item[1]
                if isinstance(lab, torch.Tensor) and lab.numel() == 1:
                    lab = lab.item()
                if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
                    label = int(lab)
        elif isinstance(item, dict):
            key = next((k for k in ("image", "img", "pixel_values") if k in item), None)
            if key is None:
                raise ValueError(f"item {i} is a dict without an 'image' key (keys: {sorted(item)})")
            img, label = item[key], item.get("label")
            label = int(label) if isinstance(label, (int, np.integer)) else None
        else:
            img = item
        is_u8 = not (isinstance(img, torch.Tensor) and img.is_floating_point()) and not (
            isinstance(img, np.ndarray) and np.issubdtype(img.dtype, np.floating))
        t = _item_to_tensor(img, channels, f"item {i}")
        if channels is not None and t.shape[0] != channels:
            t = t.mean(0, keepdim=True) if channels == 1 else t.expand(3, -1, -1)
        imgs.append(t)
        labels.append(label)
        uint8_like.append(is_u8)
    if channels is None and len({t.shape[0] for t in imgs}) > 1:
        imgs = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in imgs]
    # rescale each item to [0, 1] before resizing so that interpolation sees one consistent range
    floats = [t for t, u in zip(imgs, uint8_like) if not u]
    signed = bool(floats) and min(float(t.min()) for t in floats) < 0
    if floats:
        lo = min(float(t.min()) for t in floats)
        hi = max(float(t.max()) for t in floats)
        if hi > 1 + 1e-3 or lo < -1 - 1e-3:
            raise ValueError(f"float images must be in [0, 1] or [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    unit = [t / 255.0 if u else ((t + 1) / 2 if signed else t) for t, u in zip(imgs, uint8_like)]
    x = _stack(unit, size, [f"item {i}" for i in range(n)])
    lab = torch.tensor(labels, dtype=torch.long) if all(l is not None for l in labels) else None
    return ImageDataset(images=(x * 2 - 1).clamp(-1, 1), ids=torch.arange(n), labels=lab,
                        name=name or type(ds).__name__)
