"""Two-way bootstrap intervals for LDS and for paired differences of LDS (queries × subsets).

An LDS is a mean over queries of a rank correlation over subsets. Both are samples: another set of generated
queries *and* another draw of the M retrained subsets would give another number. The standard error over queries
(:attr:`.lds.LDSResult.sem`) treats the subsets as fixed, and because every query is scored on the *same* subsets,
a lucky or unlucky subset draw moves all queries together — an error the queries-only view cannot see (on the
digits benchmark the two-way standard errors were 1.6–2.8× larger).

The two-way bootstrap resamples both, independently and with replacement: resample b draws Q query indices and M
subset indices; each drawn query's correlation is recomputed over the drawn subsets (duplicated subsets are tied
points of the rank correlation), and the statistic is the mean over the drawn queries. A paired difference uses
the same (queries, subsets) draw for both methods, so what they share cancels. The interval is the percentile
interval of the B resampled statistics; ``sem`` is their standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = ["Interval", "resample_indices", "rowwise_spearman", "spearman_per_query", "oracle_per_query",
           "bootstrap", "bootstrap_lds", "bootstrap_difference", "BOOTSTRAP_OVER"]

#: what a bootstrap may resample
BOOTSTRAP_OVER = ("queries", "subsets")


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval: ``estimate`` (on the original sample), ``low`` / ``high``
    (percentile interval at ``level``), ``sem`` (standard deviation of the resampled statistics)."""

    estimate: float
    low: float
    high: float
    sem: float
    level: float
    num_resamples: int
    over: tuple[str, ...]

    @property
    def width(self) -> float:
        return self.high - self.low

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "sem": self.sem, "level": self.level,
                "num_resamples": self.num_resamples, "over": list(self.over)}

    def __str__(self) -> str:
        return f"{100 * self.estimate:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def _check_over(over: Sequence[str]) -> tuple[str, ...]:
    o = tuple(over)
    bad = [x for x in o if x not in BOOTSTRAP_OVER]
    if bad or not o:
        raise ValueError(f"over must name one or both of {BOOTSTRAP_OVER}, got {over!r}")
    return o


def resample_indices(num_queries: int, num_subsets: int, num_resamples: int = 1000, *, seed: int = 0,
                     over: Sequence[str] = BOOTSTRAP_OVER) -> tuple[np.ndarray, np.ndarray]:
    """``(query_idx [B, Q], subset_idx [B, M])``; a dimension not in ``over`` keeps its identity indices."""
    over = _check_over(over)
    if int(num_resamples) < 2:
        raise ValueError(f"num_resamples must be at least 2, got {num_resamples!r}")
    rng = np.random.default_rng([int(seed), 0xB007])
    b = int(num_resamples)
    q = rng.integers(0, num_queries, (b, num_queries)) if "queries" in over else np.tile(np.arange(num_queries), (b, 1))
    m = rng.integers(0, num_subsets, (b, num_subsets)) if "subsets" in over else np.tile(np.arange(num_subsets), (b, 1))
    return q, m


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman along the last axis of two ``[..., M]`` arrays (average ranks for ties); a constant row counts as
    0, as in :func:`.lds.lds`."""
    ra = rankdata(a, axis=-1)
    rb = rankdata(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-1) / den
    return np.where(den > 0, rho, 0.0)


def spearman_per_query(prediction: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A per-query statistic for :func:`bootstrap`: LDS of ``prediction [Q, M]`` against ``target [Q, M]``
    (already averaged over seeds) on the subsets ``subset_idx`` ``[..., M]`` → ``[..., Q]``."""
    p, t = _qm(prediction), _qm(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} must both be [num_queries, num_subsets]")
    return lambda m: np.moveaxis(rowwise_spearman(p[:, m], t[:, m]), 0, -1)


def oracle_per_query(targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The exact-retraining oracle (:func:`.lds.oracle_lds`) as a per-query statistic over ``targets [Q, M, K]``."""
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 3 or t.shape[2] < 2:
        raise ValueError(f"the oracle needs targets [Q, M, K] with K >= 2 seeds, got shape {t.shape}")
    k = t.shape[2]
    rest = [np.delete(t, s, axis=2).mean(2) for s in range(k)]
    return lambda m: np.moveaxis(np.mean([rowwise_spearman(t[:, m, s], rest[s][:, m]) for s in range(k)], axis=0),
                                 0, -1)


def bootstrap(stats: Sequence[Callable[[np.ndarray], np.ndarray]], weights: Sequence[float], num_queries: int,
              num_subsets: int, *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0,
              over: Sequence[str] = BOOTSTRAP_OVER) -> Interval:
    """Interval of ``Σ_i weights[i] · mean_q stats[i](subsets)[q]`` under resampling of queries and/or subsets.

    Each ``stats[i]`` maps subset indices ``[..., M]`` to per-query values ``[..., Q]``; the same draw is used
    for all of them (paired). One statistic with weight 1 is an LDS; two with weights (1, −1) a paired difference.
    Resamples are evaluated in blocks (one rank computation per block), so B = 1000 costs little.
    """
    over = _check_over(over)
    if not 0 < float(level) < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    ident = np.arange(num_subsets)
    estimate = float(sum(w * f(ident).mean() for f, w in zip(stats, weights)))
    qi, mi = resample_indices(num_queries, num_subsets, num_resamples, seed=seed, over=over)
    vals = np.zeros(qi.shape[0])
    block = max(1, 200_000 // max(1, num_queries * num_subsets))
    for lo in range(0, qi.shape[0], block):
        sl = slice(lo, lo + block)
        for f, w in zip(stats, weights):
            per_query = f(mi[sl])  # [b, Q]
            vals[sl] += w * np.take_along_axis(per_query, qi[sl], axis=1).mean(1)
    alpha = (1 - float(level)) / 2
    lo, hi = np.quantile(vals, [alpha, 1 - alpha])
    return Interval(estimate, float(lo), float(hi), float(vals.std(ddof=1)), float(level), int(qi.shape[0]), over)


def _qm(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(2)
    if a.ndim != 2:
        raise ValueError(f"expected [num_queries, num_subsets] (or [..., num_seeds]), got shape {a.shape}")
    return a


def bootstrap_lds(prediction: np.ndarray, targets: np.ndarray, **kw) -> Interval:
    """Two-way bootstrap interval of an LDS: ``prediction [Q, M]`` (:func:`.lds.predicted_changes`) against
    ``targets [Q, M, K]`` or ``[Q, M]``. Keywords as :func:`bootstrap` (``over=("queries",)`` for the
    queries-only interval)."""
    p = np.asarray(prediction, dtype=np.float64)
    return bootstrap([spearman_per_query(p, _qm(targets))], [1.0], p.shape[0], p.shape[1], **kw)


def bootstrap_difference(prediction_a: np.ndarray | None, prediction_b: np.ndarray | None, targets: np.ndarray,
                         **kw) -> Interval:
    """Paired two-way bootstrap of ``LDS(a) − LDS(b)``; ``None`` stands for the exact-retraining oracle (needs
    ``targets [Q, M, K]``)."""
    t = np.asarray(targets, dtype=np.float64)
    tq = _qm(t)
    stats = [oracle_per_query(t) if p is None else spearman_per_query(p, tq) for p in (prediction_a, prediction_b)]
    return bootstrap(stats, [1.0, -1.0], tq.shape[0], tq.shape[1], **kw)
