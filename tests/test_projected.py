"""Factor-wise (LoGra-style) projected gradients equal projecting the materialised per-example gradients."""
from __future__ import annotations

import pytest
import torch

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.influence.gradients import layer_shapes, per_example_gradients
from diffinfluence_widgets.influence.projected import projected_gradients, whitened_layer_feature
from diffinfluence_widgets.influence.projection import make_projector

torch.set_num_threads(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup64():
    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0).to("cpu", torch.float64)
    data = load_digits(size=8, split="train", limit=5)
    return model, data.images.double(), torch.as_tensor(data.ids)


# (k_b, k_a): both sides projected first; both contracted first (k ≥ every side: exact isometries); mixed
@pytest.mark.parametrize("k_b,k_a", [(4, 4), (64, 128), (16, 4)])
@pytest.mark.parametrize("measurement", ["loss", "square_norm"])
def test_factor_projection_equals_projecting_the_gradient(setup64, k_b, k_a, measurement):
    model, x, ids = setup64
    P = make_projector(layer_shapes(model), k_b=k_b, k_a=k_a, seed=3)
    # max_rows forces several chunks of draws per batch and a ragged last batch
    kw = dict(num_draws=6, seed=1, batch_size=2, max_rows=5)
    g = per_example_gradients(model, x, ids, measurement, **kw)
    ref = P.project(g.layers)
    out = projected_gradients(model, x, ids, P, measurement, **kw)["features"]
    assert out.dtype == torch.float64 and out.shape == (5, k_b * k_a)
    assert _rel(out, ref) <= 1e-5
    # batch size and chunking are invisible
    out2 = projected_gradients(model, x, ids, P, measurement, num_draws=6, seed=1, batch_size=5, max_rows=512)
    assert _rel(out2["features"], ref) <= 1e-10


def test_layer_features_see_each_layer_gradient_and_match_the_eigen_store(setup64):
    from diffinfluence_widgets.store import store_feature_fn
    from diffinfluence_widgets.influence.curvature import fit_curvature

    model, x, ids = setup64
    data = load_digits(size=8, split="train", limit=6)
    curv = fit_curvature(model, data, num_draws=2, progress=False)
    P = make_projector({n: layer_shapes(model)[n] for n in curv.layer_names}, k_b=8, k_a=8, seed=0)
    kw = dict(num_draws=4, seed=0, batch_size=3, max_rows=6)
    g = per_example_gradients(model, x, ids, **kw)
    ref = store_feature_fn(P, space="eigen", curvature=curv, whiten_damping=1e-3)(g.layers)
    seen = []

    def count(name, grad):
        seen.append(name)
        return P.project_layer(name, grad)
    out = projected_gradients(model, x, ids, P, layer_features={"eigen": whitened_layer_feature(P, curv, 1e-3),
                                                                 "plain": count}, **kw)
    assert _rel(out["eigen"], ref) <= 1e-5
    assert _rel(out["plain"], out["features"]) <= 1e-10
    assert set(seen) == set(P.layer_names)


def test_factor_projection_rejects_bad_input(setup64):
    model, x, ids = setup64
    P = make_projector(layer_shapes(model), k_b=4, k_a=4)
    with pytest.raises(TypeError, match="KroneckerProjector"):
        projected_gradients(model, x, ids, make_projector(layer_shapes(model), 16, structure="dense"))
    with pytest.raises(KeyError, match="does not have"):
        projected_gradients(model, x, ids, make_projector({"nope": (3, 4)}, k_b=2, k_a=2))
    with pytest.raises(ValueError, match="num_draws"):
        projected_gradients(model, x, ids, P, num_draws=0)
    with pytest.raises(ValueError, match="features"):
        projected_gradients(model, x, ids, P, layer_features={"features": lambda n, g: g})


@pytest.mark.parametrize("space", ["parameter", "eigen"])
def test_store_build_features_equal_the_materialised_path(tmp_path, space):
    """The store now projects factor-wise: its float32 features equal the old materialise-then-project path."""
    import numpy as np

    from diffinfluence_widgets.store import build_gradient_store, store_feature_fn
    from diffinfluence_widgets.influence.curvature import fit_curvature

    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0)
    data = load_digits(size=8, split="train", limit=7)
    curv = fit_curvature(model, data, num_draws=2, progress=False) if space == "eigen" else None
    P = make_projector(layer_shapes(model), k_b=8, k_a=16, seed=2)
    store = build_gradient_store(tmp_path / "s", model, data, P, num_draws=4, seed=5, space=space, curvature=curv,
                                 whiten_damping=1e-2 if curv is not None else None, shard_size=3, batch_size=2,
                                 progress=False)
    g = per_example_gradients(model, data.images, data.ids, num_draws=4, seed=5, batch_size=2)
    ref = store_feature_fn(P, space=space, curvature=curv, whiten_damping=1e-2)(g.layers).float().numpy()
    got = store.arrays["features"]
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)
