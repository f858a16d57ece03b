"""The answers of an :class:`~diffinfluence_widgets.session.AttributionSession`: top-k lists, sweeps, comparisons.

Scores follow :data:`~diffinfluence_widgets.backend.SIGN_CONVENTION` (positive: removing the training image is
predicted to increase the query's measurement).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes as _atomic_write
from .backend import SIGN_CONVENTION

__all__ = ["Influence", "InfluenceResult", "SweepResult", "CompareResult", "rank_agreement", "SIGN_CONVENTION"]


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Influence:
    """One training image in a top-k list."""

    id: int
    score: float
    rank: int  # 1-based within its list
    role: str  # "proponent" | "opponent"


@dataclass
class InfluenceResult:
    """The answer for one setting of the session (scores in :data:`SIGN_CONVENTION`)."""

    request_id: int
    query_id: int
    measurement: str
    method: str
    band: tuple[int, int] | None
    damping: float
    k: int
    proponents: list[Influence]
    opponents: list[Influence]
    exact: bool = False
    #: what an exact answer ranked: every training image (``"all"``) or the index's candidates (``"candidates"``)
    exact_over: str = ""
    #: how the backend answered (``SearchResult.stats["route"]``, e.g. ``"int8"``, ``"profile"``, ``"faiss"``;
    #: empty when it does not say): passing it back to ``search(..., route=...)`` reproduces an instant answer
    route: str = ""
    #: for an approximate answer: the mean overlap of earlier approximate answers with their refined ones
    #: (this session, this method), or None before the first refinement
    est_recall: float | None = None
    elapsed_s: float = 0.0
    #: scores of every training example in ``train_ids`` order, when the session asked for them
    all_scores: np.ndarray | None = field(default=None, repr=False)
    train_ids: np.ndarray | None = field(default=None, repr=False)
    #: wall-clock times (``time.time()``) when the request was made and when its answer was ready (diagnostics)
    requested_at: float = 0.0
    finished_at: float = 0.0

    @property
    def settings(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "measurement": self.measurement, "method": self.method,
                "band": list(self.band) if self.band else None, "damping": self.damping, "k": self.k}

    @property
    def badge(self) -> str:
        """``"exact ✓"`` or ``"approximate (est. recall …)"``: what the gallery marks the answer as."""
        if self.exact:
            return "exact ✓" if self.exact_over != "candidates" else "exact ✓ (over the index's candidates)"
        return "approximate" + (f" (est. recall {self.est_recall:.2f})" if self.est_recall is not None else "")

    def records(self) -> list[dict[str, Any]]:
        """One row per listed training image (proponents first), with the settings repeated."""
        rows = []
        for inf in [*self.proponents, *self.opponents]:
            rows.append({"role": inf.role, "rank": inf.rank, "train_id": inf.id, "score": inf.score,
                         "query_id": self.query_id, "measurement": self.measurement, "method": self.method,
                         "band": "" if self.band is None else f"{self.band[0]}-{self.band[1]}",
                         "damping": self.damping})
        return rows

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        rows = self.records()
        fields = ["role", "rank", "train_id", "score", "query_id", "measurement", "method", "band", "damping"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": repr(float(r["score"])), "damping": repr(float(r["damping"]))})
        text = buf.getvalue()
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "sign_convention": SIGN_CONVENTION, "exact": self.exact,
                "proponents": [asdict(p) for p in self.proponents],
                "opponents": [asdict(o) for o in self.opponents]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text


@dataclass
class SweepResult:
    """Rank stability across a damping sweep: where the top-k at the reference damping rank at other dampings."""

    dampings: np.ndarray  # [D]
    reference_damping: float
    ids: np.ndarray  # [k] top proponents at the reference damping
    ranks: np.ndarray  # [D, k] 1-based rank of each id among all training images (by descending score)
    overlap: np.ndarray  # [D] |top-k(λ) ∩ top-k(ref)| / k
    spearman: np.ndarray  # [D] Spearman of all scores at λ vs the reference


@dataclass
class CompareResult:
    """Two methods on the same query: their top-k and how much they agree."""

    method_a: str
    method_b: str
    result_a: InfluenceResult
    result_b: InfluenceResult
    spearman: float
    kendall: float
    topk_overlap: float  # |top-k proponents A ∩ B| / k
    k: int


def rank_agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float, float]:
    """Spearman and Kendall correlation of two score vectors and the overlap of their top-k (by descending score)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score vectors must have the same shape, got {a.shape} and {b.shape}")
    from scipy import stats  # ~1 s of imports: only when ranks are compared, not when a kernel starts

    rho = float(stats.spearmanr(a, b).statistic) if a.size > 1 else float("nan")
    tau = float(stats.kendalltau(a, b).statistic) if a.size > 1 else float("nan")
    k = max(1, min(int(k), a.size))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return rho, tau, len(ta & tb) / k


def sweep_ranks(scores_at, reference: float, dampings, k: int, train_ids: np.ndarray) -> SweepResult:
    """Ranks, top-k overlap and Spearman correlation of the top-k at ``reference`` across ``dampings``;
    ``scores_at(λ)`` gives all training scores at λ (``train_ids`` order)."""
    from scipy import stats  # ~1 s of imports: only when a sweep is drawn, not when a kernel starts

    dampings = np.asarray(sorted(float(d) for d in dampings), dtype=np.float64)
    s_ref = scores_at(reference)
    top = np.argsort(-s_ref, kind="stable")[:k]
    ranks = np.zeros((len(dampings), len(top)), dtype=np.int64)
    overlap = np.zeros(len(dampings))
    rho = np.zeros(len(dampings))
    for n, d in enumerate(dampings):
        s = scores_at(d)
        order = np.argsort(-s, kind="stable")
        rank_of = np.empty_like(order)
        rank_of[order] = np.arange(1, len(order) + 1)
        ranks[n] = rank_of[top]
        overlap[n] = len(set(order[:k].tolist()) & set(top.tolist())) / k
        rho[n] = float(stats.spearmanr(s, s_ref).statistic)
    return SweepResult(dampings=dampings, reference_damping=reference, ids=np.asarray(train_ids)[top], ranks=ranks,
                       overlap=overlap, spearman=rho)


def result_from_search(r, s: dict, request_id: int, elapsed_s: float, train_ids, **extra) -> InfluenceResult:
    """An :class:`InfluenceResult` from a backend ``SearchResult`` ``r`` answered at the settings ``s``."""
    def side(ids, scores, role):
        return [Influence(int(i), float(v), n + 1, role) for n, (i, v) in enumerate(zip(np.asarray(ids),
                                                                                       np.asarray(scores)))]

    return InfluenceResult(request_id=request_id, query_id=s["query_id"], measurement=s["measurement"],
                           method=s["method"], band=s["band"], damping=float(s["damping"]), k=int(s["k"]),
                           proponents=side(r.proponent_ids, r.proponent_scores, "proponent"),
                           opponents=side(r.opponent_ids, r.opponent_scores, "opponent"), exact=bool(r.exact),
                           exact_over=str(getattr(r, "exact_over", "")),
                           route=str((getattr(r, "stats", None) or {}).get("route", "")), elapsed_s=elapsed_s,
                           train_ids=np.asarray(train_ids), **extra)
