"""Refined answers (issue 9): the explorer's second answer is the method's exact top-k.

Reference everywhere: :func:`compute_scores` with full training gradients and the store's draws, in float64.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

DAMPINGS = (1e-8, 1e-4, 1.0)  # across the slider: the paper default, the eigenvalue scale, far above it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fresh tiny UNet (with an attention block) on 24 digits, its EK-FAC curvature and a float64 backend."""
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.index import IndexBackend
    from diffinfluence_widgets.influence.curvature import fit_curvature

    train = load_digits(size=8, split="train", limit=24)
    held = load_digits(size=8, split="heldout", limit=2)
    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0)
    assert any("attn" in n or "attention" in n for n, _ in model.unet.named_modules())
    curv = fit_curvature(model, train, num_draws=4, progress=False)
    b = IndexBackend.build(model, train, held, curv, tmp_path_factory.mktemp("refine"), k=64, k_b=8, k_a=8,
                           num_draws=4, query_num_draws=4, num_generated=0, shard_size=10, progress=False,
                           methods=("ekfac", "kfac"), measurements=["loss", "elbo_simplified"],
                           query_dtype=torch.float64, exact_dtype="float64")
    return model, train, held, curv, b


def _kfac_curvature(curv):
    """The same eigenbasis with K-FAC eigenvalues λ_B λ_Aᵀ (what method "kfac" means)."""
    ev = {n: torch.outer(curv.lambda_b[n], curv.lambda_a[n]) for n in curv.layer_names}
    return dataclasses.replace(curv, eigenvalues=ev)


def _reference(model, curv, held, train, b, qpos, measurement, method):
    from diffinfluence_widgets.influence.scores import compute_scores

    c = curv if method == "ekfac" else _kfac_curvature(curv)
    return compute_scores(model, c, held.images[qpos:qpos + 1], held.ids[qpos:qpos + 1], train,
                          measurement=measurement, damping=list(DAMPINGS), num_draws=b.query_num_draws,
                          train_num_draws=b.num_draws, seed=b.draw_seed, bands=b.bands, dtype=torch.float64,
                          progress=False)


def _check(r, ref_row, train_ids, k):
    order = np.lexsort((np.arange(len(ref_row)), -ref_row))
    rev = np.lexsort((np.arange(len(ref_row)), ref_row))
    assert r.exact and r.exact_over == "all"
    assert list(r.proponent_ids) == list(train_ids[order[:k]])
    assert list(r.opponent_ids) == list(train_ids[rev[:k]])
    scale = np.abs(ref_row).max()
    np.testing.assert_allclose(r.proponent_scores, ref_row[order[:k]], rtol=1e-5, atol=1e-9 * scale)
    np.testing.assert_allclose(r.opponent_scores, ref_row[rev[:k]], rtol=1e-5, atol=1e-9 * scale)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
