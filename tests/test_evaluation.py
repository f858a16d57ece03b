"""Evaluation: LDS (hand-computed case, invariances, oracle), resumable retraining, counterfactual removal,
similarity baselines, and a tiny end-to-end run of both protocols."""
from __future__ import annotations

import json
import os
import signal
import multiprocessing as mp
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.draws import draw_noise
from diffinfluence_widgets.evaluation.baselines import feature_similarity, pixel_similarity
from diffinfluence_widgets.evaluation.counterfactual import retrain_without_top, top_removal_ids
from diffinfluence_widgets.evaluation.lds import (Subsets, generate_subsets, lds, lds_jobs, lds_targets, oracle_lds,
                                                  predicted_changes, spearman)
from diffinfluence_widgets.evaluation.retrain import RetrainCache, RetrainJob
from diffinfluence_widgets.measurements import measure

torch.set_num_threads(1)


# ---------------------------------------------------------------------- a tiny, exactly resumable trainer
@dataclass
class ToyConfig:
    """Seconds-scale training for tests (the real recipe is diffusion.train.TrainConfig)."""

    steps: int = 6
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0


def toy_train(model, dataset, config, *, device=None, progress=True, checkpoint_dir=None):
    """Adam on the diffusion loss; a checkpoint after every step; batches and draws depend on (seed, step) only.

    Test hooks (environment): ``TOY_TRAIN_LOG`` — append one JSON line per call (which job, which start step);
    ``TOY_TRAIN_KILL`` — a marker path: the first worker process to reach step 3 creates it and SIGKILLs itself.
    """
    opt = torch.optim.Adam(model.unet.parameters(), lr=config.lr)
    start = 0
    ckpt = Path(checkpoint_dir) / "state.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if os.environ.get("TOY_TRAIN_LOG"):
        with open(os.environ["TOY_TRAIN_LOG"], "a") as f:
            f.write(json.dumps({"n": len(dataset), "seed": config.seed, "start": start}) + "\n")
    model.unet.train()
    n = len(dataset)
    for step in range(start, config.steps):
        marker = os.environ.get("TOY_TRAIN_KILL")
        if marker and step == 3 and mp.parent_process() is not None and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(config.seed * 100_003 + step)
        pos = torch.randperm(n, generator=g)[: config.batch_size]
        ids = dataset.ids[pos]
        d = draw_noise(ids, 1, model.image_shape, model.num_train_timesteps, seed=config.seed * 7919 + step)
        x0 = dataset.images[pos][:, None]
        x_t = model.add_noise(x0, d.noise, d.timesteps)
        loss = (model.predict_noise(x_t, d.timesteps) - d.noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ckpt is not None:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"unet": model.unet.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
    model.unet.eval()
    return model


def _digits(n=24):
    from diffinfluence_widgets.data import load_digits

    return load_digits(size=8, split="train", limit=n)


def _base():
    return DiffusionModel.from_config(tiny_unet_config(), seed=0)


def _weights(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


# ---------------------------------------------------------------------- LDS on a hand-built case
# 4 training examples (ids 10..13), 5 subsets keeping 2 each, 2 queries, 2 seeds.
KEPT = np.array([[1, 1, 0, 0],   # m0 removes {12, 13}
                 [1, 0, 1, 0],   # m1 removes {11, 13}
                 [1, 0, 0, 1],   # m2 removes {11, 12}
                 [0, 1, 1, 0],   # m3 removes {10, 13}
                 [0, 0, 1, 1]],  # m4 removes {10, 11}
                dtype=bool)
SCORES = np.array([[1.0, 2.0, 4.0, 8.0],
                   [-1.0, 0.0, 3.0, -2.0]])
# targets[q, m, k]; seed means: q0 -> .50 .30 .40 .20 .10 ; q1 -> 1 2 3 4 5
TARGETS = np.array([[[0.49, 0.51], [0.32, 0.28], [0.40, 0.40], [0.25, 0.15], [0.05, 0.15]],
                    [[0.5, 1.5], [2.0, 2.0], [2.9, 3.1], [4.5, 3.5], [5.0, 5.0]]])


def test_lds_hand_computed_spearman_and_sem():
    subsets = Subsets(np.arange(10, 14), KEPT, 0.5, 0)
    # Predicted change = (1/4) * sum of the removed examples' scores.
    # q0: removed sums 12, 10, 6, 9, 3 -> ranks 5 4 2 3 1; target ranks 5 3 4 2 1; d = 0 1 -2 1 0, sum d^2 = 6
    #     rho = 1 - 6*6 / (5 * 24) = 0.7
    # q1: removed sums 1, -2, 3, -3, -1 -> ranks 4 2 5 1 3; target ranks 1 2 3 4 5; d = 3 0 2 -3 -2, sum d^2 = 26
    #     rho = 1 - 6*26 / 120 = -0.3
    np.testing.assert_allclose(predicted_changes(SCORES, subsets)[0], np.array([12, 10, 6, 9, 3]) / 4)
    res = lds(SCORES, subsets, TARGETS, query_ids=[100, 101])
    np.testing.assert_allclose(res.per_query, [0.7, -0.3], atol=1e-12)
    assert res.mean == pytest.approx(0.2)
    # SEM = sd(ddof=1) / sqrt(Q) = (1.0 / sqrt(2)) / sqrt(2) = 0.5
    assert res.sem == pytest.approx(0.5)
    assert res.query_ids.tolist() == [100, 101] and res.num_undefined == 0
    # pre-averaged targets give the same answer
    np.testing.assert_allclose(lds(SCORES, subsets, TARGETS.mean(2)).per_query, [0.7, -0.3], atol=1e-12)


def test_lds_invariances_and_scores_objects():
    rng = np.random.default_rng(0)
    subsets = generate_subsets(np.arange(100, 130), num_subsets=12, fraction=0.5, seed=3)
    scores = rng.normal(size=(4, 30))
    targets = rng.normal(size=(4, 12, 3))
    base = lds(scores, subsets, targets).per_query
    # positive scaling and a per-query constant do not change ranks (every subset removes the same number)
    np.testing.assert_allclose(lds(3 * scores + rng.normal(size=(4, 1)), subsets, targets).per_query, base)
    np.testing.assert_allclose(lds(-scores, subsets, targets).per_query, -base)
    # a Scores-like object with its own (permuted) column order is realigned by id
    perm = rng.permutation(30)

    class S:
        matrix = torch.tensor(scores[:, perm])
        train_ids = subsets.train_ids[perm]
        query_ids = np.array([7, 8, 9, 10])

    res = lds(S(), subsets, targets)
    np.testing.assert_allclose(res.per_query, base)
    assert res.query_ids.tolist() == [7, 8, 9, 10]
    # our Spearman equals scipy's, ties included
    a, b = rng.integers(0, 4, 15).astype(float), rng.normal(size=15)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    # constant predictions count as 0 and are reported
    res = lds(np.zeros((4, 30)), subsets, targets)
    assert res.mean == 0 and res.num_undefined == 4


def test_generate_subsets_seeded_and_prefix_stable():
    a = generate_subsets(np.arange(50), num_subsets=5, fraction=0.5, seed=1)
    b = generate_subsets(np.arange(50), num_subsets=8, fraction=0.5, seed=1)
    assert (a.kept.sum(1) == 25).all()
    np.testing.assert_array_equal(a.kept, b.kept[:5])
    assert not np.array_equal(a.kept, generate_subsets(np.arange(50), 5, 0.5, seed=2).kept)
    assert Subsets.from_json(json.loads(json.dumps(a.to_json()))).kept.tolist() == a.kept.tolist()
    with pytest.raises(ValueError, match="fraction"):
        generate_subsets(np.arange(10), 4, fraction=1.0)
    with pytest.raises(ValueError, match="num_subsets"):
        generate_subsets(np.arange(10), 1)


def test_oracle_matches_leave_one_seed_out_definition():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(3, 9, 4))
    res = oracle_lds(t)
    for q in range(3):
        want = np.mean([spearmanr(t[q, :, k], np.delete(t[q], k, axis=1).mean(1)).statistic for k in range(4)])
        assert res.per_query[q] == pytest.approx(want)
    with pytest.raises(ValueError, match="K >= 2"):
        oracle_lds(t[:, :, :1])


# ---------------------------------------------------------------------- retraining: cache, resume, parallel
def test_retrain_cache_manifest_skip_and_crn(tmp_path):
    data = _digits(16)
    cache = RetrainCache(tmp_path / "c", _base(), data, ToyConfig(steps=3), train_fn=toy_train)
    jobs = [RetrainJob(tuple(data.ids[:8].tolist()), 0, tag="a"), RetrainJob(tuple(data.ids[:8].tolist()), 1)]
    dirs = cache.run(jobs, progress=False)
    man = json.loads((dirs[0] / "manifest.json").read_text())
    assert man["kept_ids"] == sorted(data.ids[:8].tolist()) and man["seed"] == 0
    assert man["dataset_fingerprint"] == data.fingerprint() and man["train_config"]["steps"] == 3
    assert dirs[0] != dirs[1] and not any((tmp_path / "c" / "checkpoints").iterdir())
    # the same job with another tag is the same cache entry; nothing retrains
    log = tmp_path / "log.jsonl"
    os.environ["TOY_TRAIN_LOG"] = str(log)
    try:
        assert cache.run([RetrainJob(jobs[0].kept_ids, 0, tag="other")], progress=False) == [dirs[0]]
    finally:
        del os.environ["TOY_TRAIN_LOG"]
    assert not log.exists()
    # a different config is a different cache entry
    other = RetrainCache(tmp_path / "c", _base(), data, ToyConfig(steps=4), train_fn=toy_train)
    assert other.job_dir(jobs[0]) != dirs[0] and not other.is_done(jobs[0])
    # common random numbers: measuring twice gives identical values; matches a direct measurement
    q = data.images[:3]
    v1 = cache.measure(jobs, q, data.ids[:3], num_draws=8, seed=5)
    v2 = cache.measure(jobs, q, data.ids[:3], num_draws=8, seed=5)
    np.testing.assert_array_equal(v1, v2)
    direct = measure(cache.load(jobs[1]), q, data.ids[:3], num_draws=8, seed=5).numpy()
    np.testing.assert_allclose(v1[1], direct, rtol=1e-6)
    # a tampered manifest is refused
    (dirs[1] / "manifest.json").write_text(json.dumps(dict(man, seed=99)))
    with pytest.raises(ValueError, match="seed"):
        cache.load(jobs[1])


def test_interrupted_parallel_retraining_resumes_with_same_results(tmp_path):
    """A worker is SIGKILLed mid-training; the rerun skips finished jobs, resumes the killed one from its own
    checkpoint, and every model equals the one an uninterrupted run trains."""
    data = _digits(16)
    cfg = ToyConfig(steps=6)
    jobs = [RetrainJob(tuple(data.ids[i:i + 10].tolist()), s, tag=f"j{i}{s}") for i in (0, 4) for s in (0, 1)]
    reference = RetrainCache(tmp_path / "ref", _base(), data, cfg, train_fn=toy_train)
    reference.run(jobs, progress=False)

    cache = RetrainCache(tmp_path / "int", _base(), data, cfg, train_fn=toy_train)
    cache.run(jobs[:1], progress=False)  # one job finished before the interrupted run
    log = tmp_path / "log.jsonl"
    os.environ.update(TOY_TRAIN_LOG=str(log), TOY_TRAIN_KILL=str(tmp_path / "killed"))
    try:
        with pytest.raises(BrokenProcessPool):
            cache.run(jobs, num_workers=2, progress=False)
        assert (tmp_path / "killed").exists()
        assert not all(cache.is_done(j) for j in jobs)
        cache.run(jobs, num_workers=2, progress=False)
    finally:
        for k in ("TOY_TRAIN_LOG", "TOY_TRAIN_KILL"):
            os.environ.pop(k, None)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) >= 3 + 1  # three unfinished jobs started, at least one restarted
    assert any(c["start"] >= 3 for c in calls), calls  # the killed job resumed from its checkpoint, not from 0
    assert all(cache.is_done(j) for j in jobs)
    for job in jobs:
        a, b = _weights(reference.load(job)), _weights(cache.load(job))
        assert all(torch.equal(a[k], b[k]) for k in a), job.tag
    q = data.images[:4]
    np.testing.assert_array_equal(reference.measure(jobs, q, data.ids[:4], num_draws=4),
                                  cache.measure(jobs, q, data.ids[:4], num_draws=4))


