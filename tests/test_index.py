"""Projected-gradient store (atomic shards, resume after SIGKILL, refusal of corrupt / foreign stores), FAISS
search against brute force, and the λ-change query path against a from-scratch computation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinfluence_widgets.index import FeatureIndex
from diffinfluence_widgets.influence.preconditioners import KFACQuery
from diffinfluence_widgets.store import (ProjectedStore, StoreCorruptError, StoreError, StoreMismatchError, build_store,
                                         store_feature_fn)
from diffinfluence_widgets.influence import buffers
from diffinfluence_widgets.influence.projection import make_projector

torch.set_num_threads(1)
try:
    import faiss

    faiss.omp_set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

SETTINGS = {"model_fingerprint": "m0", "dataset_fingerprint": "d0", "measurement": "loss", "num_draws": 4,
            "draw_seed": 0, "projection": {"structure": "kronecker", "kind": "rademacher", "seed": 0, "k": 8},
            "dtype": "float32"}


def synthetic_features(ids: np.ndarray, dim: int = 8) -> np.ndarray:
    """Deterministic per-id features (what a gradient projection would give)."""
    return np.stack([np.random.default_rng(int(i)).standard_normal(dim).astype(np.float32) for i in ids])


def _compute(ids, calls=None):
    def compute(lo, hi):
        if calls is not None:
            calls.append((lo, hi))
        return {"features": torch.from_numpy(synthetic_features(ids[lo:hi]))}
    return compute


def test_store_round_trip_and_manifest(tmp_path):
    ids = np.arange(100, 137)
    store = build_store(tmp_path / "s", ids, _compute(ids), SETTINGS, shard_size=10, progress=False)
    assert store.arrays["features"].dtype == np.float32
    assert np.array_equal(store.ids, ids)
    assert np.array_equal(store.arrays["features"], synthetic_features(ids))
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["complete"] and man["num_shards"] == 4 and man["dtype"] == "float32"
    assert man["settings"]["model_fingerprint"] == "m0" and man["settings"]["projection"]["k"] == 8
    assert all(len(s["sha256"]) == 64 for s in man["shards"])
    assert store.bytes_per_example == 8 * 4 + 8
    assert list(store.positions([105, 100])) == [5, 0]
    # a second build is a no-op (every shard is skipped)
    calls = []
    build_store(tmp_path / "s", ids, _compute(ids, calls), SETTINGS, shard_size=10, progress=False)
    assert calls == []
    # nothing but the store's own files is left behind (no temporary files of the atomic writer: it names them
    # ".<name>.<random>.tmp", which an exact listing catches whatever the pattern)
    found = sorted(str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("*") if p.is_file())
    shards = [f"shards/shard-{s:05d}.{ext}" for s in range(4) for ext in ("json", "npz")]
    assert found == sorted(["ids.npy", "manifest.json", *shards])


def test_store_refuses_other_model_dataset_setting(tmp_path):
    ids = np.arange(20)
    build_store(tmp_path / "s", ids, _compute(ids), SETTINGS, shard_size=8, progress=False)

    class FP:
        def __init__(self, fp):
            self.fp = fp

        def fingerprint(self):
            return self.fp

    ProjectedStore.open(tmp_path / "s", model=FP("m0"), dataset=FP("d0"))
    with pytest.raises(StoreMismatchError, match=r"built for model m0.*given model is m1"):
        ProjectedStore.open(tmp_path / "s", model=FP("m1"))
    with pytest.raises(StoreMismatchError, match=r"dataset d0.*given dataset is d9"):
        ProjectedStore.open(tmp_path / "s", dataset=FP("d9"))
    with pytest.raises(StoreMismatchError, match=r"num_draws=4, expected 64"):
        ProjectedStore.open(tmp_path / "s", expect={"num_draws": 64})
    # building into the folder with other settings is refused, naming the difference
    with pytest.raises(StoreMismatchError, match=r"model_fingerprint: store has 'm0', expected 'm1'"):
        build_store(tmp_path / "s", ids, _compute(ids), {**SETTINGS, "model_fingerprint": "m1"}, shard_size=8,
                    progress=False)
    other = build_store(tmp_path / "s", ids, _compute(ids), {**SETTINGS, "model_fingerprint": "m1"}, shard_size=8,
                        overwrite=True, progress=False)
    assert other.settings["model_fingerprint"] == "m1"
    with pytest.raises(StoreError, match="no projected-gradient store"):
        ProjectedStore.open(tmp_path / "nothing")


def test_corrupt_and_truncated_shards_are_refused_and_repaired(tmp_path):
    ids = np.arange(30)
    build_store(tmp_path / "s", ids, _compute(ids), SETTINGS, shard_size=8, progress=False)
    shard = tmp_path / "s" / "shards" / "shard-00001.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte: same size, wrong checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"shard 1 .*fails its SHA-256 checksum"):
        ProjectedStore.open(tmp_path / "s")
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(StoreCorruptError, match=r"shard 1 .*truncated"):
        ProjectedStore.open(tmp_path / "s")
    shard.unlink()
    with pytest.raises(StoreCorruptError, match=r"shard 1 .*missing"):
        ProjectedStore.open(tmp_path / "s")
    # resuming the build recomputes exactly the broken shard
    calls = []
    store = build_store(tmp_path / "s", ids, _compute(ids, calls), SETTINGS, shard_size=8, progress=False)
    assert calls == [(8, 16)]
    assert np.array_equal(store.arrays["features"], synthetic_features(ids))
    # an unfinished build cannot be opened
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**man, "complete": False}))
    with pytest.raises(StoreError, match="incomplete"):
        ProjectedStore.open(tmp_path / "s")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_index import SETTINGS, synthetic_features
    from diffinfluence_widgets.store import build_store
    torch.set_num_threads(1)
    ids = np.arange(1000, 1060)
    def compute(lo, hi):
        time.sleep(0.25)
        return {{"features": torch.from_numpy(synthetic_features(ids[lo:hi]))}}
    build_store({path!r}, ids, compute, SETTINGS, shard_size=6, progress=False)
    print("done")
""")


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path):
    path = tmp_path / "killed"
    script = tmp_path / "build.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        done = list((path / "shards").glob("shard-*.json")) if (path / "shards").is_dir() else []
        if len(done) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"build finished or died before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = {p.name for p in (path / "shards").glob("shard-*.json")}
    assert 3 <= len(finished) < 10
    with pytest.raises(StoreError, match="incomplete"):
        ProjectedStore.open(path)
    ids = np.arange(1000, 1060)
    calls = []
    resumed = build_store(path, ids, _compute(ids, calls), SETTINGS, shard_size=6, progress=False)
    assert len(calls) == 10 - len(finished)  # finished shards were not recomputed
    assert not any(lo // 6 in {int(n[6:11]) for n in finished} for lo, _ in calls)
    clean = build_store(tmp_path / "clean", ids, _compute(ids), SETTINGS, shard_size=6, progress=False)
    assert np.array_equal(resumed.ids, clean.ids)
    assert np.array_equal(resumed.arrays["features"], clean.arrays["features"])
    for s in range(10):  # byte-identical shards
        name = f"shard-{s:05d}.npz"
        assert (path / "shards" / name).read_bytes() == (tmp_path / "clean" / "shards" / name).read_bytes()
    ProjectedStore.open(path, verify=True)


# ------------------------------------------------------------------------------------------------ FAISS search
def test_flat_search_equals_brute_force_topk():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 32)).astype(np.float32)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = FeatureIndex(X, ids)
    for _ in range(5):
        q = rng.standard_normal(32)
        p_ids, p_sc, o_ids, o_sc = index.proponents_opponents(q, 10)
        s = X.astype(np.float64) @ q.astype(np.float32).astype(np.float64)
        order = np.argsort(-s, kind="stable")
        assert np.array_equal(p_ids, ids[order[:10]])
        assert np.allclose(p_sc, s[order[:10]], rtol=1e-5, atol=1e-5)
        assert np.array_equal(o_ids, ids[order[::-1][:10]])
        assert np.allclose(o_sc, s[order[::-1][:10]], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(p_sc) <= 1e-6) and np.all(np.diff(o_sc) >= -1e-6)
    assert index.search(rng.standard_normal((3, 32)), 1000)[0].shape == (3, 500)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros(31), 3)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_of_the_exact_topk(kind):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((40, 32)) * 2  # clustered, like gradients of similar images
    X = (centers[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 32))).astype(np.float32)
    ids = np.arange(4000)
    exact, approx = FeatureIndex(X, ids), FeatureIndex(X, ids, kind=kind, nprobe=16)
    rec = []
    for _ in range(10):
        q = rng.standard_normal(32)
        rec.append(len(set(exact.search(q, 20)[0][0]) & set(approx.search(q, 20)[0][0])) / 20)
    assert np.mean(rec) > 0.8, rec


