"""Exact top-k of the K-FAC family at any damping, from the exact store (:mod:`diffinfluence_widgets.store.exact`), without a gradient.

With ``u = Qᵀ g_q`` (the query rotated into the eigenbasis, flattened over layers) and ``r_j = Qᵀ g_j`` (row j
of the exact store), the exact score at damping λ is ``s_j(λ) = Σ_i u_i r_ji / (Λ_i + λ)``.

**Design (ours): a per-query damping profile with error bounds.** The coordinates are grouped into B bins of
log-spaced eigenvalue ``Λ`` (bin b holds the eigenvalues in ``[lo_b, hi_b]``, midpoint ``c_b``, half-width
``d_b``). One streamed pass over the store per query computes, for every training example,
``P0[j, b] = Σ_{i∈b} u_i r_ji``, ``P1[j, b] = Σ_{i∈b} u_i r_ji (Λ_i − c_b)`` and ``A[j, b] = Σ_{i∈b} |u_i r_ji|``
(``[N, B]`` each: 24 B per example and bin). For any λ, the second-order expansion of ``1/(Λ + λ)`` around
``c_b`` gives

    ŝ_j = Σ_b P0[j, b] / (c_b + λ) − P1[j, b] / (c_b + λ)²,
    |s_j − ŝ_j| ≤ e_j = Σ_b A[j, b] d_b² / ((c_b + λ)² (lo_b + λ)),

a rigorous bound (the remainder of each term is ``(Λ − c)² / ((c + λ)² (Λ + λ))``). The examples whose upper
bound ``ŝ_j + e_j`` reaches the k-th largest lower bound contain the exact top-k; only those candidates are
rescored exactly (their rows read from the store, kept in an LRU cache). So a new λ costs ``[N, B]`` products plus a
few rows, never a gradient and not a pass over the store; a new query costs one pass (which also gives the exact
scores of every example at the current λ). If the bounds leave too many candidates, the store is streamed
instead, which is exact too. Eigenvalues more than ``decades`` below the largest share the bottom bin.

**The pass (one thread).** The store is read in chunks of rows into one reused float32 buffer (read, not mapped:
the process does not grow by the store's size). Each chunk is taken ``block`` columns at a time, converted to
float64 and transposed (``[block, rows]``, in cache), and the bin sums are sparse products: a ``[2B, block]`` CSR
matrix holding ``u_i`` and ``u_i (Λ_i − c_b)`` in row ``b(i)`` gives ``P0`` and ``P1`` in one product, and the same
pattern with ``|u_i|`` times the absolute block gives ``A``. The sparsity pattern (one entry per column) is fixed
per scorer, so any column order works — EK-FAC and K-FAC bin the same store differently. All sums are float64; the
error bound carries their rounding (``γ_n`` of the largest bin, relative to ``A``).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import scipy.sparse as sparse
import torch

from ..store.exact import ExactStore

__all__ = ["ExactScorer", "ExactQuery", "ExactTopK", "flat_eigenvalues"]


def flat_eigenvalues(curvature, eigenvalues: str = "ekfac") -> np.ndarray:
    """``[P]`` float64: EK-FAC eigenvalues or K-FAC products ``λ_B λ_Aᵀ``, in the exact store's column order."""
    parts = []
    for n in curvature.layer_names:
        if eigenvalues == "ekfac":
            lam = curvature.eigenvalues[n].double()
        elif eigenvalues == "kfac":
            lam = torch.outer(curvature.lambda_b[n].double(), curvature.lambda_a[n].double())
        else:
            raise ValueError(f"eigenvalues must be 'ekfac' or 'kfac', got {eigenvalues!r}")
        parts.append(lam.reshape(-1).cpu())
    return torch.cat(parts).numpy().copy()  # a copy: the curvature's eigenvalues are never modified


@dataclass
class ExactQuery:
    """One query's rotated gradient ``u`` (``[P]`` float64) and, once computed, its damping profile."""

    u: torch.Tensor
    profile_p: np.ndarray | None = None  # [B, N] float64: Σ_{i∈b} u_i r_ji
    profile_1: np.ndarray | None = None  # [B, N] float64: Σ_{i∈b} u_i r_ji (Λ_i − c_b), the first-order term
    profile_a: np.ndarray | None = None  # [B, N] float64: Σ_{i∈b} |u_i r_ji|
    passes: int = 0  # streamed passes over the store spent on this query


