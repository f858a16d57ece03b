"""Similarity baselines (``method.md`` §5, last row): no curvature, no gradients — how alike two images look.

Both return a :class:`SimilarityScores` in the score-matrix layout of the influence scores (``[Q, N]``, rows =
queries, columns = training ids), with the same sign convention: a **higher** similarity is read as a stronger
**proponent** (removing a look-alike is predicted to increase the query's loss). LDS then uses the sum of the
similarities over the removed examples as the prediction.

* :func:`pixel_similarity` — cosine similarity of the flattened pixels (in [-1, 1]; ``center=True`` first
  subtracts each image's mean, which keeps a uniform background from dominating).
* :func:`feature_similarity` — cosine similarity of features from **any** encoder the user supplies: a callable
  or ``nn.Module`` mapping an image batch ``[B, C, H, W]`` in [-1, 1] to ``[B, ...]`` features. The paper used
  CLIP; :func:`clip_image_encoder` wraps a locally stored CLIP vision model (needs ``transformers``; no download).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SimilarityScores", "pixel_similarity", "feature_similarity", "encode_images", "clip_image_encoder"]


@dataclass
class SimilarityScores:
    """``matrix [Q, N]`` (float64) with ``query_ids`` and ``train_ids``; positive = look-alike = proponent."""

    matrix: np.ndarray
    query_ids: np.ndarray
    train_ids: np.ndarray
    method: str = "pixel"
    meta: dict[str, Any] = field(default_factory=dict)


def _images_and_ids(images: Any, ids: Any, what: str) -> tuple[torch.Tensor, np.ndarray]:
    if hasattr(images, "images") and hasattr(images, "ids"):  # an ImageDataset
        x, i = images.images, images.ids
    else:
        x, i = images, ids
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 4:
        raise ValueError(f"{what} images must be [B, C, H, W], got shape {tuple(x.shape)}")
    if i is None:
        i = np.arange(x.shape[0])
    i = np.asarray(i.detach().cpu() if hasattr(i, "detach") else i, dtype=np.int64)
    if i.shape != (x.shape[0],):
        raise ValueError(f"got {i.shape} {what} ids for {x.shape[0]} {what} images")
    return x.float(), i


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = F.normalize(a.flatten(1).double(), dim=1)
    b = F.normalize(b.flatten(1).double(), dim=1)
    return (a @ b.T).numpy()


def pixel_similarity(query_images: Any, train: Any, *, query_ids: Sequence[int] | None = None,
                     train_ids: Sequence[int] | None = None, center: bool = False) -> SimilarityScores:
    """Cosine similarity of flattened pixels between every query and every training image.

    ``train`` is an ``ImageDataset`` or an image tensor (then pass ``train_ids``).
    """
    q, qids = _images_and_ids(query_images, query_ids, "query")
    x, tids = _images_and_ids(train, train_ids, "training")
    if q.shape[1:] != x.shape[1:]:
        raise ValueError(f"query images {tuple(q.shape[1:])} and training images {tuple(x.shape[1:])} differ")
    if center:
        q = q - q.flatten(1).mean(1)[:, None, None, None]
        x = x - x.flatten(1).mean(1)[:, None, None, None]
    return SimilarityScores(_cosine(q, x), qids, tids, method="pixel_centered" if center else "pixel")


@torch.no_grad()
def encode_images(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, batch_size: int = 256,
                  device: Any = None) -> torch.Tensor:
    """``[B, D]`` features (float64, CPU) from any image encoder, in batches, in eval mode for modules."""
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
        if device is not None:
            encoder.to(device)
    dev = torch.device(device) if device is not None else (
        next(encoder.parameters()).device if isinstance(encoder, torch.nn.Module)
        and any(True for _ in encoder.parameters()) else torch.device("cpu"))
    out = []
    for lo in range(0, images.shape[0], batch_size):
        f = encoder(images[lo:lo + batch_size].to(dev))
        if hasattr(f, "image_embeds"):  # transformers outputs
            f = f.image_embeds
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"the encoder must return a tensor of features, got {type(f).__name__}")
        if f.shape[0] != min(batch_size, images.shape[0] - lo):
            raise ValueError(f"the encoder returned {f.shape[0]} feature rows for {images[lo:lo + batch_size].shape[0]} images")
        out.append(f.flatten(1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def feature_similarity(encoder: Callable[[torch.Tensor], torch.Tensor], query_images: Any, train: Any, *,
                       query_ids: Sequence[int] | None = None, train_ids: Sequence[int] | None = None,
                       batch_size: int = 256, device: Any = None, name: str = "features") -> SimilarityScores:
    """Cosine similarity in the feature space of a user-supplied encoder (CLIP in the paper)."""
    q, qids = _images_and_ids(query_images, query_ids, "query")
    x, tids = _images_and_ids(train, train_ids, "training")
    fq = encode_images(encoder, q, batch_size=batch_size, device=device)
    fx = encode_images(encoder, x, batch_size=batch_size, device=device)
    if fq.shape[1] != fx.shape[1]:
        raise ValueError(f"query features have dimension {fq.shape[1]}, training features {fx.shape[1]}")
    return SimilarityScores(_cosine(fq, fx), qids, tids, method=name)


def clip_image_encoder(path: str | Path, *, image_size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder for :func:`feature_similarity` from a **locally stored** CLIP model (``transformers`` format).

    Images in [-1, 1] (grey or RGB) are resized to ``image_size``, repeated to 3 channels and normalised with
    CLIP's mean/std; the output is the projected image embedding. Nothing is downloaded.
    """
    try:
        from transformers import CLIPVisionModelWithProjection  # optional: only the CLIP baseline needs it
    except ImportError as e:  # pragma: no cover - depends on the user's environment
        raise ImportError("clip_image_encoder needs the 'transformers' package (pip install transformers); "
                          "or pass any other encoder callable to feature_similarity") from e
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no CLIP model folder at {str(path)!r} (this function never downloads weights)")
    model = CLIPVisionModelWithProjection.from_pretrained(p, local_files_only=True).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - mean.to(x.device)) / std.to(x.device)
        return model.to(x.device)(pixel_values=x).image_embeds

    return encode