def real_train_crashing(model, dataset, config, **kw):
    """diffusion.train.train_model, made to crash at step 13 on its first call (``REAL_TRAIN_CRASH`` marker)."""
    from diffinfluence_widgets.diffusion.train import train_model

    marker = os.environ.get("REAL_TRAIN_CRASH")

    def crash(step, loss):
        if marker and step == 13 and not os.path.exists(marker):
            Path(marker).touch()
            raise RuntimeError("simulated crash mid-training")

    return train_model(model, dataset, config, callback=crash, **kw)


def test_interrupted_real_training_resumes_from_its_checkpoint(tmp_path):
    from diffinfluence_widgets.diffusion.train import CHECKPOINT_NAME, TrainConfig

    data = _digits(16)
    cfg = TrainConfig.tiny(steps=20, checkpoint_every=10)
    jobs = [RetrainJob(tuple(data.ids[:12].tolist()), s) for s in (0, 1)]
    reference = RetrainCache(tmp_path / "ref", _base(), data, cfg, train_fn=real_train_crashing)
    reference.run(jobs, progress=False)
    cache = RetrainCache(tmp_path / "int", _base(), data, cfg, train_fn=real_train_crashing)
    os.environ["REAL_TRAIN_CRASH"] = str(tmp_path / "crashed")
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            cache.run(jobs, progress=False)
        ckpt = tmp_path / "int" / "checkpoints" / cache.key(jobs[0]) / CHECKPOINT_NAME
        assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] == 10
        assert not cache.is_done(jobs[0]) and not cache.is_done(jobs[1])
        cache.run(jobs, progress=False)
    finally:
        os.environ.pop("REAL_TRAIN_CRASH", None)
    assert not ckpt.exists()
    for job in jobs:
        a, b = _weights(reference.load(job)), _weights(cache.load(job))
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- baselines
class SmallEncoder(torch.nn.Module):
    """A local, untrained conv encoder standing in for CLIP (no downloads in tests)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    def forward(self, x):
        return self.net(x)


def test_similarity_baselines():
    data = _digits(20)
    q = data.images[:3]
    px = pixel_similarity(q, data, query_ids=[0, 1, 2])
    assert px.matrix.shape == (3, 20) and px.train_ids.tolist() == data.ids.tolist()
    np.testing.assert_allclose(px.matrix[np.arange(3), np.arange(3)], 1.0)  # each query is its own look-alike
    flat = data.images.flatten(1).double()
    want = (flat[1] @ flat[5]) / (flat[1].norm() * flat[5].norm())
    assert px.matrix[1, 5] == pytest.approx(float(want))
    enc = SmallEncoder()
    fs = feature_similarity(enc, q, data.images, query_ids=[0, 1, 2], train_ids=data.ids, batch_size=7)
    assert fs.matrix.shape == (3, 20) and np.all(np.abs(fs.matrix) <= 1 + 1e-9)
    np.testing.assert_allclose(fs.matrix[np.arange(3), np.arange(3)], 1.0)
    # a plain callable works as an encoder too
    fs2 = feature_similarity(lambda x: enc(x), q, data, query_ids=[0, 1, 2], batch_size=64)
    np.testing.assert_allclose(fs.matrix, fs2.matrix)


def test_top_removal_ids():
    ids = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    np.testing.assert_array_equal(top_removal_ids(np.arange(10.0), ids, 0.2), [14, 13])
    with pytest.raises(ValueError, match="removes 0"):
        top_removal_ids(np.arange(10.0), ids, 0.02)


# ---------------------------------------------------------------------- tiny end-to-end: both protocols
def test_tiny_end_to_end_both_protocols(tmp_path):
    data = _digits(24)
    from diffinfluence_widgets.data import load_digits

    held = load_digits(size=8, split="heldout", limit=3)
    cache = RetrainCache(tmp_path / "cache", _base(), data, ToyConfig(steps=4), train_fn=toy_train)

    # LDS: 4 subsets x 2 seeds
    subsets = generate_subsets(data.ids, num_subsets=4, fraction=0.5, seed=0)
    targets = lds_targets(cache, subsets, [0, 1], held.images, held.ids, num_draws=8, progress=False)
    assert targets.shape == (3, 4, 2) and np.isfinite(targets).all()
    jobs = lds_jobs(subsets, [0, 1])
    assert len(jobs) == 8 and all(len(j.kept_ids) == 12 for j in jobs)
    # targets[q, m, k] is the measurement of job m*K + k
    direct = measure(cache.load(jobs[2 * 2 + 1]), held.images, held.ids, num_draws=8).numpy()
    np.testing.assert_allclose(targets[:, 2, 1], direct, rtol=1e-6)
    px = pixel_similarity(held.images, data, query_ids=held.ids)
    res = lds(px, subsets, targets)
    orc = oracle_lds(targets, held.ids)
    for r in (res, orc):
        assert r.per_query.shape == (3,) and np.all(np.abs(r.per_query) <= 1 + 1e-12)
        assert np.isfinite(r.mean)

    # retraining without the top 10% / 25% (of 24: 2 and 6 examples) vs random removal
    rng = np.random.default_rng(0)
    out = retrain_without_top(cache, {"pixel": px, "noise": rng.normal(size=(3, 24))}, held.images, held.ids,
                              fractions=(0.1, 0.25), seeds=(0,), num_draws=8, progress=False)
    assert set(out.increase) == {(m, f) for m in ("pixel", "noise", "random") for f in (0.1, 0.25)}
    assert all(v.shape == (3,) and np.isfinite(v).all() for v in out.increase.values())
    assert [len(r) for r in out.removed[("pixel", 0.25)]] == [6, 6, 6]
    # the pixel baseline removes each query's nearest images first
    for qi in range(3):
        assert set(out.removed[("pixel", 0.1)][qi]) == set(data.ids[np.argsort(-px.matrix[qi])[:2]].tolist())
    rows = out.summary()
    assert len(rows) == 6 and all(np.isfinite(r["mean_increase"]) for r in rows)
    # the full-data model (seed 0) was trained once and is the reference of every increase
    full = RetrainJob(tuple(data.ids.tolist()), 0)
    base = measure(cache.load(full), held.images, held.ids, num_draws=8).numpy()
    np.testing.assert_allclose(out.base_loss, base, rtol=1e-6)