@dataclass
class ExactTopK:
    """Exact top-k (store positions and scores, scores in the sign convention) and how they were found."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray
    damping: float
    candidates: int  # rows rescored exactly (N when the store was streamed)
    streamed: bool
    stats: dict = field(default_factory=dict)


class ExactScorer:
    """Exact (E)K-FAC scores of every training example in an :class:`ExactStore`, for any λ > 0.

    Parameters
    ----------
    store, curvature:
        The exact store and the curvature whose eigenbasis it was built in.
    eigenvalues:
        ``"ekfac"`` or ``"kfac"`` (same eigenbasis, other eigenvalues).
    num_bins:
        Log-spaced eigenvalue bins of the damping profile (more: tighter bounds, fewer candidates, more memory:
        24 · num_bins bytes per training example and refined query).
    decades:
        Eigenvalues more than this many decades below the largest share the bottom bin.
    chunk_bytes, row_cache_bytes:
        Rows streamed at a time (one reused buffer); memory for candidate rows kept between λ changes.
    block:
        Columns converted to float64 at a time during a pass (``block × rows × 8`` bytes: keep it in cache).
    """

    def __init__(self, store: ExactStore, curvature, *, eigenvalues: str = "ekfac", num_bins: int = 1024,
                 decades: float = 20.0, chunk_bytes: int = 32 << 20, row_cache_bytes: int = 256 << 20,
                 max_candidate_share: float = 0.25, block: int = 16384):
        if list(store.layer_names) != list(curvature.layer_names):
            raise ValueError("the exact store and the curvature have different layers")
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins!r}")
        self.store, self.method = store, eigenvalues
        self.lam = flat_eigenvalues(curvature, eigenvalues)
        if self.lam.shape[0] != store.num_parameters:
            raise ValueError(f"curvature has {self.lam.shape[0]} parameters, the exact store {store.num_parameters}")
        self.chunk_bytes, self.row_cache_bytes = int(chunk_bytes), int(row_cache_bytes)
        self.max_candidates = max(64, int(max_candidate_share * len(store)))
        top = float(self.lam.max())
        floor = top * 10.0 ** (-float(decades)) if top > 0 else 1.0
        edges = np.logspace(math.log10(floor), math.log10(max(top, floor)), int(num_bins))
        b = np.searchsorted(edges, self.lam, side="left")  # bin 0: Λ ≤ floor (including 0 and rounding negatives)
        used, self._bin = np.unique(b, return_inverse=True)  # drop empty bins
        nb = len(used)
        self.bin_lo = np.full(nb, np.inf)
        self.bin_hi = np.full(nb, -np.inf)
        np.minimum.at(self.bin_lo, self._bin, self.lam)
        np.maximum.at(self.bin_hi, self._bin, self.lam)
        self.bin_mid = 0.5 * (self.bin_lo + self.bin_hi)
        self._lam_t = torch.from_numpy(self.lam)
        self._dev = self.lam - self.bin_mid[self._bin]  # Λ_i − c_b: the first-order term
        # float64 rounding of a bin sum of n products: ≤ γ_{n+2} Σ|terms| (γ_m = m ε / (1 − m ε), ε = 2⁻⁵³); the
        # first-order term adds at most as much again, and A itself is computed with relative error ≤ γ
        nmax = int(np.bincount(self._bin).max()) + 2
        gamma = nmax * 2.0 ** -53 / (1 - nmax * 2.0 ** -53)
        self._rounding = 4.0 * gamma
        # per column block: the CSR pattern that sums a block's columns into their bins (one entry per column)
        self.block = max(1, int(block))
        self._blocks = []
        P = len(self.lam)
        for a in range(0, P, self.block):
            b = min(P, a + self.block)
            order = np.argsort(self._bin[a:b], kind="stable").astype(np.int32)
            indptr = np.zeros(nb + 1, dtype=np.int32)
            indptr[1:] = np.cumsum(np.bincount(self._bin[a:b], minlength=nb))
            self._blocks.append((a, b, order, indptr))
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self.counters = {"streamed_passes": 0, "rows_read": 0}
        self._lock = threading.RLock()  # the row cache and a query's profile are shared by the session's threads

    @property
    def num_bins(self) -> int:
        return len(self.bin_lo)

    # ---------------------------------------------------------------------------------------- queries
    def query(self, rotated: Mapping[str, torch.Tensor] | torch.Tensor) -> ExactQuery:
        """The query gradient in the eigenbasis (per layer ``[d_out, d_in+1]`` or already flat ``[P]``)."""
        if isinstance(rotated, torch.Tensor):
            u = rotated.reshape(-1)
        else:
            u = torch.cat([rotated[n].reshape(-1).to("cpu", torch.float64) for n in self.store.layer_names])
        u = u.to("cpu", torch.float64).contiguous()
        if u.numel() != self.store.num_parameters:
            raise ValueError(f"query has {u.numel()} coordinates, the exact store {self.store.num_parameters}")
        return ExactQuery(u)

    def _check(self, damping) -> float:
        lam = float(damping)
        if not (lam > 0) or not math.isfinite(lam):
            raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
        return lam

    def _weights(self, damping: float) -> torch.Tensor:
        return (self._lam_t + damping).reciprocal_()

    # ---------------------------------------------------------------------------------------- streaming
    def scores(self, q: ExactQuery, damping: float) -> np.ndarray:
        """``[N]`` float64 exact scores of every training example (one streamed pass; builds the profile too when
        it is missing, in the same pass)."""
        return self._pass(q, self._check(damping))

    def profile(self, q: ExactQuery) -> None:
        """Build the query's damping profile (one streamed pass) unless it exists."""
        if q.profile_p is None:
            self._pass(q, None)

    def _pass(self, q: ExactQuery, lam: float | None) -> np.ndarray | None:
        """One pass over the store: the exact scores at ``lam`` (when given) and the profile (when missing)."""
        want_profile = q.profile_p is None
        if not want_profile and lam is None:
            return None
        n, nb = len(self.store), self.num_bins
        u = q.u.numpy()
        v = u / (self.lam + lam) if lam is not None else None
        mats = []
        for a, b, order, indptr in self._blocks:
            w = b - a
            m = m_abs = None
            if want_profile:
                ub = u[a:b][order]
                data = np.concatenate([ub, ub * self._dev[a:b][order]])
                m = sparse.csr_matrix((data, np.concatenate([order, order]),
                                       np.concatenate([indptr, indptr[1:] + indptr[-1]])), shape=(2 * nb, w))
                m_abs = sparse.csr_matrix((np.abs(ub), order, indptr), shape=(nb, w))
            mats.append((a, b, m, m_abs))
        out = np.zeros(n) if lam is not None else None
        if want_profile:
            prof = np.zeros((2 * nb, n))
            pa = np.zeros((nb, n))
        y = None
        for lo, block in self.store.chunks(self.chunk_bytes):
            rows = block.shape[0]
            hi = lo + rows
            if y is None or y.shape[1] < rows:
                y = np.empty((self.block, rows))  # reused: [block, rows] float64 stays in cache
            for a, b, m, m_abs in mats:
                yb = y[:b - a, :rows]
                np.copyto(yb, block[:, a:b].T)  # float32 → float64 (exact), transposed
                if lam is not None:
                    out[lo:hi] += v[a:b] @ yb
                if want_profile:
                    prof[:, lo:hi] += m @ yb
                    pa[:, lo:hi] += m_abs @ np.abs(yb, out=yb)
        if want_profile:
            q.profile_p, q.profile_1, q.profile_a = prof[:nb], prof[nb:], pa
        q.passes += 1
        self.counters["streamed_passes"] += 1
        return out

    def scores_at(self, q: ExactQuery, damping: float, positions: np.ndarray) -> np.ndarray:
        """Exact float64 scores of the given store rows (rows cached between calls)."""
        lam = self._check(damping)
        v = (q.u * self._weights(lam)).numpy()
        pos = np.asarray(positions, dtype=np.int64)
        missing = list(dict.fromkeys(int(p) for p in pos if int(p) not in self._rows))
        cap = max(1, self.row_cache_bytes // max(self.store.bytes_per_example, 1))
        if missing:
            rows = self.store.rows(missing)
            self.counters["rows_read"] += len(missing)
            for p, r in zip(missing, rows):
                self._rows[p] = r
        out = np.array([float(np.dot(self._rows[int(p)].astype(np.float64, copy=False), v)) for p in pos])
        for p in pos:
            self._rows.move_to_end(int(p))
        if missing:
            while len(self._rows) > cap:
                self._rows.popitem(last=False)
        return out

    # ---------------------------------------------------------------------------------------- top-k
    def bounds(self, q: ExactQuery, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """``(ŝ, e)``: the profile's estimate of every score at λ and a rigorous bound on its error."""
        lam = self._check(damping)
        if q.profile_p is None:
            raise ValueError("this query has no damping profile yet (call scores() or top_k() once)")
        lo, c = self.bin_lo + lam, self.bin_mid + lam
        if np.any(lo <= 0):
            inf = np.full(len(self.store), np.inf)
            return np.zeros(len(self.store)), inf
        # 1/(Λ+λ) = 1/(c+λ) − (Λ−c)/(c+λ)² + (Λ−c)²/((c+λ)²(Λ+λ)), the last term ≤ d²/((c+λ)²(lo+λ)) in a bin
        w0, w1 = 1.0 / c, -1.0 / c ** 2
        d = 0.5 * (self.bin_hi - self.bin_lo)
        rem = d ** 2 / (c ** 2 * lo)
        est = w0 @ q.profile_p + w1 @ q.profile_1
        # plus the rounding of the float64 bin sums (relative to the absolute mass A, see __init__)
        err = (rem + self._rounding * w0) @ q.profile_a
        return est, err

    def top_k(self, q: ExactQuery, damping: float, k: int) -> ExactTopK:
        """Exact top-k proponents (largest scores) and opponents (smallest) over the whole store at λ."""
        with self._lock:
            return self._top_k(q, damping, k)

    def _top_k(self, q: ExactQuery, damping: float, k: int) -> ExactTopK:
        lam = self._check(damping)
        n = len(self.store)
        k = min(int(k), n)
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        streamed = q.profile_p is None
        if streamed:  # a new query: one pass builds its profile, then this λ is answered like any other
            self.profile(q)
        est, err = self.bounds(q, lam)
        lower, upper = est - err, est + err
        if not np.all(np.isfinite(err)):
            return self._from_scores(q, np.arange(n), self.scores(q, lam), k, lam, n, True)
        t_pro = np.partition(lower, n - k)[n - k]  # k-th largest lower bound
        t_opp = np.partition(upper, k - 1)[k - 1]  # k-th smallest upper bound
        cand = np.flatnonzero((upper >= t_pro) | (lower <= t_opp))
        if len(cand) > self.max_candidates:
            return self._from_scores(q, np.arange(n), self.scores(q, lam), k, lam, n, True)
        s = self.scores_at(q, lam, cand)
        return self._from_scores(q, cand, s, k, lam, len(cand), streamed, rescore=False)

    def _from_scores(self, q: ExactQuery, pos: np.ndarray, s: np.ndarray, k: int, lam: float, cands: int,
                     streamed: bool, rescore: bool = True) -> ExactTopK:
        order = np.lexsort((pos, -s))  # descending score, ties by store position
        rev = np.lexsort((pos, s))
        top, bot = pos[order[:k]], pos[rev[:k]]
        if rescore:  # the listed scores always come from scores_at, so every route gives identical bits
            both = self.scores_at(q, lam, np.concatenate([top, bot]))
            st, sb = both[:k], both[k:]
        else:
            st, sb = s[order[:k]], s[rev[:k]]
        return ExactTopK(top, st, bot, sb, lam, int(cands), bool(streamed))
