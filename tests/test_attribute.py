"""The one-call API (`attribute`) equals the low-level path for every method (float64), reuses training gradients
across methods and dampings, and states λ one way (relative to each method's curvature scale, or absolute)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diffinfluence_widgets.evaluation.attribution as attribute_module
from diffinfluence_widgets import attribute
from diffinfluence_widgets.data import from_arrays
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.sampling import sample
from diffinfluence_widgets.evaluation import pixel_similarity
from diffinfluence_widgets.evaluation.attribution import METHODS, AttributionSettings, Attributor
from diffinfluence_widgets.influence.curvature import fit_curvature
from diffinfluence_widgets.influence.gradients import per_example_gradients
from diffinfluence_widgets.influence.projection import layer_shapes_of, make_projector
from diffinfluence_widgets.influence.scores import Scores, compute_scores
from diffinfluence_widgets.influence.trak import TRAKScorer

DT = torch.float64
S = AttributionSettings(query_draws=5, train_draws=3, curvature_draws=2, trak_dim=64, batch_size=4)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cfg = tiny_unet_config()
    cfg.update(block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=4)
    model = DiffusionModel.from_config(cfg, seed=0).to(dtype=DT)
    g = torch.Generator().manual_seed(5)
    train = from_arrays(torch.rand(6, 1, 8, 8, generator=g), ids=[40, 11, 32, 13, 24, 15])
    gen = sample(model, 2, seed=9, keep_trajectory=True, num_inference_steps=4)
    return model, train, gen


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_every_method_equals_the_low_level_path(setup):
    model, train, gen = setup
    q, qids = gen.images.to(DT), [7, 3]
    lams = (1e-3, 1.0)
    got = attribute(model, train, q, qids, methods=list(METHODS), dampings=lams, settings=S,
                    trajectory=gen.trajectory)
    assert set(got.methods) == set(METHODS)
    for name, spec in METHODS.items():
        if spec.family == "kfac":
            curv = fit_curvature(model, train, method=spec.curvature, kfac_approx=spec.kfac_approx,
                                 fisher=spec.fisher, num_draws=S.curvature_draws, seed=S.curvature_seed,
                                 progress=False)
            tau = curv.mean_eigenvalue()
            ref = compute_scores(model, curv, q, qids, train, measurement=spec.measurement, damping=[l * tau for l in lams],
                                 num_draws=S.query_draws, train_num_draws=S.train_draws, seed=S.query_seed,
                                 train_seed=S.train_seed, batch_size=4, progress=False)
            for lam, r in zip(lams, ref):
                assert r.train_ids.tolist() == train.ids.tolist()
                assert _rel(got.matrix(name, lam), r.matrix) <= 1e-10, name
                assert got.absolute[name][lam] == pytest.approx(lam * tau, rel=1e-12)
        elif spec.family == "trak":
            gt = per_example_gradients(model, train.images, train.ids, spec.train_measurement,
                                       num_draws=S.train_draws, seed=S.train_seed)
            gq = per_example_gradients(model, q, qids, spec.measurement, num_draws=S.query_draws, seed=S.query_seed,
                                       trajectory=gen.trajectory)
            proj = make_projector(layer_shapes_of(gt.layers), S.trak_dim, seed=S.projection_seed)
            scorer = TRAKScorer(proj.project(gt).numpy())
            rot = scorer.rotate(proj.project(gq).numpy())
            for lam in lams:
                assert _rel(got.matrix(name, lam), scorer.scores(rot, scorer.default_damping(lam))) <= 1e-10, name
        else:
            ref = pixel_similarity(q, train, query_ids=qids, center=spec.center).matrix
            assert _rel(got.matrix(name), ref) <= 1e-10, name
    s = got.as_scores("EK-FAC", 1.0)
    assert s.query_ids.tolist() == qids and s.train_ids.tolist() == train.ids.tolist()


def test_a_damping_sweep_computes_training_gradients_once(setup, monkeypatch):
    model, train, gen = setup
    calls = []
    real = attribute_module.per_example_gradients

    def counting(model, images, ids, measurement, **kw):
        calls.append(("train" if torch.equal(torch.as_tensor(ids), train.ids) else "query", measurement))
        return real(model, images, ids, measurement, **kw)

    monkeypatch.setattr(attribute_module, "per_example_gradients", counting)
    att = Attributor(model, train, gen.images.to(DT), settings=S)
    lams = [10.0 ** e for e in range(-6, 3)]
    a = att.run(["K-FAC", "EK-FAC", "K-FAC GGN^loss", "K-FAC reduce", "TRAK"], lams)
    b = att.run(["EK-FAC", "TRAK"], [1e-8, 1e-2], damping="absolute")  # another call, same gradients
    assert calls.count(("train", "loss")) == 1 and calls.count(("query", "loss")) == 1, calls
    assert len(calls) == 2
    att.run(["D-TRAK"], lams)  # a new training measurement: one more training pass
    assert calls.count(("train", "square_norm")) == 1 and len(calls) == 4
    # λ stated absolutely equals λ stated relatively at the matching multiple of the scale
    tau = a.scale["EK-FAC"]
    ref = att.run(["EK-FAC"], [1e-2 / tau]).matrix("EK-FAC", 1e-2 / tau)
    assert _rel(b.matrix("EK-FAC", 1e-2), ref) <= 1e-10
    assert b.damping_mode["EK-FAC"] == "absolute" and b.absolute["EK-FAC"][1e-2] == 1e-2


def test_relative_damping_is_invariant_to_scaling_the_curvature(setup):
    """Multiplying the curvature by c with relative λ scales every score by 1/c: same rankings."""
    model, train, gen = setup
    curv = fit_curvature(model, train, method="ekfac", num_draws=2, seed=3, progress=False)
    scaled = fit_curvature(model, train, method="ekfac", num_draws=2, seed=3, progress=False)
    for n in scaled.layer_names:
        scaled.eigenvalues[n] = scaled.eigenvalues[n] * 1000.0
    a = attribute(model, train, gen.images.to(DT), methods=["EK-FAC"], dampings=[0.1], settings=S,
                  curvatures={"EK-FAC": curv})
    b = attribute(model, train, gen.images.to(DT), methods=["EK-FAC"], dampings=[0.1], settings=S,
                  curvatures={"EK-FAC": scaled})
    assert _rel(1000.0 * b.matrix("EK-FAC", 0.1), a.matrix("EK-FAC", 0.1)) <= 1e-10


def test_bad_input_is_refused_where_it_enters(setup):
    model, train, gen = setup
    q = gen.images.to(DT)
    with pytest.raises(ValueError, match="unknown method 'KFAC'"):
        attribute(model, train, q, methods=["KFAC"], settings=S)
    with pytest.raises(ValueError, match="damping must be one of"):
        attribute(model, train, q, methods=["pixel"], damping="percent", settings=S)
    with pytest.raises(ValueError, match=r"damping must be a positive finite number \(λ > 0\), got 0.0"):
        attribute(model, train, q, methods=["pixel"], dampings=[0.0], settings=S)
    with pytest.raises(TypeError, match="train must be an ImageDataset"):
        attribute(model, train.images, q, methods=["pixel"], settings=S)
    with pytest.raises(ValueError, match="Journey-TRAK needs the queries' sampling trajectory"):
        attribute(model, train, q, methods=["Journey-TRAK"], settings=S)
    with pytest.raises(ValueError, match="trak_dim must be a positive integer"):
        AttributionSettings(trak_dim=0)


def test_compute_scores_takes_precomputed_training_gradients(setup):
    model, train, gen = setup
    curv = fit_curvature(model, train, method="kfac", num_draws=2, seed=3, progress=False)
    q = gen.images.to(DT)
    kw = dict(damping=[0.5, 5.0], num_draws=4, train_num_draws=4, seed=2, train_seed=1, batch_size=4, progress=False)
    ref = compute_scores(model, curv, q, [0, 1], train, **kw)
    g = per_example_gradients(model, train.images, train.ids, "loss", num_draws=4, seed=1)
    got = compute_scores(model, curv, q, [0, 1], train, train_gradients=g, **kw)
    for r, s in zip(ref, got):
        assert _rel(s.matrix, r.matrix) <= 1e-12 and s.train_ids.tolist() == r.train_ids.tolist()
    with pytest.raises(ValueError, match="missing ids"):
        compute_scores(model, curv, q, [0, 1], train.subset([40, 11]), train_gradients=g, **kw)


def test_scores_refuse_numpy_with_a_clear_error():
    with pytest.raises(TypeError, match="Scores.matrix must be a torch.Tensor, got ndarray"):
        Scores(np.zeros((2, 3)), torch.arange(2), torch.arange(3))
