"""The index room: maximum-inner-product search over stored features with FAISS (exact flat, PCA-reduced scan with
exact re-ranking, IVF or HNSW); proponents and opponents from one call."""
from __future__ import annotations

import math

import faiss
import numpy as np

from ..config import IndexKind, choice

__all__ = ["FeatureIndex"]


class FeatureIndex:
    """Maximum-inner-product search over stored features with FAISS.

    ``kind="flat"`` (default): exact ``IndexFlatIP``. ``"pca"`` (the large-N default): the features' leading
    ``pca_dim`` principal directions (fitted on ≤ 50 000 seeded rows; default ``max(64, dim // 8)``), stored as 8-bit
    codes and scanned in full, then ``rerank`` × k candidates per side re-ranked with the exact float32 inner
    product (``IndexRefineFlat``): projected-gradient features have a fast-decaying spectrum, so the top of the
    list is decided in few directions and the re-ranking makes the listed scores exact. ``"ivf"``: ``IndexIVFFlat``
    with inner product (``nlist`` ≈ √N cells trained on a subsample, ``nprobe`` searched). ``"hnsw"``:
    ``IndexHNSWFlat`` with inner product (``hnsw_m`` links, ``ef_search``). The approximate kinds are for large N
    (≳ 10⁵); ``bench/index.py --scale`` compares them.
    """

    def __init__(self, features: np.ndarray, ids: np.ndarray, kind: IndexKind = IndexKind.FLAT, *,
                 nlist: int | None = None,
                 nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0,
                 pca_dim: int | None = None, rerank: int = 64):
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(ids):
            raise ValueError(f"features {x.shape} and {len(ids)} ids disagree")
        self.ids = np.asarray(ids, dtype=np.int64)
        kind = choice(IndexKind, kind, "index kind")
        if kind == IndexKind.AUTO:
            raise ValueError("FeatureIndex needs a concrete index kind ('flat', 'ivf' or 'hnsw'), got 'auto'")
        self.kind, self.dim = kind, x.shape[1]
        if kind == IndexKind.FLAT:
            index = faiss.IndexFlatIP(self.dim)
        elif kind == IndexKind.IVF:
            nlist = int(nlist or max(1, min(x.shape[0] // 39, int(math.sqrt(x.shape[0])))))
            quant = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.cp.niter = 10
            # k-means on a seeded subsample (≤ 40 points per cell) keeps the build time linear in N
            m = min(x.shape[0], 40 * nlist)
            sub = x if m == x.shape[0] else x[np.sort(np.random.default_rng(seed).choice(x.shape[0], m, False))]
            index.cp.max_points_per_centroid = 40
            index.train(sub)
            index.nprobe = min(int(nprobe), nlist)
            self._quant = quant
        elif kind == IndexKind.PCA:
            if (pca_dim is not None and int(pca_dim) < 1) or int(rerank) < 1:
                raise ValueError(f"pca_dim and rerank must be positive, got {pca_dim!r} and {rerank!r}")
            d = min(self.dim, int(pca_dim) if pca_dim is not None else max(64, self.dim // 8))
            m = min(x.shape[0], 50_000)
            sub = x if m == x.shape[0] else x[np.sort(np.random.default_rng(seed).choice(x.shape[0], m, False))]
            pca = faiss.PCAMatrix(self.dim, d)
            codes = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            reduced = faiss.IndexPreTransform(pca, codes)
            reduced.train(sub)
            index = faiss.IndexRefineFlat(reduced)
            index.k_factor = float(rerank)
            self._parts = (pca, codes, reduced)  # the refine index does not own them
            self.pca_dim = d
        elif kind == IndexKind.HNSW:
            index = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = int(ef_search)
        index.add(x)
        self.index = index

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)``, each ``[m, k']`` (k' = min(k, N)), best first, for ``[m, dim]`` queries."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index holds {self.dim}-dimensional features")
        k = min(int(k), len(self))
        scores, pos = self.index.search(q, k)
        ids = np.where(pos >= 0, self.ids[np.clip(pos, 0, None)], -1)
        return ids, scores.astype(np.float64)

    def proponents_opponents(self, query: np.ndarray, k: int):
        """Top-k of ``q`` (proponents, descending) and top-k of ``−q`` (opponents, scores ascending) in one
        FAISS call; returns ``(prop_ids, prop_scores, opp_ids, opp_scores)`` in the sign convention."""
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        ids, sc = self.search(np.concatenate([q, -q]), k)
        keep_p, keep_o = ids[0] >= 0, ids[1] >= 0
        return ids[0][keep_p], sc[0][keep_p], ids[1][keep_o], -sc[1][keep_o]
