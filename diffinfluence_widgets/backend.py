"""The contract between the influence backend and the attribution session (and through it, the widgets).

:class:`InfluenceBackend` is what ``session.AttributionSession`` needs from the backend; the real implementation
lives in :mod:`diffinfluence_widgets.index` (projected-gradient store + FAISS + (E)K-FAC query
preconditioning). Keeping the contract this small lets the widgets be tested with a stand-in backend and the
backend without a browser.

Sign convention (everywhere): a **positive** score means removing the training example is predicted to
**increase** the query's measurement — for the loss measurement the example *supports* the query (a proponent);
negative scores are opponents.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["QueryItem", "PreparedQuery", "PreparedCache", "SearchResult", "InfluenceBackend", "SIGN_CONVENTION"]

SIGN_CONVENTION = ("Positive score: removing this training image is predicted to increase the query's "
                   "measurement (for the loss: it supports the query — a proponent). Negative: an opponent.")


@dataclass
class QueryItem:
    """A query the user can pick: a generated sample or a held-out image."""

    id: int
    kind: str  # "generated" | "heldout" | "custom"
    image: np.ndarray  # [C, H, W] float32 in [-1, 1]
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"seed": 3} for generated samples


@dataclass
class PreparedQuery:
    """The query-side work that does not depend on the damping: done once per (query, measurement, method, band).

    ``payload`` is backend-specific (e.g. the query gradient rotated into the (E)K-FAC eigenbasis).
    """

    query_id: int
    measurement: str
    method: str
    band: tuple[int, int] | None
    payload: Any = None


class PreparedCache:
    """The bounded LRU of prepared queries, keyed by ``(query_id, measurement, method, band)``, that the session and
    the backend server both keep; a hit is counted in ``stats["prepare_hits"]``. Not locked: callers hold theirs."""

    def __init__(self, size: int, stats: dict):
        self.size, self.stats = int(size), stats
        self._items: "OrderedDict[tuple, PreparedQuery]" = OrderedDict()

    def get(self, key: tuple) -> PreparedQuery | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            self.stats["prepare_hits"] += 1
        return hit

    def put(self, key: tuple, prepared: PreparedQuery) -> None:
        self._items[key] = prepared
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SearchResult:
    """Top-k proponents and opponents at one damping (scores in the sign convention above)."""

    proponent_ids: np.ndarray
    proponent_scores: np.ndarray
    opponent_ids: np.ndarray
    opponent_scores: np.ndarray
    damping: float
    exact: bool = False  # True when the listed scores were rescored with full gradients
    #: what the exact answer ranked: ``"all"`` training images, the FAISS ``"candidates"``, or ``""`` (approximate)
    exact_over: str = ""
    stats: dict = field(default_factory=dict)


@runtime_checkable
class InfluenceBackend(Protocol):
    """What a session needs from the backend."""

    #: ids of the training examples, ``[N]`` int64, in index order
    train_ids: np.ndarray
    #: names accepted by :meth:`prepare` (e.g. ``["loss", "elbo_simplified", "square_norm", "loss_at_t=500"]``)
    measurements: list[str]
    #: names accepted by :meth:`prepare` (e.g. ``["ekfac", "kfac", "trak", "dtrak"]``)
    methods: list[str]
    #: timestep bands ``[(lo, hi), ...]`` for the per-band profile; empty if unsupported
    bands: list[tuple[int, int]]
    #: default damping per method family (λ is not comparable across families)
    default_damping: dict[str, float]

    def train_images(self, ids: Sequence[int]) -> np.ndarray:
        """``[k, C, H, W]`` float32 in [-1, 1] for the given training ids."""

    def queries(self) -> list[QueryItem]:
        """The queries available without extra work (generated samples and held-out images)."""

    def generate_query(self, seed: int) -> QueryItem:
        """Sample a new query from the model with this seed (keeps its trajectory) and add it to :meth:`queries`."""

    def prepare(self, query_id: int, measurement: str, method: str,
                band: tuple[int, int] | None = None) -> PreparedQuery:
        """The slow, damping-independent part (query gradient, rotation into the eigenbasis)."""

    def scores(self, prepared: PreparedQuery, damping: float) -> np.ndarray:
        """Scores of every training example, ``[N]`` float64 in :attr:`train_ids` order."""

    def search(self, prepared: PreparedQuery, damping: float, k: int) -> SearchResult:
        """Top-k proponents and opponents through the FAISS index."""

    def band_profile(self, prepared: PreparedQuery, damping: float, ids: Sequence[int]) -> np.ndarray:
        """``[num_bands, len(ids)]`` per-timestep-band contributions; they sum to the scores of ``ids``."""

    def map_2d(self) -> np.ndarray:
        """``[N, 2]`` coordinates of the projected training gradients (for the 2-D map)."""

    # Optional: ``map_2d_query(query_id) -> [2]``: the query's place on :meth:`map_2d` (its gradient through the
    # same projection and axes); the gradient map marks the query with it.
    # Optional: ``refine(prepared, damping, k) -> SearchResult`` with ``exact=True``: the method's exact top-k
    # (the session shows it after the instant :meth:`search` answer when the backend has it).