def test_pca_index_reranks_to_exact_scores_and_finds_the_topk():
    """The large-N default: a PCA-reduced 8-bit scan, then exact re-ranking; on features with a decaying spectrum
    (what projected gradients look like) it finds the exact top-k, and the listed scores are exact inner products."""
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.standard_normal((64, 12)))[0].T * (np.arange(1, 13) ** -0.7)[:, None]
    X = (rng.standard_normal((6000, 12)) @ basis + 0.01 * rng.standard_normal((6000, 64))).astype(np.float32)
    ids = np.arange(6000) + 100
    exact, approx = FeatureIndex(X, ids), FeatureIndex(X, ids, kind="pca", pca_dim=12, rerank=8)
    assert approx.pca_dim == 12
    rec = []
    for _ in range(10):
        q = rng.standard_normal(64)
        p_ids, p_sc, o_ids, o_sc = approx.proponents_opponents(q, 20)
        want = X.astype(np.float64) @ q.astype(np.float32)
        np.testing.assert_allclose(p_sc, want[p_ids - 100], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(o_sc, want[o_ids - 100], rtol=1e-4, atol=1e-5)
        e_p, _, e_o, _ = exact.proponents_opponents(q, 20)
        rec.append((len(set(p_ids) & set(e_p)) + len(set(o_ids) & set(e_o))) / 40)
    assert np.mean(rec) >= 0.95, rec
    with pytest.raises(ValueError, match="rerank"):
        FeatureIndex(X, ids, kind="pca", rerank=0)


# ------------------------------------------------------------------------------------------------ query path
def _synthetic_curvature(shapes, seed=0):
    from diffinfluence_widgets.influence.curvature import Curvature

    g = torch.Generator().manual_seed(seed)
    qa, qb, la, lb, ev = {}, {}, {}, {}, {}
    for n, (d_out, d_in1) in shapes.items():
        qb[n] = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
        qa[n] = torch.linalg.qr(torch.randn(d_in1, d_in1, generator=g, dtype=torch.float64))[0]
        lb[n] = torch.rand(d_out, generator=g, dtype=torch.float64) ** 4
        la[n] = torch.rand(d_in1, generator=g, dtype=torch.float64) ** 4
        ev[n] = torch.outer(lb[n], la[n]) * (0.5 + torch.rand(d_out, d_in1, generator=g, dtype=torch.float64))
    return Curvature(list(shapes), qa, qb, la, lb, ev)


@pytest.mark.parametrize("space", ["parameter", "eigen"])
@pytest.mark.parametrize("structure", ["kronecker", "dense"])
def test_damping_change_equals_from_scratch(space, structure):
    shapes = {"a": (6, 11), "b": (9, 4), "c": (3, 17)}
    curv = _synthetic_curvature(shapes)
    proj = make_projector(shapes, 64, structure=structure, seed=3)
    g = torch.Generator().manual_seed(5)
    train = {n: torch.randn(40, *s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    query = {n: torch.randn(1, *s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    lam0 = 1e-3
    feats = store_feature_fn(proj, space=space, curvature=curv, whiten_damping=lam0)(train).double()
    engine = KFACQuery(curv, proj, space=space, whiten_damping=lam0)
    rotated = engine.rotate(query)  # once per query
    for damping in (1e-1, 1e-4, 1e-8, 3.0):
        fast = feats @ engine.project(rotated, damping)[0]
        # from scratch: precondition in parameter space, then the store's feature map
        pre = curv.precondition(query, damping)
        if space == "parameter":
            slow = feats @ proj.project(pre).double()[0]
        else:
            w = {n: (curv.eigenvalues[n] + lam0) for n in shapes}
            rot = curv.rotate(pre)
            slow = feats @ proj.project({n: rot[n] * w[n].sqrt() for n in shapes}).double()[0]
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-6 * float(slow.abs().max())), (damping, space)
    # the curvature is untouched by any number of damping changes
    assert torch.equal(curv.eigenvalues["a"], _synthetic_curvature(shapes).eigenvalues["a"])


def test_eigen_store_is_unbiased_and_more_accurate_at_small_damping():
    """Both spaces estimate the exact preconditioned score; the whitened one with far less projection noise."""
    shapes = {"a": (16, 33), "b": (24, 9)}
    curv = _synthetic_curvature(shapes, seed=1)
    g = torch.Generator().manual_seed(2)
    # gradients distributed like the curvature says (G ≈ E[g gᵀ]): small where the eigenvalues are small
    def draw(b):
        z = {n: torch.randn(b, *s, generator=g, dtype=torch.float64) * curv.eigenvalues[n].sqrt()
             for n, s in shapes.items()}
        return curv.unrotate(z)
    train, query = draw(50), draw(1)
    damping = 1e-4  # the eigenvalues span ~1e-8 .. 1
    pre = curv.precondition(query, damping)
    exact = sum((pre[n] * train[n]).flatten(1).sum(1) for n in shapes)
    err, mean = {}, {}
    for space in ("parameter", "eigen"):
        ests = []
        for r in range(12):
            proj = make_projector(shapes, 256, seed=r)
            feats = store_feature_fn(proj, space=space, curvature=curv, whiten_damping=damping)(train).double()
            engine = KFACQuery(curv, proj, space=space, whiten_damping=damping)
            ests.append(feats @ engine.project(engine.rotate(query), damping)[0])
        ests = torch.stack(ests)
        err[space] = float(((ests - exact) ** 2).mean().sqrt())
        mean[space] = ests.mean(0)
        # unbiased: the mean over projection seeds approaches the exact scores
        assert float((mean[space] - exact).pow(2).mean().sqrt()) < 3 * err[space] / np.sqrt(12)
    assert err["eigen"] < 0.3 * err["parameter"], err


# ------------------------------------------------------------------------------------------------ the backend
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.influence.curvature import fit_curvature

    train = load_digits(size=8, split="train", limit=24)
    held = load_digits(size=8, split="heldout", limit=2)
    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0)
    curv = fit_curvature(model, train, num_draws=4, progress=False)
    return model, train, held, curv, tmp_path_factory.mktemp("backend")


def _backend(tiny_setup, **kw):
    from diffinfluence_widgets.index import IndexBackend

    model, train, held, curv, cache = tiny_setup
    args = dict(k=64, k_b=8, k_a=8, num_draws=4, query_num_draws=4, num_generated=1, shard_size=10,
                progress=False)
    args.update(kw)
    return IndexBackend.build(model, train, held, curv, cache, **args)


@pytest.mark.parametrize("space", ["eigen", "parameter"])
def test_backend_damping_change_equals_from_scratch(tiny_setup, space):
    from diffinfluence_widgets.backend import InfluenceBackend
    from diffinfluence_widgets.index import GENERATED_ID_BASE

    model, train, held, curv, _ = tiny_setup
    b = _backend(tiny_setup, space=space, methods=("ekfac", "kfac", "trak"), query_dtype=torch.float64)
    b32 = _backend(tiny_setup, space=space, methods=("ekfac", "kfac"))  # the slider's float32 arithmetic
    assert isinstance(b, InfluenceBackend)
    assert {q.kind for q in b.queries()} == {"heldout", "generated"}
    assert GENERATED_ID_BASE in {q.id for q in b.queries()}
    qid = int(held.ids[0])
    feats = b.stores["loss"].arrays["eigen" if space == "eigen" else "features"].astype(np.float64)
    g = b.query_gradients(qid, "loss")
    g.layers = {n: g.band_layers[n].double().sum(0) for n in g.layers}  # the backend's whole = Σ bands
    for method in ("ekfac", "kfac"):
        p = b.prepare(qid, "loss", method)
        for damping in (1e-2, 1e-8, 3e-5):  # each λ after others: only the query side changes
            fast = b.scores(p, damping)
            if method == "kfac":
                lam = {n: torch.outer(curv.lambda_b[n], curv.lambda_a[n]) for n in curv.layer_names}
                rot = curv.rotate({n: g.layers[n].double() for n in curv.layer_names})
                pre = curv.unrotate({n: rot[n] / (lam[n] + damping) for n in curv.layer_names})
            else:
                pre = curv.precondition({n: g.layers[n].double() for n in curv.layer_names}, damping)
            feats_used = feats
            if space == "eigen" and damping < b.switch_damping:
                rot = curv.rotate(pre)
                x = {n: rot[n] * (curv.eigenvalues[n].double() + b.whiten_damping).sqrt() for n in rot}
            else:  # a parameter store, or an eigen store past its switch to the parameter-space array
                x = pre
                feats_used = b.stores["loss"].arrays["features"].astype(np.float64)
            slow = feats_used @ b.projector.project(x)[0].double().numpy()
            # float32 gradients summed in another order (bands vs whole) differ by ~1e-8 of the largest score
            assert np.allclose(fast, slow, rtol=1e-6, atol=1e-7 * np.abs(slow).max()), (method, damping)
            f32 = b32.scores(b32.prepare(qid, "loss", method), damping)
            assert np.allclose(f32, slow, rtol=1e-3, atol=1e-5 * np.abs(slow).max()), (method, damping)
            # the FAISS route of search = exact top-k of these scores (flat index)
            r = b.search(p, damping, 5, "faiss")
            order = np.argsort(-fast)
            assert set(r.proponent_ids) == set(b.train_ids[order[:5]])
            assert set(r.opponent_ids) == set(b.train_ids[order[::-1][:5]])
            assert np.allclose(r.proponent_scores, fast[order[:5]], rtol=1e-4, atol=1e-6 * np.abs(fast).max())
            # per-band contributions sum to the scores
            prof = b.band_profile(p, damping, r.proponent_ids)
            assert prof.shape == (len(b.bands), 5)
            assert np.allclose(prof.sum(0), fast[order[:5]], rtol=1e-4, atol=1e-6 * np.abs(fast).max())
    # the curvature is never modified by damping changes
    assert all(torch.isfinite(curv.eigenvalues[n]).all() for n in curv.layer_names)
    if space == "eigen":  # λ = 1e-2 and 1e-8 above took the two routes
        assert 1e-8 < b.switch_damping <= 1e-2, b.switch_damping


def test_backend_exact_rescoring_uses_full_gradients(tiny_setup):
    from diffinfluence_widgets.influence.gradients import per_example_gradients

    model, train, held, curv, _ = tiny_setup
    b = _backend(tiny_setup, methods=("ekfac",), rescore_candidates=8)
    qid = int(held.ids[1])
    p = b.prepare(qid, "loss", "ekfac")
    r = b.search(p, 1e-4, 3)
    assert r.exact
    g = b.query_gradients(qid, "loss")
    g.layers = {n: g.band_layers[n].double().sum(0) for n in g.layers}
    pre = curv.precondition({n: g.layers[n].double() for n in curv.layer_names}, 1e-4)
    ids = list(r.proponent_ids) + list(r.opponent_ids)
    pos = [int(np.nonzero(b.train_ids == i)[0][0]) for i in ids]
    gt = per_example_gradients(model, train.images[pos], ids, "loss", num_draws=4, seed=0)
    exact = sum((pre[n][0] * gt.layers[n].double()).flatten(1).sum(1) for n in curv.layer_names).numpy()
    assert np.allclose(np.concatenate([r.proponent_scores, r.opponent_scores]), exact, rtol=1e-4)
    assert np.all(np.diff(r.proponent_scores) <= 0) and np.all(np.diff(r.opponent_scores) >= 0)


def test_backend_trak_family_matches_closed_form_and_reuses_stores(tiny_setup, monkeypatch):
    import diffinfluence_widgets.influence.gradients as grads

    model, train, held, curv, _ = tiny_setup
    b = _backend(tiny_setup, methods=("ekfac", "trak", "dtrak", "journey_trak"))
    gen = b.queries()[-1]
    assert gen.kind == "generated"
    for method, meas, store in (("trak", "loss", "loss"), ("dtrak", "square_norm", "square_norm")):
        phi_train = b.stores[store].arrays["features"].astype(np.float64)
        lam = b.default_damping[method]
        assert lam > 0
        p = b.prepare(gen.id, meas, method)
        g = b.query_gradients(gen.id, meas)
        g.layers = {n: g.band_layers[n].double().sum(0) for n in g.layers}
        phi_q = b.projector.project({n: g.layers[n].double() for n in curv.layer_names})[0].numpy()
        for damping in (lam, 10 * lam):
            closed = phi_train @ np.linalg.solve(phi_train.T @ phi_train + damping * np.eye(b.projector.k), phi_q)
            assert np.allclose(b.scores(p, damping), closed, rtol=1e-6, atol=1e-9 * np.abs(closed).max())
    # Journey-TRAK differentiates the query's trajectory loss; held-out images have no trajectory
    p = b.prepare(gen.id, "loss", "journey_trak")
    assert p.payload.measurement == "journey_trak" and np.isfinite(b.scores(p, 1.0)).all()
    with pytest.raises(ValueError, match="trajectory"):
        b.prepare(int(held.ids[0]), "loss", "journey_trak")
    assert b.map_2d().shape == (len(train.ids), 2)
    assert b.train_images(b.train_ids[:3]).shape == (3, 1, 8, 8)
    # a second backend on the same cache computes no training gradients
    calls = []
    real = grads.per_example_gradients
    monkeypatch.setattr(grads, "per_example_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _backend(tiny_setup, methods=("ekfac", "trak", "dtrak", "journey_trak"))
    assert calls == []
    # reopened: the [k, k] eigenvectors wait for the method's first query; the damping comes from the cached
    # spectrum alone and equals the full scorer's; TRAK and Journey-TRAK share one scorer (one loss store)
    from diffinfluence_widgets.influence.preconditioners import trak as trak_pre

    assert not any(id(st) in trak_pre._SCORERS for st in again.stores.values())
    for m in ("trak", "dtrak", "journey_trak"):
        assert again.default_damping[m] == pytest.approx(b.default_damping[m], rel=1e-12)
        assert again.default_damping[m] == pytest.approx(again.preconditioners[m].scorer.default_damping(), rel=1e-12)
    assert again.preconditioners["trak"].scorer is again.preconditioners["journey_trak"].scorer
    assert again.preconditioners["dtrak"].scorer is not again.preconditioners["trak"].scorer
    p2 = again.prepare(gen.id, "loss", "trak")
    assert np.array_equal(again.scores(p2, 1.0), b.scores(b.prepare(gen.id, "loss", "trak"), 1.0))


def test_identity_preconditioner_is_the_plain_gradient_dot_product(tiny_setup):
    """The identity method (one file + one registry line): projected scores = (R g_q)ᵀ (R g_j); exact rescoring
    = g_qᵀ g_j with full gradients; λ only passes the damping rule."""
    from diffinfluence_widgets.influence.gradients import per_example_gradients

    model, train, held, curv, _ = tiny_setup
    b = _backend(tiny_setup, methods=("identity", "ekfac"), query_dtype=torch.float64, rescore_candidates=24)
    qid = int(held.ids[0])
    g = b.query_gradients(qid, "loss")
    whole = {n: g.band_layers[n].double().sum(0) for n in curv.layer_names}  # the backend's whole = Σ bands
    p = b.prepare(qid, "loss", "identity")
    phi_train = b.stores["loss"].arrays["features"].astype(np.float64)
    projected = phi_train @ b.projector.project(whole)[0].double().numpy()
    for damping in (1e-8, 1.0, 1e3):
        assert np.allclose(b.scores(p, damping), projected, rtol=1e-9, atol=1e-12 * np.abs(projected).max())
    gt = per_example_gradients(model, train.images, train.ids, "loss", num_draws=4, seed=0)
    exact = sum((whole[n][0] * gt.layers[n].double()).flatten(1).sum(1) for n in curv.layer_names).numpy()
    with pytest.MonkeyPatch.context() as mp:  # recycled gradient memory even for the tiny model's batches
        mp.setattr(buffers, "MIN_BYTES", 0)
        assert np.allclose(b.exact_scores(p, 1.0, b.train_ids), exact, rtol=1e-5,
                           atol=1e-7 * np.abs(exact).max())
        assert buffers.free_bytes() == 0  # a serving backend keeps no idle gradient memory after a request
    r = b.search(p, 1.0, 3)  # 24 candidates = every training example: the exact top-3
    assert r.exact and list(r.proponent_ids) == list(b.train_ids[np.argsort(-exact)[:3]])
    assert b.default_damping["identity"] == 1.0


def test_backend_relative_damping_uses_each_methods_scale(tiny_setup):
    from diffinfluence_widgets.influence.trak import TRAKScorer

    b = _backend(tiny_setup, methods=("ekfac", "kfac", "trak"))
    curv = tiny_setup[3]
    assert b.damping_scale["ekfac"] == pytest.approx(curv.mean_eigenvalue(), rel=1e-9)
    kfac_tau = sum(float(np.outer(curv.lambda_b[n], curv.lambda_a[n]).sum()) for n in curv.layer_names) / \
        curv.num_parameters
    assert b.damping_scale["kfac"] == pytest.approx(kfac_tau, rel=1e-9)
    assert b.relative_damping("ekfac", 1e-2) == pytest.approx(1e-2 * curv.mean_eigenvalue(), rel=1e-9)
    trak = b.preconditioners["trak"].scorer
    assert b.relative_damping("trak", 0.5) == pytest.approx(trak.default_damping(0.5)) and isinstance(trak, TRAKScorer)
    with pytest.raises(ValueError, match="relative damping"):
        b.relative_damping("ekfac", -1.0)
    with pytest.raises(KeyError, match="dtrak"):
        b.relative_damping("dtrak", 1e-2)


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, float("nan"), float("inf")])
def test_one_damping_rule_on_every_backend_path(tiny_setup, bad):
    from diffinfluence_widgets.influence.trak import TRAKScorer

    b = _backend(tiny_setup, methods=("ekfac", "trak", "identity"), rescore_candidates=4)
    qid = int(tiny_setup[2].ids[0])
    for method in ("ekfac", "trak", "identity"):
        p = b.prepare(qid, "loss", method)
        for call in (lambda: b.scores(p, bad), lambda: b.search(p, bad, 3), lambda: b.band_profile(p, bad, [0])):
            with pytest.raises(ValueError, match=r"damping must be a positive finite number .*got"):
                call()
    with pytest.raises(ValueError, match="damping"):
        b.exact_scores(b.prepare(qid, "loss", "ekfac"), bad, b.train_ids[:2])
    with pytest.raises(ValueError, match="damping"):
        TRAKScorer(np.eye(3)).query_feature(np.ones(3), bad)


def test_query_on_the_gradient_map_uses_the_training_points_axes(tiny_setup):
    """map_2d_query places a query with its loss gradient through the same projection, centring and principal
    axes as map_2d's training points (checked against an independent SVD, axes up to sign), for held-out and
    generated queries alike."""
    b = _backend(tiny_setup, methods=("ekfac",))
    x = b.stores["loss"].arrays["features"].astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    xy = b.map_2d()
    signs = np.sign(np.sum(xy * ((x - mean) @ vt[:2].T), axis=0))
    assert np.allclose(xy, signs * ((x - mean) @ vt[:2].T), atol=1e-8 * np.abs(xy).max())
    kinds = set()
    for q in b.queries():
        g = b.query_gradients(q.id, "loss")
        whole = {n: g.band_layers[n][:, 0].double().sum(0)[None] if g.band_layers is not None else g.layers[n].double()
                 for n in b.layer_names}
        phi = b.projector.project(whole)[0].double().numpy()
        expect = signs * ((phi - mean) @ vt[:2].T)
        assert np.allclose(b.map_2d_query(q.id), expect, rtol=1e-6, atol=1e-8 * np.abs(xy).max()), q.kind
        kinds.add(q.kind)
    assert kinds == {"heldout", "generated"}
