"""The TRAK family (TRAK, D-TRAK, Journey-TRAK; ``method.md`` §5) as a :class:`~.base.Preconditioner`:
``(ΦᵀΦ + λI)⁻¹`` in the projected space (:class:`~diffinfluence_widgets.influence.trak.TRAKScorer`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...config import Method
from ..trak import TRAKScorer
from .base import Layers, PreconditionerBase, PreconditionerContext

__all__ = ["TRAKPreconditioner"]


class TRAKPreconditioner(PreconditionerBase):
    """TRAK searches the loss store; D-TRAK its own square-norm store; Journey-TRAK differentiates the query's
    per-step trajectory loss (generated queries only) against the loss store."""

    def __init__(self, ctx: PreconditionerContext):
        self.method = ctx.method
        self.store = "square_norm" if ctx.method == Method.DTRAK else "loss"
        self.projector = ctx.projector
        self.scorer = TRAKScorer.from_store(ctx.store(self.store), "features")
        self.default_damping = self.scorer.default_damping()
        self.damping_scale = self.scorer.default_damping(1.0)

    def query_measurement(self, measurement: str) -> str:
        if self.method == Method.JOURNEY_TRAK and not measurement.startswith(Method.JOURNEY_TRAK.value):
            return Method.JOURNEY_TRAK.value
        return measurement

    def rotate(self, layers: Layers) -> np.ndarray:
        return self.scorer.rotate(self.projector.project(dict(layers)).numpy())

    def _feature(self, rotated: Any, damping: float, all_rows: bool) -> np.ndarray:
        return self.scorer.query_feature(rotated if all_rows else rotated[:1], damping)
