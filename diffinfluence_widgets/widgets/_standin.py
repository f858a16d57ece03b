"""``StandInBackend``: a deterministic **test double** of :class:`~diffinfluence_widgets.backend.InfluenceBackend`.

Not an influence method. It lets the session and the widgets be developed and tested without a trained model: the
images are scikit-learn's bundled 8×8 digits (no download), and the "scores" have the algebraic shape of the real
ones so that every control has a visible, checkable effect:

    s_λ[q, j] = Σ_i  u_q,i · g_j,i / (e_i + λ)

with fixed "training gradients" ``g_j`` (a seeded linear map of the pixels plus noise), eigenvalues ``e_i`` spread
over six decades (so moving the damping reorders the ranking), a query vector ``u_q`` that depends on the query,
the measurement and the method family, and a split of ``u_q`` over timestep bands that sums exactly to the whole
(so the band profile sums to the score). ``search`` is exact (argpartition over all scores), so the browser tests
can compare what the gallery shows with :meth:`scores` computed in Python. Everything depends only on the seed.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
from sklearn.datasets import load_digits

from ..backend import PreparedQuery, QueryItem, SearchResult

__all__ = ["StandInBackend"]


class StandInBackend:
    """Deterministic stand-in backend over scikit-learn's digits (test double; see the module docstring).

    Parameters
    ----------
    num_train:
        training images (the first ``num_train`` digits); the next ``num_heldout`` are held-out queries.
    num_generated:
        generated queries available at start (blends of two training digits, seeded).
    dim:
        length of the fake projected gradients.
    prepare_delay:
        seconds ``prepare`` sleeps (simulates the query-gradient pass; tests of responsiveness raise it).
    fail_query:
        ``prepare`` raises for this query id (tests of errors shown inside the widget).
    """

    measurements = ["loss", "elbo_simplified", "square_norm", "loss_at_t=500"]
    methods = ["ekfac", "kfac", "trak", "dtrak"]
    bands = [(0, 250), (250, 500), (500, 750), (750, 1000)]
    default_damping = {"ekfac": 1e-3, "kfac": 1e-3, "trak": 1e-1, "dtrak": 1e-1}

    def __init__(self, num_train: int = 600, num_heldout: int = 6, num_generated: int = 6, dim: int = 48,
                 seed: int = 0, prepare_delay: float = 0.0, fail_query: int | None = None):

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # [1797, 8, 8] in [-1, 1]
        if num_train + num_heldout > len(x):
            raise ValueError(f"num_train + num_heldout must be at most {len(x)}, got {num_train + num_heldout}")
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.prepare_delay = prepare_delay
        self.fail_query = fail_query
        self._images = x[:num_train, None]  # [N, 1, 8, 8]
        self.labels = digits.target[:num_train]
        # ids are not positions: stable ids offset from 0 so a position/id mix-up shows in the tests
        self.train_ids = np.arange(1000, 1000 + num_train, dtype=np.int64)
        self._pos = {int(i): n for n, i in enumerate(self.train_ids)}
        flat = self._images.reshape(num_train, -1).astype(np.float64)
        self._W = rng.normal(size=(dim, flat.shape[1])) / np.sqrt(flat.shape[1])
        g = flat @ self._W.T + 0.3 * rng.normal(size=(num_train, dim))
        self._G = g - g.mean(0)  # [N, dim]; centred like gradients at a trained model (mean gradient ≈ 0)
        self._eig = np.logspace(-5, 1, dim)[rng.permutation(dim)]
        self._mix = {m: np.eye(dim) + 0.4 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
                     for m in self.measurements}
        self._fam = {"ekfac": 1.0, "kfac": 0.85, "trak": 0.6, "dtrak": 0.5}
        self._meth_noise = {m: rng.normal(size=dim) for m in self.methods}
        # band split: positive weights per band and coordinate, summing to 1 over bands
        w = rng.uniform(0.2, 1.0, size=(len(self.bands), dim))
        self._band_w = w / w.sum(0, keepdims=True)
        self._lock = threading.Lock()
        self._queries: list[QueryItem] = []
        for n in range(num_heldout):
            k = num_train + n
            self._queries.append(QueryItem(id=k, kind="heldout", image=x[k][None].copy(),
                                           label=f"held-out digit {int(digits.target[k])}"))
        for s in range(num_generated):
            self._add_generated(s)
        self.calls = {"prepare": 0, "search": 0, "scores": 0}

    # ------------------------------------------------------------------ queries
    def _add_generated(self, seed: int) -> QueryItem:
        rng = np.random.default_rng([self.seed, 7919, seed])
        a, b = rng.choice(len(self._images), size=2, replace=False)
        t = rng.uniform(0.25, 0.75)
        img = np.clip(t * self._images[a] + (1 - t) * self._images[b] + 0.15 * rng.normal(size=(1, 8, 8)),
                      -1, 1).astype(np.float32)
        q = QueryItem(id=100_000 + seed, kind="generated", image=img, label=f"generated, seed {seed}",
                      meta={"seed": seed})
        with self._lock:
            if all(x.id != q.id for x in self._queries):
                self._queries.append(q)
        return q

    def queries(self) -> list[QueryItem]:
        with self._lock:
            return list(self._queries)

    def generate_query(self, seed: int) -> QueryItem:
        return self._add_generated(int(seed))

    def _query(self, query_id: int) -> QueryItem:
        for q in self.queries():
            if q.id == query_id:
                return q
        raise KeyError(f"unknown query id {query_id}")

    # ------------------------------------------------------------------ training side
    def train_images(self, ids: Sequence[int]) -> np.ndarray:
        try:
            pos = [self._pos[int(i)] for i in ids]
        except KeyError as e:
            raise KeyError(f"unknown training id {e.args[0]}") from None
        return self._images[pos]

    def map_2d(self) -> np.ndarray:
        g = self._G - self._G.mean(0)
        _, _, vt = np.linalg.svd(g, full_matrices=False)
        return g @ vt[:2].T

    def map_2d_query(self, query_id: int) -> np.ndarray:
        """The query's "gradient" (its image through the stand-in's feature map), on the same axes as map_2d."""
        g = self._G - self._G.mean(0)
        _, _, vt = np.linalg.svd(g, full_matrices=False)
        q = self._W @ self._query(int(query_id)).image.reshape(-1).astype(np.float64)
        return (q - self._G.mean(0)) @ vt[:2].T

    # ------------------------------------------------------------------ query side
    def prepare(self, query_id: int, measurement: str, method: str,
                band: tuple[int, int] | None = None) -> PreparedQuery:
        if measurement not in self.measurements:
            raise ValueError(f"unknown measurement {measurement!r}; expected one of {self.measurements}")
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}; expected one of {self.methods}")
        if band is not None and tuple(band) not in self.bands:
            raise ValueError(f"unknown band {band!r}; expected one of {self.bands} or None")
        self.calls["prepare"] += 1
        if self.prepare_delay:
            time.sleep(self.prepare_delay)
        if self.fail_query is not None and int(query_id) == self.fail_query:
            raise RuntimeError(f"stand-in failure for query {query_id} (as asked by fail_query)")
        q = self._query(int(query_id))
        u = self._mix[measurement] @ (self._W @ q.image.reshape(-1).astype(np.float64))
        f = self._fam[method]
        u = f * u + (1 - f) * self._meth_noise[method] * np.abs(u).mean()
        per_band = self._band_w * u[None, :]  # [B, dim], sums to u over bands
        payload = per_band[self.bands.index(tuple(band))] if band is not None else u
        return PreparedQuery(query_id=int(query_id), measurement=measurement, method=method,
                             band=tuple(band) if band is not None else None,
                             payload={"u": payload, "per_band": per_band if band is None else payload[None]})

    def scores(self, prepared: PreparedQuery, damping: float) -> np.ndarray:
        self.calls["scores"] += 1
        return self._G @ (prepared.payload["u"] / (self._eig + float(damping)))

    def search(self, prepared: PreparedQuery, damping: float, k: int) -> SearchResult:
        self.calls["search"] += 1
        s = self.scores(prepared, damping)
        k = min(int(k), len(s))
        top = np.argsort(-s, kind="stable")[:k]
        bot = np.argsort(s, kind="stable")[:k]
        return SearchResult(proponent_ids=self.train_ids[top], proponent_scores=s[top],
                            opponent_ids=self.train_ids[bot], opponent_scores=s[bot], damping=float(damping),
                            exact=True)

    def band_profile(self, prepared: PreparedQuery, damping: float, ids: Sequence[int]) -> np.ndarray:
        pos = [self._pos[int(i)] for i in ids]
        per_band = prepared.payload["per_band"]  # [B, dim]
        return (per_band / (self._eig + float(damping))[None, :]) @ self._G[pos].T  # [B, len(ids)]
