"""The recommended default (issue 14): separate query / training draws, an ensemble over independently trained
models (= the mean of the members' score matrices, trained through the resumable cache), and settings that refuse
bad values where they enter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffinfluence_widgets import attribute
from diffinfluence_widgets.config import (DEFAULT_ENSEMBLE, DEFAULT_QUERY_DRAWS, DEFAULT_RELATIVE_DAMPING,
                                          DEFAULT_TRAIN_DRAWS)
from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.train import TrainConfig
from diffinfluence_widgets.evaluation import (Attribution, AttributionSettings, EvaluationSettings, RetrainCache,
                                              train_ensemble)

S = AttributionSettings(query_draws=4, train_draws=2, curvature_draws=2, trak_dim=32, batch_size=8)
RECIPE = TrainConfig(steps=3, batch_size=8, lr=2e-3, warmup=1, ema_decay=0.9, checkpoint_every=50)


def _cfg():
    return dict(tiny_unet_config(8), block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=4)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    train = load_digits(size=8, split="train", limit=10)
    queries = load_digits(size=8, split="heldout", limit=3)
    return train, queries.images, queries.ids.tolist()


def test_an_ensemble_is_the_mean_of_its_members_score_matrices(data, tmp_path):
    train, q, qids = data
    models = train_ensemble(_cfg(), train, RECIPE, tmp_path / "cache", num_models=2)
    assert len(models) == 2 and not torch.equal(next(models[0].unet.parameters()), next(models[1].unet.parameters()))
    methods, lams = ["EK-FAC", "TRAK", "pixel"], (1e-2, 1.0)
    ens = attribute(models, train, q, qids, methods=methods[:2], dampings=lams, settings=S)
    one = [attribute(m, train, q, qids, methods=methods[:2], dampings=lams, settings=S) for m in models]
    assert ens.num_models == 2 and ens.methods == methods[:2]
    for name in methods[:2]:
        for lam in lams:
            mean = (one[0].matrix(name, lam) + one[1].matrix(name, lam)) / 2
            np.testing.assert_allclose(ens.matrix(name, lam), mean, rtol=1e-12, atol=0)
            assert ens.absolute[name][lam] == pytest.approx((one[0].absolute[name][lam] + one[1].absolute[name][lam])
                                                            / 2)
        # each member scales λ by its own τ: the members' curvature scales differ
        assert one[0].scale[name] != one[1].scale[name]
    # the members' scores differ (else the ensemble would be a no-op): independently trained models
    assert not np.allclose(one[0].matrix("EK-FAC", 1e-2), one[1].matrix("EK-FAC", 1e-2))
    # pixel similarity does not depend on the model: the ensemble leaves it unchanged
    pix = attribute(models, train, q, qids, methods=["pixel"], settings=S)
    single = attribute(models[0], train, q, qids, methods=["pixel"], settings=S)
    np.testing.assert_allclose(pix.matrix("pixel"), single.matrix("pixel"), rtol=1e-12, atol=0)
    # resumable / cached: asking again (even for a larger ensemble's prefix) trains nothing new
    jobs = sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir())
    again = train_ensemble(_cfg(), train, RECIPE, tmp_path / "cache", num_models=2)
    assert sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir()) == jobs
    for a, b in zip(models, again):
        assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    # the ensemble's seed-0 member is the evaluation's full-data model (same cache job)
    cache = RetrainCache(tmp_path / "cache", DiffusionModel.from_config(_cfg(), seed=0), train, RECIPE)
    assert [m.fingerprint() for m in train_ensemble(cache, train, num_models=1)] == [models[0].fingerprint()]


def test_defaults_are_the_recommended_setting():
    s = AttributionSettings()
    assert (s.query_draws, s.train_draws) == (DEFAULT_QUERY_DRAWS, DEFAULT_TRAIN_DRAWS) == (512, 128)
    both = AttributionSettings(grad_draws=32)
    assert (both.query_draws, both.train_draws) == (32, 32)
    ev = EvaluationSettings.quick()
    assert ev.ensemble == DEFAULT_ENSEMBLE == 3 and ev.default_method == "EK-FAC"
    assert ev.default_damping == DEFAULT_RELATIVE_DAMPING and ev.attribution.query_draws == 512
    assert attribute.__kwdefaults__["dampings"] == (DEFAULT_RELATIVE_DAMPING,)
    assert attribute.__kwdefaults__["damping"] == "relative"


def test_settings_refuse_bad_values_with_clear_errors(data):
    with pytest.raises(ValueError, match=r"query_draws must be a positive integer \(or None for the default\), "
                                         r"got 0"):
        AttributionSettings(query_draws=0)
    with pytest.raises(ValueError, match="train_draws must be a positive integer.*got 2.5"):
        AttributionSettings(train_draws=2.5)
    with pytest.raises(ValueError, match="grad_draws=32 sets both sides, but query_draws=512 differs"):
        AttributionSettings(grad_draws=32, query_draws=512)
    with pytest.raises(ValueError, match="ensemble .* must be a positive integer, got 0"):
        EvaluationSettings(ensemble=0)
    with pytest.raises(ValueError, match="default_method must be a K-FAC-family method .* got 'D-TRAK'"):
        EvaluationSettings(default_method="D-TRAK")
    with pytest.raises(ValueError, match=r"unknown methods \['EKFAC'\]"):
        EvaluationSettings(default_method="EKFAC")
    with pytest.raises(ValueError, match=r"default_damping=0.5 must be one of default_dampings"):
        EvaluationSettings(default_damping=0.5)
    train, q, qids = data
    with pytest.raises(ValueError, match="num_models .* must be a positive integer, got 0"):
        train_ensemble(_cfg(), train, RECIPE, "/nonexistent-never-created", num_models=0)
    with pytest.raises(ValueError, match="needs train_config"):
        train_ensemble(_cfg(), train)
    model = DiffusionModel.from_config(_cfg(), seed=0)
    with pytest.raises(TypeError, match="model must be a DiffusionModel or a non-empty list of them"):
        attribute([], train, q, qids, settings=S)
    with pytest.raises(TypeError, match=r"non-empty list of them \(an ensemble\), got list of \['DiffusionModel', "
                                        r"'str'\]"):
        attribute([model, "m1"], train, q, qids, settings=S)
    with pytest.raises(ValueError, match="curvatures= holds one model's curvatures"):
        attribute([model, model], train, q, qids, settings=S, curvatures={"EK-FAC": None})
    a = Attribution(np.arange(2), np.arange(3), scores={"pixel": {None: np.zeros((2, 3))}})
    b = Attribution(np.arange(2), np.arange(4), scores={"pixel": {None: np.zeros((2, 4))}})
    with pytest.raises(ValueError, match="attribution 1 has other queries or training examples"):
        Attribution.mean([a, b])
    with pytest.raises(ValueError, match="needs at least one attribution"):
        Attribution.mean([])
