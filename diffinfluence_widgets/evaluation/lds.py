"""Linear datamodeling score (LDS), ``method.md`` §7.

The protocol, in the order it happens:

1. :func:`generate_subsets` draws M random subsets of the training set, each keeping a fraction α (paper: 50%).
2. Every subset is retrained with K seeds (:mod:`.retrain`) and every query's measurement is taken under each
   retrained model with the *same* (t, ε) draws (common random numbers): ``targets[q, m, k]``.
3. An attribution predicts, for query q and subset m, the change of the measurement caused by removing the
   examples left out of the subset (sign convention of ``architecture.md``: a positive score means removing the
   example increases the measurement)::

       prediction[q, m] = (1/N) Σ_{j ∉ S_m} s[q, j]        (:func:`predicted_changes`)

   The measured counterpart is ``target[q, m] = mean_k targets[q, m, k]``; the full-data model's measurement
   is the same for every m, so it drops out of a rank correlation. (Predicting the *kept* sum instead flips the
   sign of the correlation; the 1/N is a constant. Neither changes the LDS; we keep the spec's convention.)
4. ``LDS(q) = Spearman_m(prediction[q, m], target[q, m])``; the report is the mean over queries ± the standard
   error of that mean over queries (sample standard deviation with ddof=1, divided by √Q).

The exact-retraining oracle (:func:`oracle_lds`) replaces the prediction with the measurement itself: for each
seed k, Spearman over subsets between ``targets[q, :, k]`` and the mean of the other K − 1 seeds; the per-query
oracle is the average over k. It is the ceiling any attribution method can reach with this much seed noise.

Spearman with ties uses average ranks (as ``scipy.stats.spearmanr``). A prediction or target that is constant
over subsets has no rank correlation; it counts as **0** (a method cannot score by predicting nothing) and the
number of such queries is reported in :attr:`LDSResult.num_undefined`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from .bootstrap import BOOTSTRAP_OVER, Interval, bootstrap_lds
from .retrain import RetrainJob

__all__ = [
    "Subsets", "LDSResult", "generate_subsets", "predicted_changes", "spearman", "lds", "oracle_lds",
    "score_matrix_for", "lds_jobs", "lds_targets",
]


# ---------------------------------------------------------------------------------------------------- subsets
@dataclass(frozen=True)
class Subsets:
    """M random subsets of a training set, as a boolean ``kept`` mask ``[M, N]`` over ``train_ids``.

    ``train_ids`` is in the order of the dataset the subsets were drawn from; masks index that order.
    """

    train_ids: np.ndarray
    kept: np.ndarray
    fraction: float
    seed: int

    def __post_init__(self) -> None:
        if self.kept.ndim != 2 or self.kept.shape[1] != self.train_ids.shape[0]:
            raise ValueError(f"kept mask has shape {self.kept.shape}; expected [M, {self.train_ids.shape[0]}]")

    def __len__(self) -> int:
        return int(self.kept.shape[0])

    @property
    def removed(self) -> np.ndarray:
        return ~self.kept

    def kept_ids(self, m: int) -> np.ndarray:
        """Ids kept in subset ``m`` (dataset order)."""
        return self.train_ids[self.kept[m]]

    def removed_ids(self, m: int) -> np.ndarray:
        return self.train_ids[~self.kept[m]]

    def to_json(self) -> dict[str, Any]:
        return {"train_ids": self.train_ids.tolist(), "kept": self.kept.astype(int).tolist(),
                "fraction": self.fraction, "seed": self.seed}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Subsets":
        return cls(np.asarray(d["train_ids"], dtype=np.int64), np.asarray(d["kept"], dtype=bool),
                   float(d["fraction"]), int(d["seed"]))


def generate_subsets(train_ids: Sequence[int] | np.ndarray, num_subsets: int, fraction: float = 0.5,
                     seed: int = 0) -> Subsets:
    """M subsets, each keeping exactly ``round(fraction · N)`` examples drawn without replacement (seeded).

    The subsets depend only on ``(train_ids, num_subsets, fraction, seed)``; subset m does not depend on M
    (each has its own generator), so growing M later keeps the first subsets and their retrained models.
    """
    ids = _as_ids(train_ids)
    n = ids.shape[0]
    if not (0.0 < float(fraction) < 1.0):
        raise ValueError(f"fraction must lie strictly between 0 and 1 (the share of examples kept), got {fraction!r}")
    if int(num_subsets) < 2:
        raise ValueError(f"num_subsets must be at least 2 for a rank correlation, got {num_subsets!r}")
    k = int(round(float(fraction) * n))
    if not (0 < k < n):
        raise ValueError(f"fraction={fraction} of {n} examples keeps {k}; need at least one kept and one removed")
    kept = np.zeros((int(num_subsets), n), dtype=bool)
    for m in range(int(num_subsets)):
        rng = np.random.default_rng([int(seed), m])
        kept[m, rng.choice(n, size=k, replace=False)] = True
    return Subsets(ids, kept, float(fraction), int(seed))


# ---------------------------------------------------------------------------------------------------- predictions
def score_matrix_for(scores: Any, train_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The ``[Q, N]`` float64 score matrix with columns in the order of ``train_ids``.

    ``scores`` is an array already in that order, or any object with ``.matrix`` and ``.train_ids`` (such as
    ``influence.scores.Scores``); its columns are then reordered by id.
    """
    ids = _as_ids(train_ids)
    if hasattr(scores, "matrix"):
        mat = _to_numpy(scores.matrix)
        own = getattr(scores, "train_ids", None)
        if own is not None:
            own = _as_ids(own)
            pos = {int(i): p for p, i in enumerate(own.tolist())}
            missing = [int(i) for i in ids.tolist() if int(i) not in pos]
            if missing:
                raise KeyError(f"the scores have no column for {len(missing)} training id(s), e.g. {missing[:5]}")
            mat = mat[:, [pos[int(i)] for i in ids.tolist()]]
    else:
        mat = _to_numpy(scores)
    if mat.ndim != 2 or mat.shape[1] != ids.shape[0]:
        raise ValueError(f"score matrix has shape {mat.shape}; expected [num_queries, {ids.shape[0]}]")
    return mat


