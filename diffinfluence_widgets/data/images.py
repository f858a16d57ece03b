"""Image <-> tensor conversion: resizing, PNG thumbnails, image folders and torch datasets."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._png import png_bytes
from .dataset import ImageDataset, as_id_tensor

__all__ = ["IMAGE_SUFFIXES", "MAX_DECODED_PIXELS", "resize", "to_uint8", "to_png", "from_image_folder",
           "from_torch_dataset", "from_arrays"]

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
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"to_png expects a torch.Tensor or numpy array [C, H, W] in [-1, 1], got {type(image).__name__}")
    return png_bytes(image, scale, size=size)


# ---------------------------------------------------------------------- decoding
#: images with more pixels than this (after a JPEG's draft reduction) are refused instead of decoded:
#: one decoded image of this many RGB pixels is ~200 MB, the most one file may cost while streaming
MAX_DECODED_PIXELS = 64_000_000


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


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """``(mode, (width, height))`` from the file header only (no pixels decoded); names the file on failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is our limit
            with Image.open(path) as im:
                return im.mode, im.size
    except Exception as e:  # not an image, or a corrupt header
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def _decode(path: Path, mode: str, size: int | None, max_pixels: int) -> torch.Tensor:
    """One file -> float ``[C, h, w]`` in ``[0, 1]``, decoded at reduced resolution when ``size`` allows.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale by the codec (``draft``) when that still leaves ≥ 2 × ``size`` pixels
    per side; other formats are box-reduced by an integer factor to ≥ 2 × ``size`` right after decoding. The
    antialiased resize to ``size`` then happens on the small image, so memory per file stays bounded and only one
    full-size image is ever held. Without ``size`` the image is kept at full resolution.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is our limit
            im = Image.open(path)
        with im:
            if size is not None and im.format == "JPEG":
                im.draft(mode, (2 * size, 2 * size))  # the codec decodes at the smallest scale still this large
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image {str(path)!r} is {w}×{h} = {w * h} pixels, over max_pixels={max_pixels} "
                                 f"(decoding it would need ~{w * h * 3 // 2 ** 20} MiB); shrink it or raise "
                                 "max_pixels")
            im.load()
            if size is not None:
                factor = min(im.size) // (2 * size)
                if factor >= 2:
                    im = im.reduce(factor)
            return _pil_to_tensor(im, mode)
    except ValueError:
        raise
    except Exception as e:  # a corrupt file: name it
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def from_image_folder(path: str | Path, size: int | None = None, channels: int | None = None,
                      name: str | None = None, *, ids: Sequence[int] | None = None,
                      labels: Sequence[int] | None = None, max_pixels: int = MAX_DECODED_PIXELS) -> ImageDataset:
    """Read every png/jpg/jpeg/bmp/webp file under ``path`` (recursively).

    Files are sorted by their relative path; an image's id is its index in that order (stable as long as the folder
    does not change) unless ``ids`` gives one id per file in that order. ``names`` holds the relative paths. When
    every file sits in a sub-folder, the top-level sub-folder is the class: ``labels`` index ``meta["classes"]``
    (sorted folder names); ``labels=`` overrides them (one per file, in the same order).

    ``channels``: 1 (grey), 3 (RGB) or ``None`` (grey if every file is grey, else RGB).
    ``size``: resize to ``size × size`` (centre-crop non-square images); without it all files must share a size.

    Files are decoded one at a time and shrunk right away (JPEGs by the codec itself), so memory stays near the
    size of the result plus one image. A file with an image suffix that is not a readable image raises
    ``ValueError`` naming it; an image over ``max_pixels`` (after a JPEG's draft reduction) is refused the same way
    before its pixels are decoded. Files without an image suffix are skipped.
    """
    size, channels = _check_size(size), _check_channels(channels)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
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
    ids_t = _given(ids, len(files), "ids", f"image files under {str(path)!r}")
    labels_t = _given(labels, len(files), "labels", f"image files under {str(path)!r}")
    headers = [_header(p) for p in files]  # pass 1: headers only, to pick the colour mode and refuse early
    if channels is None:
        channels = 1 if all(m in _GREY_MODES for m, _ in headers) else 3
    mode = "L" if channels == 1 else "RGB"
    if size is None:
        first = headers[0][1]
        for r, (_, wh) in zip(rel, headers):
            if wh != first:
                raise ValueError(f"images have different sizes ({rel[0]} is {first[1]}×{first[0]}, {r} is "
                                 f"{wh[1]}×{wh[0]}); pass size=... to resize them all")
    out = None
    for i, p in enumerate(files):  # pass 2: decode one, shrink it, keep only the result
        x = _decode(p, mode, size, int(max_pixels))
        x = resize(x[None], size)[0] if size is not None else x
        if out is None:
            out = torch.empty((len(files), *x.shape), dtype=torch.float32)
        out[i] = x * 2 - 1
    meta: dict[str, Any] = {"root": str(root.resolve())}
    if labels_t is None and all("/" in r for r in rel):
        top = [r.split("/", 1)[0] for r in rel]
        classes = sorted(set(top))
        labels_t = torch.tensor([classes.index(c) for c in top], dtype=torch.long)
        meta["classes"] = classes
    return ImageDataset(images=out.clamp_(-1, 1), ids=torch.arange(len(files)) if ids_t is None else ids_t,
                        labels=labels_t, name=name or root.name, names=rel, meta=meta)


def _given(values: Sequence[int] | None, n: int, what: str, of: str) -> torch.Tensor | None:
    """Caller-given ids / labels: one integer per item (clear error naming the counts otherwise)."""
    if values is None:
        return None
    t = as_id_tensor(values, what)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} {what} for {n} {of}; expected one per item, in order")
    return t


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
                       channels: int | None = None, name: str | None = None,
                       indices: Sequence[int] | None = None, ids: Sequence[int] | None = None,
                       labels: Sequence[int] | None = None) -> ImageDataset:
    """Copy a (map-style) torch ``Dataset`` into an :class:`ImageDataset`.

    ``indices`` picks the items to read (default: ``0 .. len(ds) − 1``, or the first ``limit``); each example's id
    is its index in ``ds`` — so a subsample of a larger collection keeps its source ids — unless ``ids`` gives one
    id per item read. Labels come from the items (``(image, label, ...)`` tuples or ``{"image", "label"}`` dicts)
    unless ``labels`` gives one per item read.

    Items may be an image or an ``(image, label, ...)`` tuple; images may be PIL images, uint8 tensors/arrays
    (0..255), or float tensors in ``[0, 1]`` (as from ``ToTensor()``; rescaled to ``[-1, 1]``) or already in
    ``[-1, 1]`` (recognised by negative values anywhere in the dataset).
    """
    size, channels = _check_size(size), _check_channels(channels)
    if indices is not None:
        index = as_id_tensor(indices, "indices").tolist()
        bad = [i for i in index if not 0 <= i < len(ds)]
        if bad:
            raise IndexError(f"indices {bad[:5]} are outside the dataset (len {len(ds)})")
    else:
        index = list(range(len(ds)))
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        index = index[: int(limit)]
    n = len(index)
    if n == 0:
        raise ValueError("the dataset is empty")
    ids_t = _given(ids, n, "ids", "items read from the dataset")
    labels_t = _given(labels, n, "labels", "items read from the dataset")
    imgs, labels, uint8_like = [], [], []
    for i in index:
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
    x = _stack(unit, size, [f"item {i}" for i in index])
    lab = torch.tensor(labels, dtype=torch.long) if all(l is not None for l in labels) else None
    return ImageDataset(images=(x * 2 - 1).clamp(-1, 1), ids=torch.tensor(index) if ids_t is None else ids_t,
                        labels=lab if labels_t is None else labels_t, name=name or type(ds).__name__)


def from_arrays(images: Any, ids: Sequence[int] | None = None, labels: Sequence[int] | None = None, *,
                size: int | None = None, channels: int | None = None, name: str = "arrays",
                names: Sequence[str] | None = None) -> ImageDataset:
    """An :class:`ImageDataset` from an array / tensor of images or a list of images, keeping ``ids`` and ``labels``.

    ``images``: ``[N, C, H, W]`` or ``[N, H, W, C]`` or ``[N, H, W]`` (numpy or torch), or a list of PIL images /
    arrays; uint8 is 0..255, floats are ``[0, 1]`` or ``[-1, 1]`` (as :func:`from_torch_dataset`). ``ids`` default
    to ``0 .. N − 1``; ``names`` are optional per-image names. ``size`` / ``channels`` as for image folders.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be [N, C, H, W], [N, H, W, C] or [N, H, W], got shape "
                             f"{tuple(images.shape)}")
        items = [images[i] for i in range(images.shape[0])]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError(f"images must be a numpy array, a torch tensor or a list of images, got "
                        f"{type(images).__name__}")
    if not items:
        raise ValueError("images is empty")
    ids_t = _given(ids, len(items), "ids", "images")
    d = from_torch_dataset(items, size=size, channels=channels, name=name, ids=ids_t, labels=labels)
    if names is not None:
        d = ImageDataset(d.images, d.ids, d.labels, name=name, names=list(names), meta=d.meta)
    return d
