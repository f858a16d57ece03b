"""Retraining without the top influences (``method.md`` §7, last bullet).

For each query and fraction f (paper: 2% and 10%), remove the ``round(f · N)`` training examples with the
**highest** scores — the strongest proponents under the sign convention (removing them is predicted to increase
the query's loss most) — retrain with the same recipe, and measure the query's loss. The reported number is the
**increase of the query's loss** over the full-data model trained with the same seed (same (t, ε) draws for every
model, so the difference is not swamped by Monte-Carlo noise), averaged over seeds, then mean ± standard error
over queries. A better attribution gives a larger increase.

The control removes a random ``round(f · N)`` examples: ``num_random_sets`` random sets per fraction, shared by
all queries (they do not depend on the query), so a query's random-removal increase is the average over those
sets and seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .lds import _as_ids, score_matrix_for
from .retrain import RetrainCache, RetrainJob

__all__ = ["CounterfactualResult", "top_removal_ids", "retrain_without_top"]


def top_removal_ids(scores_row: np.ndarray, train_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Ids of the ``round(fraction · N)`` highest-scoring training examples (ties broken by position)."""
    n = train_ids.shape[0]
    k = int(round(float(fraction) * n))
    if not (0 < k < n):
        raise ValueError(f"fraction={fraction} of {n} training examples removes {k}; need 0 < k < N")
    order = np.argsort(-np.asarray(scores_row, dtype=np.float64), kind="stable")
    return train_ids[order[:k]]


@dataclass
class CounterfactualResult:
    """Loss increases ``[Q]`` per (method, fraction); method ``"random"`` is the control."""

    query_ids: np.ndarray
    fractions: tuple[float, ...]
    base_loss: np.ndarray  # [Q] mean over seeds of the full-data models' loss
    increase: dict[tuple[str, float], np.ndarray]  # (method, fraction) -> [Q]
    removed: dict[tuple[str, float], list[np.ndarray]] = field(default_factory=dict)  # ids removed per query

    def summary(self) -> list[dict[str, Any]]:
        """One row per (method, fraction): mean and standard error over queries."""
        rows = []
        for (method, f), inc in self.increase.items():
            sem = float(np.std(inc, ddof=1) / np.sqrt(inc.size)) if inc.size > 1 else float("nan")
            rows.append({"method": method, "fraction": f, "mean_increase": float(inc.mean()), "sem": sem,
                         "num_queries": int(inc.size)})
        return rows


def retrain_without_top(cache: RetrainCache, scores: dict[str, Any], query_images: Any, query_ids: Sequence[int],
                        *, fractions: Sequence[float] = (0.02, 0.10), seeds: Sequence[int] = (0,),
                        num_random_sets: int = 1, random_seed: int = 0, num_draws: int = 256,
                        measurement_seed: int = 0, num_workers: int = 1, device: Any = None,
                        progress: bool = True) -> CounterfactualResult:
    """Retrain without each method's top-f proponents of each query, and without random sets, and measure.

    Parameters
    ----------
    scores:
        ``{method name: [Q, N] scores}`` (arrays in the cache dataset's id order, or ``Scores``-like objects),
        rows in the order of ``query_ids``.
    seeds:
        Training seeds; every removal is retrained with each, and compared with the full-data model of that seed.
    """
    train_ids = _as_ids(cache.dataset.ids)
    qids = _as_ids(query_ids)
    fractions = tuple(float(f) for f in fractions)
    seeds = [int(s) for s in seeds]
    all_ids = tuple(train_ids.tolist())
    mats = {name: score_matrix_for(s, train_ids) for name, s in scores.items()}
    for name, mat in mats.items():
        if mat.shape[0] != qids.shape[0]:
            raise ValueError(f"scores {name!r} have {mat.shape[0]} rows for {qids.shape[0]} queries")
    if "random" in mats:
        raise ValueError("'random' is the name of the control; call the method something else")

    jobs: list[RetrainJob] = [RetrainJob(all_ids, s, tag=f"full/seed{s}") for s in seeds]
    plan: dict[tuple[str, float], list[tuple[int, list[int]]]] = {}  # (method, f) -> [(query pos, job indices)]
    removed: dict[tuple[str, float], list[np.ndarray]] = {}

    def add(removed_ids: np.ndarray, tag: str) -> list[int]:
        keep = tuple(np.setdiff1d(train_ids, removed_ids).tolist())
        out = []
        for s in seeds:
            out.append(len(jobs))
            jobs.append(RetrainJob(keep, s, tag=f"{tag}/seed{s}"))
        return out

    for f in fractions:
        for name, mat in mats.items():
            plan[(name, f)], removed[(name, f)] = [], []
            for qi in range(qids.shape[0]):
                rem = top_removal_ids(mat[qi], train_ids, f)
                removed[(name, f)].append(rem)
                plan[(name, f)].append((qi, add(rem, f"top/{name}/f{f:g}/q{int(qids[qi])}")))
        k = int(round(f * train_ids.shape[0]))
        rand_jobs = []
        removed[("random", f)] = []
        for r in range(int(num_random_sets)):
            rng = np.random.default_rng([int(random_seed), int(round(f * 1e6)), r])
            rem = train_ids[np.sort(rng.choice(train_ids.shape[0], size=k, replace=False))]
            removed[("random", f)].append(rem)
            rand_jobs += add(rem, f"random/f{f:g}/r{r}")
        plan[("random", f)] = [(qi, rand_jobs) for qi in range(qids.shape[0])]

    cache.run(jobs, num_workers=num_workers, device=device, progress=progress)
    vals = cache.measure(jobs, query_images, qids, measurement="loss", num_draws=num_draws, seed=measurement_seed,
                         num_workers=num_workers, device=device)  # [J, Q]
    base = vals[: len(seeds)]  # [K, Q], seed order
    seed_of = {j: seeds[(j - len(seeds)) % len(seeds)] for j in range(len(seeds), len(jobs))}
    increase = {}
    for key, entries in plan.items():
        inc = np.zeros(qids.shape[0])
        for qi, js in entries:
            inc[qi] = np.mean([vals[j, qi] - base[seeds.index(seed_of[j]), qi] for j in js])
        increase[key] = inc
    return CounterfactualResult(qids, fractions, base.mean(0), increase, removed)