def predicted_changes(scores: Any, subsets: Subsets) -> np.ndarray:
    """``[Q, M]``: the predicted change of each query's measurement when subset m's removed examples go.

    ``(1/N) Σ_{j removed from m} s[q, j]`` — positive when the removed examples are, on balance, proponents.
    """
    s = score_matrix_for(scores, subsets.train_ids)
    return s @ subsets.removed.T.astype(np.float64) / subsets.train_ids.shape[0]


# ---------------------------------------------------------------------------------------------------- Spearman
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of the same length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("spearman got NaN or infinite values (a failed measurement or score)")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (b.size + 1) / 2
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


@dataclass
class LDSResult:
    """Per-query Spearman correlations and their summary (mean ± standard error over queries).

    ``interval`` (when :func:`lds` was asked for ``bootstrap=B`` resamples) is the two-way bootstrap interval over
    queries and subsets (:mod:`.bootstrap`); its ``sem`` is the honest standard error of ``mean``.
    """

    per_query: np.ndarray
    query_ids: np.ndarray
    num_undefined: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    interval: Interval | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_query))

    @property
    def sem(self) -> float:
        q = self.per_query.shape[0]
        return float(np.std(self.per_query, ddof=1) / np.sqrt(q)) if q > 1 else float("nan")

    def __str__(self) -> str:
        out = f"{100 * self.mean:.1f} ± {100 * self.sem:.1f}"
        if self.interval is not None:
            out += f" (two-way bootstrap ± {100 * self.interval.sem:.1f}, " \
                   f"{100 * self.interval.level:g}% [{100 * self.interval.low:.1f}, {100 * self.interval.high:.1f}])"
        return out


def _per_query_spearman(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int]:
    rho = np.array([spearman(p, t) for p, t in zip(pred, target)])
    undefined = int(np.isnan(rho).sum())
    return np.nan_to_num(rho, nan=0.0), undefined


def _targets_qm(targets: np.ndarray, num_queries: int, num_subsets: int) -> np.ndarray:
    t = _to_numpy(targets)
    if t.ndim == 2:
        t = t[:, :, None]
    if t.ndim != 3 or t.shape[:2] != (num_queries, num_subsets):
        raise ValueError(f"targets have shape {t.shape}; expected [num_queries={num_queries}, "
                         f"num_subsets={num_subsets}] or [..., num_seeds]")
    return t