@pytest.mark.parametrize("measurement", ["loss", "elbo_simplified"])
def test_refined_answer_equals_exact_full_gradient_scores(setup, method, measurement, monkeypatch):
    import diffinfluence_widgets.influence.gradients as grads

    model, train, held, curv, b = setup
    ref = _reference(model, curv, held, train, b, 0, measurement, method)
    p = b.prepare(int(held.ids[0]), measurement, method)
    band_p = b.prepare(int(held.ids[0]), measurement, method, band=b.bands[1])
    calls = []
    real = grads.per_example_gradients
    monkeypatch.setattr(grads, "per_example_gradients", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k = 5
    for i, lam in enumerate(DAMPINGS):  # the first λ streams the store, the others use the damping profile
        r = b.refine(p, lam, k)
        _check(r, ref[i].matrix[0].numpy(), b.train_ids, k)
        assert r.stats["streamed"] == (i == 0)
        rb = b.refine(band_p, lam, k)  # a timestep band: its own query part
        _check(rb, ref[i].band_matrix[1, 0].numpy(), b.train_ids, k)
    assert calls == [], "a damping change after refinement computed training gradients"
    # the instant answer (here the damping profile's estimate) is marked approximate
    r = b.search(p, 1e-8, k)
    assert not r.exact and r.stats["route"] == "profile"


def test_refine_rejects_bad_damping(setup):
    *_, held, _, b = setup
    p = b.prepare(int(held.ids[1]), "loss", "ekfac")
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            b.refine(p, bad, 3)


def test_pool_refinement_without_exact_store_computes_no_gradient_on_damping_change(setup, tmp_path, monkeypatch):
    """Datasets too large for the exact store: exact scores over a pool of FAISS candidates of every decade."""
    import diffinfluence_widgets.influence.gradients as grads
    from diffinfluence_widgets.index import IndexBackend
    from diffinfluence_widgets.influence import buffers

    model, train, held, curv, _ = setup
    b = IndexBackend.build(model, train, held, curv, tmp_path, k=64, k_b=8, k_a=8, num_draws=4,
                           query_num_draws=4, num_generated=0, shard_size=10, progress=False, methods=("ekfac",),
                           measurements=["loss"], query_dtype=torch.float64, exact_store=False)
    assert b.exact_store is None
    ref = _reference(model, curv, held, train, b, 1, "loss", "ekfac")
    p = b.prepare(int(held.ids[1]), "loss", "ekfac")
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)  # recycled gradient memory even for the tiny model's batches
    r0 = b.refine(p, DAMPINGS[0], 3)
    assert r0.exact_over == "candidates"
    assert buffers.free_bytes() == 0  # a serving backend keeps no idle gradient memory after a request
    pool_ids = p.payload.exact_state[0]
    calls = []
    real = grads.per_example_gradients
    monkeypatch.setattr(grads, "per_example_gradients", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pos = np.array([int(np.flatnonzero(b.train_ids == i)[0]) for i in pool_ids])
    for i, lam in enumerate(DAMPINGS):
        r = b.refine(p, lam, 3)
        row = ref[i].matrix[0].numpy()[pos]
        order = np.lexsort((pool_ids, -row))[:3]
        assert list(r.proponent_ids) == list(pool_ids[order])
        np.testing.assert_allclose(r.proponent_scores, row[order], rtol=1e-5, atol=1e-9 * np.abs(row).max())
    assert calls == []


def test_exact_store_refuses_other_model_curvature_and_resumes(setup, tmp_path):
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.store.exact import (ExactStore, ExactStoreCorruptError, ExactStoreMismatchError,
                                                   build_exact_store)

    model, train, held, curv, b = setup
    st = b.exact_store
    other = DiffusionModel.from_config(tiny_unet_config(8), seed=1)
    with pytest.raises(ExactStoreMismatchError, match="model_fingerprint"):
        ExactStore.open(st.path, model=other)
    with pytest.raises(ExactStoreMismatchError, match="curvature_basis"):
        ExactStore.open(st.path, curvature=_rotated_basis(curv))
    with pytest.raises(ExactStoreMismatchError, match="dtype"):
        build_exact_store(st.path, model, train, curv, num_draws=4, seed=0, dtype="float32", progress=False)
    # a build interrupted after some shards resumes to the same bytes
    path = tmp_path / "ex"
    full = build_exact_store(path, model, train, curv, num_draws=4, seed=0, dtype="float64", shard_size=10,
                             progress=False)
    want = full.read(0, len(full))
    (path / "shards" / "shard-00001.npy").unlink()
    (path / "manifest.json").write_text((path / "manifest.json").read_text().replace('"complete": true',
                                                                                      '"complete": false'))
    with pytest.raises(Exception, match="incomplete"):
        ExactStore.open(path)
    again = build_exact_store(path, model, train, curv, num_draws=4, seed=0, dtype="float64", shard_size=10,
                              progress=False)
    np.testing.assert_array_equal(again.read(0, len(again)), want)
    with open(path / "shards" / "shard-00002.npy", "r+b") as f:  # truncate a shard
        f.truncate(1000)
    with pytest.raises(ExactStoreCorruptError, match="shard-00002"):
        ExactStore.open(path)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_streamed_profile_equals_direct_sums_and_bounds_hold(setup, method):
    """The one-pass damping profile (chunked reads, column blocks, sparse bin sums) equals the sums written out, in
    float64, for any block / chunk split; its bound contains every exact score at every λ."""
    from diffinfluence_widgets.index.refine import ExactScorer, flat_eigenvalues

    _, _, _, curv, b = setup
    st = b.exact_store
    R = st.read(0, len(st))  # [N, P] float64
    chunks = [(lo, blk.copy()) for lo, blk in st.chunks(3 * st.bytes_per_example + 1)]
    assert [lo for lo, _ in chunks] == list(range(0, len(st), 3))
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), R)
    np.testing.assert_array_equal(st.rows([5, 0, 5]), R[[5, 0, 5]])
    with pytest.raises(IndexError, match="outside"):
        st.rows([len(st)])
    lam = flat_eigenvalues(curv, method)
    u = torch.randn(st.num_parameters, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for block, chunk in ((997, 5 * st.bytes_per_example), (st.num_parameters, 1 << 30)):
        sc = ExactScorer(st, curv, eigenvalues=method, num_bins=48, block=block, chunk_bytes=chunk)
        q = sc.query(u)
        sc.profile(q)
        onehot = np.zeros((st.num_parameters, sc.num_bins))
        onehot[np.arange(st.num_parameters), sc._bin] = 1.0
        Y = R * u.numpy()
        for got, want in ((q.profile_p, Y @ onehot), (q.profile_1, (Y * sc._dev) @ onehot),
                          (q.profile_a, np.abs(Y) @ onehot)):
            np.testing.assert_allclose(got.T, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
        for damping in DAMPINGS + (1e-12, 1e3):
            exact = R @ (u.numpy() / (lam + damping))
            np.testing.assert_allclose(sc.scores(q, damping), exact, rtol=1e-12, atol=1e-13 * np.abs(exact).max())
            est, err = sc.bounds(q, damping)
            assert np.all(np.abs(est - exact) <= err), f"bound violated at λ = {damping}"
    maps = Path("/proc/self/maps")
    if maps.exists():  # the passes read the store; none of its files stays mapped into the process
        assert str(st.path) not in maps.read_text()


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_instant_answers_stay_within_their_error_bounds(setup, method, monkeypatch):
    """The instant answer of a new query is the 8-bit scan of every training image (its best candidates rescored
    exactly), after the first refinement the damping profile's estimate; each score is within its rigorous bound of
    the exact one, every listed image's exact score is within twice the bound of the exact k-th, a route given back
    reproduces the answer bit for bit, and no instant answer computes a training gradient."""
    import diffinfluence_widgets.influence.gradients as grads
    from diffinfluence_widgets.index.refine import flat_eigenvalues

    _, _, held, curv, b = setup
    R = b.exact_store.read(0, len(b.exact_store))
    lam_vec = flat_eigenvalues(curv, method)
    k = 5
    p = b.prepare(int(held.ids[1]), "elbo_simplified", method, band=b.bands[2])  # a fresh query: no profile
    u = torch.cat([p.payload.exact_rot[n].reshape(-1) for n in b.layer_names]).numpy()
    calls = []
    real = grads.per_example_gradients
    monkeypatch.setattr(grads, "per_example_gradients", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def within(r, exact, bound):
        pos = b.exact_store.positions
        for ids, scores, sign in ((r.proponent_ids, r.proponent_scores, 1), (r.opponent_ids, r.opponent_scores, -1)):
            assert np.all(np.abs(scores - exact[pos(ids)]) <= bound)
            kth = np.sort(sign * exact)[::-1][k - 1]
            assert np.all(sign * exact[pos(ids)] >= kth - 2 * bound)

    first = {}
    for lam in DAMPINGS:
        w = u / (lam_vec + lam)
        exact = R @ w
        r = b.search(p, lam, k)
        assert r.stats["route"] == "int8" and not r.exact
        terms = np.abs(w * b.quantised.scales) @ np.abs(b.quantised.dequantised().T / b.quantised.scales[:, None])
        bound = b.quantised.error_bound(w) + 1e-5 * terms.max()  # byte rounding + float32 products
        within(r, exact, bound)
        tol = 1e-9 * np.abs(exact).max()  # the scan's candidates are rescored from their exact rows
        pos = b.exact_store.positions
        np.testing.assert_allclose(r.proponent_scores, exact[pos(r.proponent_ids)], rtol=1e-9, atol=tol)
        np.testing.assert_allclose(r.opponent_scores, exact[pos(r.opponent_ids)], rtol=1e-9, atol=tol)
        assert list(r.proponent_scores) == sorted(r.proponent_scores, reverse=True)
        first[lam] = r
    assert calls == []
    b.refine(p, DAMPINGS[0], k)  # the query's first refinement: its damping profile now exists
    sc = b._exact[method]
    for lam in DAMPINGS:
        r = b.search(p, lam, k)
        assert r.stats["route"] == "profile"
        _, err = sc.bounds(p.payload.exact_state, lam)
        within(r, R @ (u / (lam_vec + lam)), err.max())
        again = b.search(p, lam, k, "int8")  # the route given back: the same answer as before the profile
        assert list(again.proponent_ids) == list(first[lam].proponent_ids)
        assert list(again.opponent_scores) == list(first[lam].opponent_scores)
        assert b.search(p, lam, k, "faiss").stats["route"] == "faiss"
    assert calls == [], "an instant answer computed training gradients"
    with pytest.raises(ValueError, match="route"):
        b.search(p, 1e-3, k, "exact")


def test_quantised_copy_round_trips_and_is_refused_for_another_store(setup, tmp_path):
    """Every byte code is within half a step of its float64 entry; a copy made from another exact store is refused
    (and made again by the build); a truncated or unfinished one is never used."""
    from diffinfluence_widgets.store.exact import ExactStoreCorruptError, ExactStoreMismatchError, build_exact_store
    from diffinfluence_widgets.store.quantised import QuantisedStore, build_quantised_store

    model, train, _, curv, b = setup
    qs, st = b.quantised, b.exact_store
    R = st.read(0, len(st))
    deq = qs.dequantised()
    assert deq.shape == R.shape and qs.bytes_per_example == st.num_parameters
    assert np.all(np.abs(deq - R) <= 0.5 * qs.scales * (1 + 1e-6) + 2.0 ** -23 * np.abs(deq))  # + float32 rounding
    assert np.allclose(np.abs(R).max(0), 127 * qs.scales, rtol=1e-6)  # the scale of a column is its largest entry
    np.testing.assert_array_equal(qs.dequantised(3, 7), deq[3:7])
    w = np.random.default_rng(0).standard_normal(st.num_parameters)
    np.testing.assert_allclose(qs.scan(w), deq.astype(np.float64) @ w, rtol=1e-4,
                               atol=1e-5 * np.abs(deq * w).sum(1).max())
    other = build_exact_store(tmp_path / "other", model, train, curv, num_draws=4, seed=1, dtype="float64",
                              progress=False)
    with pytest.raises(ExactStoreMismatchError, match="another exact store"):
        QuantisedStore.open(qs.path, other)
    copy = build_quantised_store(st, tmp_path / "copy")
    assert (copy.path / "codes.npy").read_bytes() == (qs.path / "codes.npy").read_bytes()
    with pytest.warns(RuntimeWarning, match="another exact store"):
        remade = build_quantised_store(other, tmp_path / "copy")  # made again for the store it is asked for
    assert not np.array_equal(remade.dequantised(), deq)
    with open(tmp_path / "copy" / "codes.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ExactStoreCorruptError, match="codes"):
        QuantisedStore.open(tmp_path / "copy", other)
    (tmp_path / "copy" / "manifest.json").unlink()  # as after an interrupted build
    with pytest.raises(Exception, match="manifest.json missing"):
        QuantisedStore.open(tmp_path / "copy")
    np.testing.assert_array_equal(build_quantised_store(other, tmp_path / "copy").dequantised(), remade_bytes(other))


def remade_bytes(exact):
    """The dequantised rows the 8-bit copy of ``exact`` must hold, written out: round(r / s) · s, s = max|r| / 127."""
    R = exact.read(0, len(exact))
    s = np.where(np.abs(R).max(0) > 0, np.abs(R).max(0) / 127, 1.0).astype(np.float32)
    return (np.clip(np.rint(R / s.astype(np.float64)), -127, 127).astype(np.int8).astype(np.float32) * s)


def _rotated_basis(curv):
    n = curv.layer_names[0]
    q = curv.q_a[n].clone()
    q[:, [0, 1]] = q[:, [1, 0]]
    return dataclasses.replace(curv, q_a={**curv.q_a, n: q})


# ------------------------------------------------------------------------------------------------ the session
def test_session_shows_the_approximate_answer_then_the_exact_one(setup):
    from diffinfluence_widgets.session import AttributionSession

    *_, held, _, b = setup
    s = AttributionSession(b, threaded=False, full_scores=False, method="ekfac", query_id=int(held.ids[0]), k=4)
    seen = []
    s.observe(lambda ch: seen.append(ch["new"]), "result")
    s.damping = 1e-4
    assert [r.exact for r in seen] == [False, True]
    raw, fine = seen
    assert raw.badge == "approximate (est. recall %.2f)" % raw.est_recall or raw.est_recall is None
    assert fine.badge == "exact ✓" and fine.exact_over == "all"
    ref = b.refine(b.prepare(int(held.ids[0]), "loss", "ekfac"), 1e-4, 4)
    assert [i.id for i in fine.proponents] == list(ref.proponent_ids)
    assert [i.score for i in fine.opponents] == list(ref.opponent_scores)
    assert fine.request_id > raw.request_id == seen[0].request_id and s.request_id == fine.request_id
    # after one refinement the approximate answers carry an estimated recall (overlap seen so far)
    s.damping = 1e-6
    assert seen[-2].est_recall is not None and 0.0 <= seen[-2].est_recall <= 1.0
    assert seen[-2].badge.startswith("approximate (est. recall ")
    # the explorer's check: the shown (exact) top-k equals the exact one
    rep = s.check_exact()
    assert rep["proponents"]["identical"] and rep["opponents"]["overlap"] == 4 and s.check == rep


def test_check_reports_the_overlap_of_an_approximate_answer(setup):
    from diffinfluence_widgets.session import AttributionSession

    *_, held, _, b = setup
    s = AttributionSession(b, threaded=False, full_scores=False, method="kfac", query_id=int(held.ids[1]), k=6,
                           refine=False, damping=1e-8)
    r = s.result
    assert not r.exact
    rep = s.check_exact()
    ex = b.refine(b.prepare(int(held.ids[1]), "loss", "kfac"), 1e-8, 6)
    for side, ids in (("proponents", ex.proponent_ids), ("opponents", ex.opponent_ids)):
        shown = [i.id for i in getattr(r, side)]
        assert rep[side]["overlap"] == len(set(shown) & set(map(int, ids)))
        assert rep[side]["missing"] == [int(i) for i in ids if int(i) not in shown]


def test_session_never_shows_a_refined_answer_for_stale_settings(setup):
    import threading
    import time

    from diffinfluence_widgets.session import AttributionSession

    *_, held, _, b = setup
    gate = threading.Event()

    class SlowRefine:  # the real backend, with a refine that waits until the test lets it finish
        def __getattr__(self, name):
            return getattr(b, name)

        def refine(self, prepared, damping, k):
            gate.wait(10)
            return b.refine(prepared, damping, k)

    s = AttributionSession(SlowRefine(), threaded=True, full_scores=False, method="ekfac",
                           query_id=int(held.ids[0]), k=3, damping=1e-2)
    seen = []
    s.observe(lambda ch: seen.append(ch["new"]), "result")
    t0 = time.time()
    while not s.refining and time.time() - t0 < 30:  # the first refinement is under way (held at the gate)
        time.sleep(0.01)
    s.damping = 1e-6  # the user moves on while the λ = 1e-2 answer is being refined
    gate.set()
    s.wait(60)
    shown_after = [r for r in seen if r.finished_at >= 0]
    assert all(not (r.exact and r.damping == 1e-2) for r in shown_after), "a stale refined answer was shown"
    assert s.result.exact and s.result.damping == 1e-6
    assert s.stats["refine_stale"] >= 1
    s.close()


def test_tiny_demo_refined_answers_are_exact(tmp_path, monkeypatch):
    """The trained tiny demo (its model, curvature, draws): refined = exact full-gradient scores."""
    import diffinfluence_widgets.influence.gradients as grads
    from diffinfluence_widgets.demo import build_demo, demo_config
    from diffinfluence_widgets.index import IndexBackend

    art = build_demo("tiny", tmp_path / "tiny", threads=1, progress=False, until="curvature")
    cfg = demo_config("tiny")
    model, train, held, curv = art.model, art.train, art.heldout, art.curvature
    b = IndexBackend.build(model, train, held, curv, tmp_path / "index", k=cfg.k, num_draws=cfg.store_draws,
                           query_num_draws=cfg.query_draws, num_generated=0, progress=False,
                           methods=("ekfac", "kfac"), measurements=["loss", "elbo_simplified"],
                           query_dtype=torch.float64, exact_dtype="float64")
    k = 10
    for measurement, method, qpos in (("loss", "ekfac", 0), ("elbo_simplified", "kfac", 1)):
        ref = _reference(model, curv, held, train, b, qpos, measurement, method)
        p = b.prepare(int(held.ids[qpos]), measurement, method)
        pb = b.prepare(int(held.ids[qpos]), measurement, method, band=b.bands[0])
        b.refine(p, 3e-3, k)  # the query's first refinement (one pass over the exact store)
        b.refine(pb, 3e-3, k)
        calls = []
        real = grads.per_example_gradients
        monkeypatch.setattr(grads, "per_example_gradients", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        for i, lam in enumerate(DAMPINGS):
            r = b.refine(p, lam, k)
            assert not r.stats["streamed"] and r.stats["candidates"] < len(b.train_ids)
            _check(r, ref[i].matrix[0].numpy(), b.train_ids, k)
            _check(b.refine(pb, lam, k), ref[i].band_matrix[0, 0].numpy(), b.train_ids, k)
        assert calls == []
        monkeypatch.setattr(grads, "per_example_gradients", real)
