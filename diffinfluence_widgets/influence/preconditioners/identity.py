"""The identity preconditioner: the plain gradient dot product ``g_qᵀ g_j`` (no curvature, λ has no effect).

It searches the store's parameter-space array ``R g_j`` with ``R g_q``, so its scores are the projected dot
products ``(R g_q)ᵀ (R g_j)``; exact rescoring gives ``g_qᵀ g_j`` with full gradients. A baseline, and the proof
that a new method is one file plus a registry line.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ...config import check_damping
from .base import Layers, PreconditionerBase, PreconditionerContext

__all__ = ["IdentityPreconditioner"]


class IdentityPreconditioner(PreconditionerBase):
    """``s[q, j] = g_qᵀ g_j``."""

    store = "loss"
    default_damping = 1.0
    exact = True
    train_key = "parameter"

    def __init__(self, ctx: PreconditionerContext):
        self.method = ctx.method
        self.projector = ctx.projector

    def rotate(self, layers: Layers) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        return self.projector.project(dict(layers)).double().numpy(), {n: v[0] for n, v in layers.items()}

    def _feature(self, rotated: Any, damping: float, all_rows: bool) -> np.ndarray:
        return rotated[0] if all_rows else rotated[0][:1]

    def train_side(self, layers: Layers) -> dict[str, torch.Tensor]:
        return {n: v.float() for n, v in layers.items()}

    def exact_scores(self, rotated: Any, damping: float, train: list[Mapping[str, torch.Tensor]]) -> np.ndarray:
        check_damping(damping)
        q = rotated[1]
        return sum((torch.stack([t[n] for t in train]).double() * q[n].double()).flatten(1).sum(1)
                   for n in q).numpy()