def lds(scores: Any, subsets: Subsets, targets: np.ndarray, query_ids: Sequence[int] | None = None, *,
        bootstrap: int = 0, bootstrap_seed: int = 0, bootstrap_over: Sequence[str] = BOOTSTRAP_OVER) -> LDSResult:
    """LDS of an attribution.

    Parameters
    ----------
    scores:
        ``[Q, N]`` scores (array in ``subsets.train_ids`` order, or a ``Scores``-like object with ids).
    subsets:
        The retrained subsets (:func:`generate_subsets`).
    targets:
        Measured values ``[Q, M, K]`` (K seeds, averaged here) or ``[Q, M]`` (already averaged).
    query_ids:
        Ids of the queries (defaults to ``scores.query_ids`` or ``0..Q-1``); must match the targets' rows.
    bootstrap:
        Number of bootstrap resamples (0: none) for :attr:`LDSResult.interval`, resampling ``bootstrap_over``
        (default: queries and subsets, :mod:`.bootstrap`).
    """
    pred = predicted_changes(scores, subsets)
    t = _targets_qm(targets, pred.shape[0], len(subsets)).mean(2)
    rho, undefined = _per_query_spearman(pred, t)
    qids = _query_ids(scores, query_ids, pred.shape[0])
    interval = None
    if bootstrap:
        interval = bootstrap_lds(pred, t, num_resamples=int(bootstrap), seed=bootstrap_seed, over=bootstrap_over)
    return LDSResult(rho, qids, undefined, interval=interval)


def oracle_lds(targets: np.ndarray, query_ids: Sequence[int] | None = None) -> LDSResult:
    """The exact-retraining oracle: Spearman of one seed's measurement against the mean of the other seeds.

    ``targets`` is ``[Q, M, K]`` with K ≥ 2. For each query the K leave-one-seed-out correlations are averaged.
    """
    t = _to_numpy(targets)
    if t.ndim != 3 or t.shape[2] < 2:
        raise ValueError(f"the oracle needs targets [Q, M, K] with K >= 2 seeds, got shape {t.shape}")
    q, _, k = t.shape
    rhos = np.zeros((q, k))
    undefined = 0
    for s in range(k):
        rest = np.delete(t, s, axis=2).mean(2)
        rhos[:, s], u = _per_query_spearman(t[:, :, s], rest)
        undefined += u
    qids = _as_ids(query_ids) if query_ids is not None else np.arange(q, dtype=np.int64)
    return LDSResult(rhos.mean(1), qids, undefined, meta={"per_seed": rhos})


# ---------------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_ids(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _query_ids(scores: Any, query_ids: Any, q: int) -> np.ndarray:
    if query_ids is not None:
        out = _as_ids(query_ids)
    elif getattr(scores, "query_ids", None) is not None:
        out = _as_ids(scores.query_ids)
    else:
        out = np.arange(q, dtype=np.int64)
    if out.shape[0] != q:
        raise ValueError(f"got {out.shape[0]} query ids for {q} score rows")
    return out


# ---------------------------------------------------------------------------------------------------- retraining
def lds_jobs(subsets: Subsets, seeds: Sequence[int]) -> list:
    """The M × K retraining jobs of an LDS run, subset-major (``jobs[m * K + k]``).

    Seed k is shared by every subset, so models of different subsets differ by their data and not by their
    initialisation or noise draws (common random numbers in training, too).
    """
    seeds = [int(s) for s in seeds]
    return [RetrainJob(tuple(subsets.kept_ids(m).tolist()), s, tag=f"lds/m{m:03d}/seed{s}")
            for m in range(len(subsets)) for s in seeds]


def lds_targets(cache: Any, subsets: Subsets, seeds: Sequence[int], query_images: Any, query_ids: Sequence[int],
                *, measurement: str = "loss", num_draws: int = 256, seed: int = 0, num_workers: int = 1,
                device: Any = None, progress: bool = True) -> np.ndarray:
    """Retrain every (subset, seed) job (resumable) and measure the queries: ``targets [Q, M, K]``."""
    if cache.dataset_fingerprint and not np.array_equal(np.sort(_as_ids(cache.dataset.ids)),
                                                        np.sort(subsets.train_ids)):
        raise ValueError("the subsets were drawn from a different training set than the retraining cache's")
    jobs = lds_jobs(subsets, seeds)
    cache.run(jobs, num_workers=num_workers, device=device, progress=progress)
    vals = cache.measure(jobs, query_images, query_ids, measurement=measurement, num_draws=num_draws, seed=seed,
                         num_workers=num_workers, device=device)  # [M*K, Q]
    m, k = len(subsets), len(list(seeds))
    return vals.reshape(m, k, -1).transpose(2, 0, 1)
