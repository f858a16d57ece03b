"""``ImageDataset``: images in [-1, 1] with stable integer ids.

Every layer downstream addresses examples by id, never by position (``architecture.md``): score matrices,
caches and widgets store ids, and :meth:`ImageDataset.by_ids` turns them back into pixels. The fingerprint covers
exactly what the influence computations depend on (ids and pixels), so renaming a dataset does not invalidate a
cache while changing one pixel does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["ImageDataset", "as_id_tensor"]

#: pixels may overshoot [-1, 1] by this much (float rounding of resized / generated images)
RANGE_TOLERANCE = 1e-3


def as_id_tensor(ids: Sequence[int] | torch.Tensor | np.ndarray, what: str = "ids") -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list / array / tensor of integer ids (clear error otherwise)."""
    if isinstance(ids, (int, np.integer)):
        ids = [int(ids)]
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.dtype == torch.bool:
            raise TypeError(f"{what} must be integer ids, got a boolean tensor (use ids[mask] to select)")
        if not torch.equal(t, t.round()):
            raise TypeError(f"{what} must be integers, got dtype {t.dtype} with non-integer values")
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.long)


@dataclass(eq=False)
class ImageDataset:
    """A set of images with stable ids.

    Parameters
    ----------
    images:
        Float tensor ``[N, C, H, W]`` with values in ``[-1, 1]``.
    ids:
        ``[N]`` unique integer ids (int64), stable across runs: the i-th image is example ``ids[i]``.
    labels:
        Optional ``[N]`` integer class labels.
    name:
        A human-readable name (not part of the fingerprint).
    names:
        Optional per-image names (e.g. file paths relative to an image folder), aligned with ``ids``.
    meta:
        Free-form extra information (e.g. ``{"classes": [...]}`` for an image folder).
    """

    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor | None = None
    name: str = "dataset"
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _pos: dict[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [N, C, H, W] in [-1, 1], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"images must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got dtype {x.dtype} "
                            "(convert uint8 images with x.float() / 127.5 - 1)")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)}; expected [N, C, H, W])")
        self.images = x = x.detach().to("cpu", torch.float32).contiguous()
        if x.numel() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
            raise ValueError(f"images contain NaN or infinite values ({bad.numel()} of {x.shape[0]} images, "
                             f"first at position {int(bad[0])})")
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                                 "(uint8 images: x / 127.5 - 1; [0, 1] images: 2 x - 1)")
        self.ids = as_id_tensor(self.ids, "ids")
        if self.ids.numel() != x.shape[0]:
            raise ValueError(f"got {self.ids.numel()} ids for {x.shape[0]} images; expected one id per image")
        uniq, counts = torch.unique(self.ids, return_counts=True)
        if uniq.numel() != self.ids.numel():
            dup = uniq[counts > 1][:5].tolist()
            raise ValueError(f"ids must be unique; duplicated: {dup}")
        if self.labels is not None:
            self.labels = as_id_tensor(self.labels, "labels")
            if self.labels.numel() != x.shape[0]:
                raise ValueError(f"got {self.labels.numel()} labels for {x.shape[0]} images")
        if self.names is not None:
            self.names = [str(n) for n in self.names]
            if len(self.names) != x.shape[0]:
                raise ValueError(f"got {len(self.names)} names for {x.shape[0]} images")
        self._pos = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"labels={'yes' if self.labels is not None else 'no'})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def _positions(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        if self._pos is None:
            self._pos = {int(i): p for p, i in enumerate(self.ids.tolist())}
        want = as_id_tensor(ids).tolist()
        missing = [i for i in want if i not in self._pos]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise KeyError(f"{len(missing)} id(s) not in dataset {self.name!r}: {shown} "
                           f"(ids range over {int(self.ids.min()) if len(self) else '-'}"
                           f"..{int(self.ids.max()) if len(self) else '-'}, n={len(self)})")
        return torch.tensor([self._pos[i] for i in want], dtype=torch.long)

    def positions(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Row positions of ``ids`` in this dataset (KeyError naming any missing id)."""
        return self._positions(ids)

    def by_ids(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images ``[len(ids), C, H, W]`` in the order of ``ids``."""
        return self.images[self._positions(ids)]

    def subset(self, ids: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None) -> "ImageDataset":
        """A new dataset with the examples ``ids`` (in that order), ids and labels kept."""
        pos = self._positions(ids)
        return ImageDataset(
            images=self.images[pos], ids=self.ids[pos],
            labels=None if self.labels is None else self.labels[pos],
            name=name if name is not None else f"{self.name}[{len(pos)}]",
            names=None if self.names is None else [self.names[p] for p in pos.tolist()],
            meta=dict(self.meta),
        )

    def fingerprint(self) -> str:
        """Short SHA-256 over ids, image shape and pixels (float32): independent of name and labels."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.ids.numpy().astype("<i8").tobytes())
        h.update(self.images.numpy().astype("<f4").tobytes())
        return h.hexdigest()[:16]
