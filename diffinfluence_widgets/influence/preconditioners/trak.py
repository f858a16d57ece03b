"""The TRAK family (TRAK, D-TRAK, Journey-TRAK; ``method.md`` §5) as a :class:`~.base.Preconditioner`:
``(ΦᵀΦ + λI)⁻¹`` in the projected space (:class:`~diffinfluence_widgets.influence.trak.TRAKScorer`)."""
from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from ...config import Method
from ..trak import TRAKScorer
from .base import Layers, PreconditionerBase, PreconditionerContext

__all__ = ["TRAKPreconditioner"]

#: one scorer per store object (TRAK and Journey-TRAK search the same loss store: one [k, k] eigenbasis for both)
#: (keyed by the store's id, dropped when the store object is collected: stores are dataclasses, not hashable)
_SCORERS: dict[int, TRAKScorer] = {}
_LOCK = threading.Lock()


def _shared_scorer(store) -> TRAKScorer:
    with _LOCK:
        scorer = _SCORERS.get(id(store))
        if scorer is None:
            scorer = _SCORERS[id(store)] = TRAKScorer.from_store(store, "features")
            weakref.finalize(store, _SCORERS.pop, id(store), None)
        return scorer


class TRAKPreconditioner(PreconditionerBase):
    """TRAK searches the loss store; D-TRAK its own square-norm store; Journey-TRAK differentiates the query's
    per-step trajectory loss (generated queries only) against the loss store.

    The ``[k, k]`` eigenvectors of ΦᵀΦ (134 MB at k = 4096, per store) are loaded on the method's first query, not
    when the backend opens: an explorer that never picks a TRAK method never holds them, and TRAK and Journey-TRAK
    share one copy. The damping scale comes from the cached eigenvalues alone; without a cache (a first build) the
    scorer is built and cached at once."""

    def __init__(self, ctx: PreconditionerContext):
        self.method = ctx.method
        self.store = "square_norm" if ctx.method == Method.DTRAK else "loss"
        self.projector = ctx.projector
        self._store = ctx.store(self.store)
        sigma = TRAKScorer.cached_spectrum(self._store)
        if sigma is None:
            sigma = self.scorer.sigma  # computes (and caches) the eigendecomposition now
        self.default_damping = TRAKScorer.damping_from_spectrum(sigma)
        self.damping_scale = TRAKScorer.damping_from_spectrum(sigma, 1.0)

    @property
    def scorer(self) -> TRAKScorer:
        """The store's :class:`TRAKScorer` (loaded on first use, shared by the methods searching that store)."""
        return _shared_scorer(self._store)

    def query_measurement(self, measurement: str) -> str:
        if self.method == Method.JOURNEY_TRAK and not measurement.startswith(Method.JOURNEY_TRAK.value):
            return Method.JOURNEY_TRAK.value
        return measurement

    def rotate(self, layers: Layers) -> np.ndarray:
        return self.scorer.rotate(self.projector.project(dict(layers)).numpy())

    def _feature(self, rotated: Any, damping: float, all_rows: bool) -> np.ndarray:
        return self.scorer.query_feature(rotated if all_rows else rotated[:1], damping)
