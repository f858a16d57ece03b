"""The relative damping rule λ = rel · τ (τ the curvature's mean eigenvalue): scale-free where an absolute λ is not.

Multiplying the loss by c multiplies the GGN (and its (E)K-FAC eigenvalues, so τ) and every gradient by c. With
λ = rel · τ each score becomes c² gᵀ(cG + c·rel·τ I)⁻¹g = c · s: rankings are identical. With the same absolute λ
the effective damping becomes λ / c and the scores are no longer proportional. Checked on a real tiny UNet in float64,
the scaled problem fitted from scratch (network output and target multiplied by √c, so the loss is c · ℓ).
"""
from __future__ import annotations

import pytest
import torch

from diffinfluence_widgets.config import relative_damping
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.influence.capture import frozen_eval
from diffinfluence_widgets.influence.curvature import (Curvature, FactorProblem, _diffusion_problem, fit_curvature,
                                                        fit_factors)
from diffinfluence_widgets.influence.scores import compute_scores
from diffinfluence_widgets.measurements.losses import Loss

torch.set_num_threads(1)
DT = torch.float64
C = 7.0


class DS:
    def __init__(self, images, ids):
        self.images, self.ids = images, torch.as_tensor(ids)

    def fingerprint(self):
        return f"ds-{len(self.ids)}"


class ScaledLoss(Loss):
    """c · the training loss, differentiated by autograd like any measurement."""

    def __init__(self, c: float):
        self.c, self.name = float(c), f"loss*{c:g}"

    def per_draw(self, model, images, draws, trajectory=None):
        return self.c * super().per_draw(model, images, draws, trajectory)


def curvature_of_scaled_loss(model, train, c: float, num_draws: int, seed: int) -> Curvature:
    """EK-FAC of the GGN^model of c · ℓ: the diffusion problem with output and target multiplied by √c."""
    prob = _diffusion_problem(model, train.images, train.ids, num_draws=num_draws, seed=seed, batch_size=32,
                              max_rows=512, dev=model.device, dtype=DT)
    r = c ** 0.5

    def batches():
        for fwd in prob.batches():
            def scaled(fwd=fwd):
                out, target, z = fwd()
                return r * out, r * target, z
            yield scaled

    with frozen_eval(model.unet):
        fitted = fit_factors(FactorProblem(prob.layers, batches, prob.num_batches, prob.root), method="ekfac")
    return Curvature.from_factors(fitted)


@pytest.fixture(scope="module")
def problem():
    model = DiffusionModel.from_config(tiny_unet_config(), seed=0).to(dtype=DT)
    g = torch.Generator().manual_seed(3)
    train = DS(torch.rand(12, 1, 8, 8, generator=g, dtype=DT) * 2 - 1, list(range(20, 32)))
    queries = torch.rand(3, 1, 8, 8, generator=g, dtype=DT) * 2 - 1
    curv1 = curvature_of_scaled_loss(model, train, 1.0, num_draws=3, seed=1)
    curvc = curvature_of_scaled_loss(model, train, C, num_draws=3, seed=1)
    return model, train, queries, curv1, curvc


def _scores(problem, curv, meas, **damping):
    model, train, queries, *_ = problem
    return compute_scores(model, curv, queries, [0, 1, 2], train, measurement=meas, train_measurement=meas,
                          num_draws=3, train_num_draws=3, progress=False, **damping)


def test_scaled_problem_is_the_real_curvature_scaled(problem):
    model, train, _, curv1, curvc = problem
    ref = fit_curvature(model, train, num_draws=3, seed=1, progress=False)  # the library's own fit, c = 1
    for n in ref.layer_names:
        assert torch.allclose(curv1.eigenvalues[n], ref.eigenvalues[n], rtol=1e-9, atol=1e-18)
        assert torch.allclose(curvc.eigenvalues[n], C * ref.eigenvalues[n], rtol=1e-8, atol=1e-18)
    assert curvc.mean_eigenvalue() == pytest.approx(C * curv1.mean_eigenvalue(), rel=1e-9)
    # τ is the mean of every eigenvalue of the block-diagonal matrix (trace / size)
    evs = torch.cat([ref.eigenvalues[n].reshape(-1) for n in ref.layer_names])
    assert ref.mean_eigenvalue() == pytest.approx(float(evs.mean()), rel=1e-12)


@pytest.mark.parametrize("rel", [1e-8, 1.0])
def test_relative_damping_gives_identical_rankings_when_the_loss_is_scaled(problem, rel):
    *_, curv1, curvc = problem
    s1 = _scores(problem, curv1, "loss", relative_damping=rel)
    sc = _scores(problem, curvc, ScaledLoss(C), relative_damping=rel)
    assert sc.settings["damping"] == pytest.approx(C * s1.settings["damping"], rel=1e-9)
    assert sc.settings["relative_damping"] == rel and sc.settings["curvature_scale"] > 0
    assert torch.allclose(sc.matrix, C * s1.matrix, rtol=1e-7, atol=0)
    assert torch.equal(torch.argsort(sc.matrix, dim=1), torch.argsort(s1.matrix, dim=1))


def test_absolute_damping_is_not_scale_free(problem):
    *_, curv1, curvc = problem
    lam = curv1.mean_eigenvalue()  # an absolute λ where damping matters
    s1 = _scores(problem, curv1, "loss", damping=lam)
    sc = _scores(problem, curvc, ScaledLoss(C), damping=lam)
    ratio = sc.matrix / s1.matrix
    assert float(ratio.max() - ratio.min()) > 0.05 * C  # no longer c · s: the effective damping became λ / c
    assert not torch.equal(torch.argsort(sc.matrix, dim=1), torch.argsort(s1.matrix, dim=1))


def test_relative_damping_errors_name_the_value(problem):
    model, train, queries, curv1, _ = problem
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="relative damping"):
            relative_damping(bad, 1.0)
    with pytest.raises(ValueError, match="curvature scale"):
        relative_damping(1e-2, 0.0)
    with pytest.raises(ValueError, match="not both"):
        compute_scores(model, curv1, queries, [0, 1, 2], train, damping=1e-3, relative_damping=1e-2, progress=False)
    with pytest.raises(ValueError, match="needs a curvature"):
        compute_scores(model, None, queries, [0, 1, 2], train, relative_damping=1e-2, progress=False)
    assert relative_damping(1e-2, 3.0) == pytest.approx(3e-2)
