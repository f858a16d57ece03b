"""Per-example gradients: equal to a plain autograd loop on a diffusers UNet with attention; batch invariant."""
from __future__ import annotations

import pytest
import torch

from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.influence.gradients import (LayerGradients, iter_gradients, per_example_gradients,
                                                       tracked_layers)
from diffinfluence_widgets.measurements import get_measurement

torch.set_num_threads(1)
DT = torch.float64


@pytest.fixture(scope="module")
def model():
    return DiffusionModel.from_config(tiny_unet_config(), seed=0).to(dtype=DT)


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DT) * 2 - 1


def autograd_loop(model, images, ids, measurement, S, seed):
    """Reference: one example at a time, ordinary backward into .grad."""
    meas = get_measurement(measurement)
    layers = tracked_layers(model.unet)
    model.unet.eval()
    out = []
    for i in range(images.shape[0]):
        model.unet.zero_grad(set_to_none=True)
        d = meas.draws(model, [int(ids[i])], S, seed).to(dtype=DT)
        meas.per_draw(model, images[i:i + 1], d).mean().backward()
        per = {}
        for n, m in layers.items():
            g = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                g = torch.cat([g, m.bias.grad[:, None]], 1)
            per[n] = g.clone()
        out.append(per)
    model.unet.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("measurement", ["loss", "square_norm", "elbo_simplified", "loss_at_t=900"])
def test_equals_plain_autograd_loop(model, images, measurement):
    ids = [3, 1, 4, 15]
    got = per_example_gradients(model, images, ids, measurement, num_draws=5, seed=2, batch_size=3, max_rows=4)
    ref = autograd_loop(model, images, ids, measurement, 5, 2)
    for i in range(len(ids)):
        for n, g in got.layers.items():
            r = ref[i][n]
            assert float((g[i] - r).norm() / r.norm().clamp_min(1e-300)) <= 1e-5, (measurement, i, n)
    # every tracked layer took part, attention projections included
    assert any(".to_q" in n for n in got.layers) and all(float(g.abs().sum()) > 0 for g in got.layers.values())


def test_independent_of_batching_and_order(model, images):
    ids = torch.tensor([7, 8, 9, 10])
    a = per_example_gradients(model, images, ids, num_draws=6, seed=1, batch_size=1, max_rows=1)
    b = per_example_gradients(model, images, ids, num_draws=6, seed=1, batch_size=4, max_rows=1000)
    perm = torch.tensor([2, 0, 3, 1])
    c = per_example_gradients(model, images[perm], ids[perm], num_draws=6, seed=1, batch_size=3)
    assert torch.allclose(a.flat(), b.flat(), rtol=1e-10, atol=1e-13)
    assert torch.allclose(c.flat(), a.flat()[perm], rtol=1e-10, atol=1e-13)
    # the parameters are left as they were (trainable, no stale .grad)
    assert all(p.requires_grad and p.grad is None for p in model.unet.parameters())


def test_bands_sum_to_total(model, images):
    bands = [(0, 100), (100, 400), (400, 1000)]
    g = per_example_gradients(model, images, [0, 1, 2, 3], num_draws=8, bands=bands)
    assert g.band_flat().shape == (3, 4, g.flat().shape[1])
    assert torch.allclose(g.band_flat().sum(0), g.flat(), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="cover"):
        per_example_gradients(model, images, [0, 1, 2, 3], num_draws=8, bands=[(0, 500)])


def test_iter_gradients_matches_one_call(model, images):
    class DS:
        pass
    ds = DS()
    ds.images, ds.ids = images, torch.tensor([5, 6, 7, 8])
    parts = LayerGradients.cat(list(iter_gradients(model, ds, num_draws=3, batch_size=3)))
    whole = per_example_gradients(model, images, ds.ids, num_draws=3)
    assert torch.equal(parts.ids, ds.ids)
    assert torch.allclose(parts.flat(), whole.flat(), rtol=1e-10, atol=1e-13)


def test_bad_input_clear_errors(model, images):
    with pytest.raises(ValueError, match="shape"):
        per_example_gradients(model, images[:, :, :4], [0, 1, 2, 3], num_draws=1)
    with pytest.raises(ValueError, match="channels=1"):
        per_example_gradients(model, images.repeat(1, 3, 1, 1), [0, 1, 2, 3], num_draws=1)
    bad = images.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        per_example_gradients(model, bad, [0, 1, 2, 3], num_draws=1)
    with pytest.raises(ValueError, match="unknown measurement 'lose'"):
        per_example_gradients(model, images, [0, 1, 2, 3], "lose", num_draws=1)
    with pytest.raises(ValueError, match="3 ids for 4 images"):
        per_example_gradients(model, images, [0, 1, 2], num_draws=1)
    with pytest.raises(ValueError, match="num_draws"):
        per_example_gradients(model, images, [0, 1, 2, 3], num_draws=-2)


@pytest.mark.parametrize("measurement", ["trajectory_logprob", "journey_trak", "journey_trak=step:3"])
def test_trajectory_measurements_equal_autograd_loop(model, measurement):
    from diffinfluence_widgets.diffusion.sampling import sample
    res = sample(model, 2, seed=4, num_inference_steps=6, keep_trajectory=True)
    traj = res.trajectory
    ids = [21, 22]
    got = per_example_gradients(model, res.images.to(DT), ids, measurement, num_draws=4, trajectory=traj,
                                batch_size=1, max_rows=2)
    meas = get_measurement(measurement)
    layers = tracked_layers(model.unet)
    model.unet.eval()
    for i in range(2):
        model.unet.zero_grad(set_to_none=True)
        tr = traj.select(slice(i, i + 1)).to(dtype=DT)
        d = meas.draws(model, [ids[i]], 4, 0, trajectory=tr).to(dtype=DT)
        meas.per_draw(model, res.images[i:i + 1].to(DT), d, tr).mean().backward()
        for n, m in layers.items():
            if m.weight.grad is None:
                continue
            r = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                r = torch.cat([r, m.bias.grad[:, None]], 1)
            assert float((got.layers[n][i] - r).norm() / r.norm().clamp_min(1e-300)) <= 1e-5, (measurement, n)
    model.unet.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="trajectory"):
        per_example_gradients(model, res.images.to(DT), ids, measurement, num_draws=2)
