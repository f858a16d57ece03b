"""Two-way bootstrap (queries × subsets) of LDS and paired differences: agreement with lds(), coverage of a known
effect in a synthetic population, and wider than the queries-only interval when subsets move all queries."""
from __future__ import annotations

import numpy as np
import pytest

from diffinfluence_widgets.evaluation import generate_subsets, lds, oracle_lds
from diffinfluence_widgets.evaluation.bootstrap import (bootstrap_difference, bootstrap_lds, oracle_per_query,
                                                        rowwise_spearman, spearman_per_query)
from diffinfluence_widgets.evaluation.lds import spearman


def _experiment(rng, q=16, m=10, k=2):
    """Targets share a subset effect u_m across all queries (the same retrained models serve every query); method A
    sees u_m with less subset-level error than method B, so A's LDS is higher by a fixed population amount."""
    u = rng.normal(size=m)
    targets = u[None, :, None] + 0.7 * rng.normal(size=(q, m, k))
    err_a, err_b = rng.normal(size=m), rng.normal(size=m)  # subset-level errors: shared by every query
    pred_a = u[None] + 0.6 * err_a[None] + 0.5 * rng.normal(size=(q, m))
    pred_b = u[None] + 1.2 * err_b[None] + 0.5 * rng.normal(size=(q, m))
    return pred_a, pred_b, targets


def _population_difference(reps=4000):
    rng = np.random.default_rng(123)
    d = []
    for _ in range(reps):
        a, b, t = _experiment(rng, q=4)
        tq = t.mean(2)
        d.append((rowwise_spearman(a, tq) - rowwise_spearman(b, tq)).mean())
    return float(np.mean(d))


def test_rowwise_spearman_matches_scalar_and_counts_constant_rows_as_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    a[1, :3] = a[1, 0]  # ties
    b[4] = 1.0  # constant row
    got = rowwise_spearman(a, b)
    want = [spearman(x, y) for x, y in zip(a, b)]
    assert np.allclose(got[:4], want[:4], atol=1e-12) and got[4] == 0.0


def test_estimates_equal_lds_and_oracle():
    rng = np.random.default_rng(1)
    ids = np.arange(30)
    subsets = generate_subsets(ids, 8, seed=0)
    scores = rng.normal(size=(6, 30))
    targets = rng.normal(size=(6, 8, 3))
    r = lds(scores, subsets, targets, bootstrap=200)
    assert r.interval.estimate == pytest.approx(r.mean, abs=1e-12)
    assert r.interval.low <= r.mean <= r.interval.high and "two-way bootstrap" in str(r)
    orc = oracle_lds(targets)
    assert oracle_per_query(targets)(np.arange(8)) == pytest.approx(orc.per_query, abs=1e-12)
    pred = scores @ subsets.removed.T / 30
    d = bootstrap_difference(None, pred, targets, num_resamples=50)
    assert d.estimate == pytest.approx(orc.mean - r.mean, abs=1e-12)


def test_two_way_interval_covers_a_known_effect_and_is_wider_than_queries_only():
    truth = _population_difference()
    assert truth > 0.05  # the synthetic effect is real
    rng = np.random.default_rng(7)
    cover2 = cover1 = 0
    widths2, widths1 = [], []
    trials = 60
    for i in range(trials):
        a, b, t = _experiment(rng)
        two = bootstrap_difference(a, b, t, num_resamples=300, seed=i)
        one = bootstrap_difference(a, b, t, num_resamples=300, seed=i, over=("queries",))
        cover2 += two.low <= truth <= two.high
        cover1 += one.low <= truth <= one.high
        widths2.append(two.width)
        widths1.append(one.width)
    assert cover2 / trials >= 0.85  # nominal 95%; a queries-only interval misses the shared subset noise
    assert cover1 / trials < 0.6
    assert np.mean(widths2) > 1.5 * np.mean(widths1) and np.mean(np.array(widths2) > widths1) > 0.9
    # the LDS interval of one method behaves the same way
    a, _, t = _experiment(np.random.default_rng(99))
    assert bootstrap_lds(a, t, num_resamples=300).width > bootstrap_lds(a, t, num_resamples=300,
                                                                       over=("queries",)).width


def test_bad_arguments_are_refused():
    t = np.zeros((3, 4, 2))
    with pytest.raises(ValueError, match="over must name"):
        bootstrap_lds(np.zeros((3, 4)), t, over=("seeds",))
    with pytest.raises(ValueError, match="prediction .* and target"):
        spearman_per_query(np.zeros((3, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="K >= 2"):
        oracle_per_query(np.zeros((3, 4, 1)))
    with pytest.raises(ValueError, match="num_resamples"):
        bootstrap_lds(np.zeros((3, 4)), t, num_resamples=1)
