"""Tests of the measurement proxies (method.md §3) against hand computations."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from diffinfluence_widgets.diffusion.draws import NoiseDraws
from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.measurements import (
    ELBO, MEASUREMENTS, Measurement, Trajectory, TrajectoryLogProb, band_masks,
    ddpm_step_mean_variance, discretized_gaussian_log_prob, elbo_weights, get_measurement, measure,
    timestep_bands,
)

torch.set_num_threads(1)

NON_TRAJECTORY = ["loss", "loss_at_t=37", "elbo_simplified", "square_norm", "elbo", "elbo=nats"]
TRAJECTORY = ["trajectory_logprob", "trajectory_logprob=nats", "journey_trak", "journey_trak=step:3",
              "journey_trak=t:500"]
ALL = NON_TRAJECTORY + TRAJECTORY


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def model(tiny_model) -> DiffusionModel:
    """conftest's tiny UNet (1×8×8, seed 0) in float64, so that hand computations agree to ~1e-10."""
    return tiny_model.to(dtype=torch.float64)


@pytest.fixture
def images(tiny_digits) -> torch.Tensor:
    """Four real digits, plus random 8-bit pixels in one image and pixels exactly at -1 and +1."""
    x = tiny_digits.images[:4].to(torch.float64).clone()
    g = torch.Generator().manual_seed(1)
    x[3] = torch.randint(0, 256, (1, 8, 8), generator=g).double() / 255 * 2 - 1
    x[:, :, 0, :2] = -1.0
    x[:, :, -1, -2:] = 1.0
    return x


def _sample(model: DiffusionModel, n: int, num_steps: int, seed: int = 0):
    """A DDPM trajectory made with ``DDPMScheduler.step``, plus the unit noises z_k and std devs it used."""
    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(num_steps)
    dtype = model.dtype
    x = torch.randn(n, *model.image_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    states, zs, stds = [x], [], []
    for k, t in enumerate(sched.timesteps):
        with torch.no_grad():
            eps = model.unet(x, t).sample
        s = 1000 * seed + k + 1
        x = sched.step(eps, t, x, generator=torch.Generator().manual_seed(s)).prev_sample
        zs.append(torch.randn(x.shape, generator=torch.Generator().manual_seed(s), dtype=dtype))
        stds.append(float(sched._get_variance(t)) ** 0.5 if t > 0 else 0.0)
        states.append(x)
    return Trajectory(sched.timesteps.clone(), torch.stack(states, 1)), zs, stds


@pytest.fixture
def traj(model):
    return _sample(model, 4, 10, seed=3)


def _pd(model, meas, images, ids, S, seed=0, trajectory=None):
    m = get_measurement(meas)
    d = m.draws(model, ids, S, seed, trajectory=trajectory)
    return m, d, m.per_draw(model, images, d, trajectory)


def _images_for(name, images, traj):
    return traj[0].states[:, -1] if name in TRAJECTORY else images


def _unet(model, x, t):
    """ε_θ by calling the UNet directly (independent of predict_noise's reshaping)."""
    return model.unet(x, t).sample


# ------------------------------------------------------------------------------------ loss-type measures
def test_loss_equals_hand_computation(model, images):
    m, d, v = _pd(model, "loss", images, [0, 1, 2, 3], 6)
    abar = model.const("alphas_cumprod", torch.device("cpu"))
    for b in range(4):
        for s in range(6):
            t = int(d.timesteps[b, s])
            eps = d.noise[b, s].double()
            x_t = abar[t].sqrt() * images[b] + (1 - abar[t]).sqrt() * eps
            with torch.no_grad():
                pred = _unet(model, x_t[None], torch.tensor([t]))[0]
            assert v[b, s].item() == pytest.approx(((eps - pred) ** 2).mean().item(), rel=1e-10)
    assert measure(model, images, [0, 1, 2, 3], "loss", num_draws=6) == pytest.approx(v.mean(1).detach(), rel=1e-12)


def test_square_norm_is_loss_with_zero_target(model, images):
    _, d, v = _pd(model, "square_norm", images, [0, 1, 2, 3], 5)
    abar = model.const("alphas_cumprod", torch.device("cpu"))
    t = d.timesteps
    a = abar[t].reshape(4, 5, 1, 1, 1)
    x_t = a.sqrt() * images[:, None] + (1 - a).sqrt() * d.noise.double()
    with torch.no_grad():
        pred = _unet(model, x_t.reshape(20, 1, 8, 8), t.reshape(20)).reshape(4, 5, 1, 8, 8)
    target = torch.zeros_like(pred)
    assert torch.allclose(v, (target - pred).pow(2).mean((2, 3, 4)), rtol=1e-10, atol=0)


def test_elbo_simplified_weights_and_value(model, images):
    T = model.num_train_timesteps
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # independent of the model's constants
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    w = betas / (2 * alphas * (1 - abar))
    assert torch.allclose(elbo_weights(model), w, rtol=1e-5, atol=0)
    _, d, v = _pd(model, "elbo_simplified", images, [0, 1, 2, 3], 8)
    loss = get_measurement("loss").per_draw(model, images, d)
    assert torch.allclose(v, w[d.timesteps] * loss, rtol=1e-5, atol=0)


def test_loss_at_t_uses_fixed_timestep(model, images):
    m = get_measurement("loss_at_t=37")
    d = m.draws(model, [0, 1], 4, 0)
    assert bool((d.timesteps == 37).all()) and m.name == "loss_at_t=37" and not m.averages_over_timesteps
    with pytest.raises(ValueError, match="5000"):
        get_measurement("loss_at_t=5000").draws(model, [0], 2, 0)


# --------------------------------------------------------------------------------------------- full ELBO
def _brute_force_terms(model, x0, eps, t):
    """One term of the negative bound (nats per image) from explicit Gaussians (DDPM eqs. 5-7, 13)."""
    betas = model.scheduler.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    with torch.no_grad():
        pred = _unet(model, x_t[None], torch.tensor([t]))[0]
    mu_p = (x_t - betas[t] / (1 - abar[t]).sqrt() * pred) / alphas[t].sqrt()
    if t >= 1:
        mu_q = (abar[t - 1].sqrt() * betas[t] / (1 - abar[t]) * x0
                + alphas[t].sqrt() * (1 - abar[t - 1]) / (1 - abar[t]) * x_t)
        var_q = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
        var_p = betas[t]
        return (0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)).sum()
    sigma = betas[0].sqrt()
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    up = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), x0 + 1 / 255)
    lo = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), x0 - 1 / 255)
    p = cdf((up - mu_p) / sigma) - cdf((lo - mu_p) / sigma)
    return -torch.log(p.clamp_min(1e-12)).sum()


def _prior_kl(model, x0):
    abar = torch.cumprod(1 - model.scheduler.betas.double(), 0)[-1]
    return (0.5 * (-torch.log(1 - abar) + (1 - abar) + abar * x0 ** 2 - 1)).sum()


def test_elbo_equals_brute_force_sum_on_tiny_schedule(images):
    T = 10
    m10 = DiffusionModel.from_config(tiny_unet_config(), num_train_timesteps=T, seed=0).to(dtype=torch.float64)
    ids = [0, 1, 2, 3]
    meas = get_measurement("elbo=nats")
    d = meas.draws(m10, ids, T, seed=4)
    # S = T stratified draws visit every timestep exactly once, so the estimate is the full sum
    assert torch.equal(d.timesteps.sort(1).values, torch.arange(T).expand(4, T))
    got = measure(m10, images, ids, "elbo=nats", num_draws=T, seed=4)
    D = images[0].numel()
    for b in range(4):
        brute = sum(_brute_force_terms(m10, images[b], d.noise[b, s].double(), int(d.timesteps[b, s]))
                    for s in range(T)) + _prior_kl(m10, images[b])
        assert got[b].item() == pytest.approx(brute.item(), rel=1e-9)
    bpd = measure(m10, images, ids, "elbo", num_draws=T, seed=4)
    assert torch.allclose(bpd, got / (D * math.log(2)), rtol=1e-12)
    # fewer draws: each term is T * term_t + prior (an unbiased estimate of the sum)
    v = meas.per_draw(m10, images, d.select_draws(slice(0, 3)))
    for b in range(4):
        for s in range(3):
            t = int(d.timesteps[b, s])
            want = T * _brute_force_terms(m10, images[b], d.noise[b, s].double(), t) + _prior_kl(m10, images[b])
            assert v[b, s].item() == pytest.approx(want.item(), rel=1e-9)


def test_elbo_nan_guard(model, images):
    meas = ELBO()
    d = meas.draws(model, [0, 1, 2, 3], 8, 0)
    d = NoiseDraws(torch.cat([torch.zeros(4, 1, dtype=torch.long), d.timesteps[:, 1:]], 1), d.noise)  # t=0 included
    huge = copy.copy(model)
    huge.predict_noise = lambda x_t, t: torch.full_like(x_t, 1e30)
    v = meas.per_draw(huge, images, d)
    assert torch.isfinite(v).all() and v.dtype == torch.float64 and bool((v > 1e3).all())
    bad = copy.copy(model)
    bad.predict_noise = lambda x_t, t: torch.full_like(x_t, float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        meas.per_draw(bad, images, d)
    # the decoder log-probability is finite with finite gradients even far out in the tails
    centred = torch.tensor([-1e6, -5.0, 0.0, 5.0, 1e6], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    lp = discretized_gaussian_log_prob(x, centred, 0.01)
    assert torch.isfinite(lp).all() and bool((lp >= math.log(1e-12) - 1e-9).all()) and bool((lp <= 0).all())
    lp.sum().backward()
    assert torch.isfinite(centred.grad).all()


# ----------------------------------------------------------------------------------- trajectory measures
def test_ddpm_step_mean_variance_matches_scheduler(model):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = 3 * torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)  # large: exercises clip_sample
    for num_steps in (None, 10):
        sched = copy.deepcopy(model.scheduler)
        if num_steps:
            sched.set_timesteps(num_steps)
        for t in ([999, 500, 1, 0] if num_steps is None else sched.timesteps.tolist()):
            prev = int(sched.previous_timestep(t))
            # two runs with different noise z1, z2 recover the scheduler's mean and standard deviation
            o1 = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
            o2 = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(8)).prev_sample
            z1 = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            z2 = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            std = ((o1 - o2) / (z1 - z2)).flatten(1)  # [3, 64], constant
            mean_s = o1 - std.reshape(o1.shape) * z1
            mean, var = ddpm_step_mean_variance(model, x_t, eps, torch.full((3,), t), torch.full((3,), prev))
            assert torch.allclose(mean, mean_s, rtol=0, atol=1e-10), (num_steps, t)
            if t > 0:
                assert torch.allclose(std, var.sqrt()[:, None].expand_as(std), rtol=1e-6, atol=0), (num_steps, t)
            else:
                assert torch.equal(o1, o2)  # no noise at t = 0


def test_trajectory_logprob_equals_hand_computation(model, traj):
    tr, zs, stds = traj
    D = 64
    x_T = tr.states[:, 0]
    hand = -0.5 * (x_T ** 2 + math.log(2 * math.pi)).flatten(1).sum(1)
    steps = [k for k, t in enumerate(tr.timesteps.tolist()) if t > 0]
    assert len(steps) == 9  # the final t = 0 step is deterministic and left out
    per_step = {}
    for k in steps:
        per_step[k] = -0.5 * (zs[k] ** 2 + math.log(2 * math.pi * stds[k] ** 2)).flatten(1).sum(1)
        hand = hand + per_step[k]
    ids = [10, 11, 12, 13]
    got = measure(model, tr.states[:, -1], ids, "trajectory_logprob=nats", trajectory=tr)
    assert torch.allclose(got, hand, rtol=1e-6, atol=0)  # the scheduler rounds σ to float32
    bpd = measure(model, tr.states[:, -1], ids, "trajectory_logprob", trajectory=tr)
    assert torch.allclose(bpd, got / (D * math.log(2)), rtol=1e-12)
    # S < K': draws are stochastic steps, each term K' * log N(step) + log p(x_T)
    meas = TrajectoryLogProb("nats")
    d = meas.draws(model, ids, 4, seed=1, trajectory=tr)
    assert d.timesteps.shape == (4, 4) and bool((d.timesteps > 0).all())
    v = meas.per_draw(model, tr.states[:, -1], d, tr)
    prior = -0.5 * (x_T ** 2 + math.log(2 * math.pi)).flatten(1).sum(1)
    pos = {t: k for k, t in enumerate(tr.timesteps.tolist())}
    for b in range(4):
        for s in range(4):
            k = pos[int(d.timesteps[b, s])]
            assert v[b, s].item() == pytest.approx((9 * per_step[k][b] + prior[b]).item(), rel=1e-6)
    assert meas.higher_is_better and meas.needs_trajectory


def test_journey_trak_hand_computation_and_detached_x0(model, traj):
    tr = traj[0]
    imgs = tr.states[:, -1]
    ids = [10, 11, 12, 13]
    meas = get_measurement("journey_trak=step:3")
    d = meas.draws(model, ids, 5, seed=2, trajectory=tr)
    t = int(tr.timesteps[3])
    assert bool((d.timesteps == t).all()) and not meas.averages_over_timesteps
    abar = model.const("alphas_cumprod", torch.device("cpu"))[t]
    x_t = tr.states[:, 3]
    with torch.no_grad():
        eps_hat = _unet(model, x_t, torch.full((4,), t))
    x0 = ((x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()).clamp(-1, 1)
    x_n = abar.sqrt() * x0[:, None] + (1 - abar).sqrt() * d.noise.double()
    pred = _unet(model, x_n.reshape(20, 1, 8, 8), torch.full((20,), t)).reshape(4, 5, 1, 8, 8)
    hand = (d.noise.double() - pred).pow(2).mean((2, 3, 4))
    v = meas.per_draw(model, imgs, d, tr)
    assert torch.allclose(v, hand, rtol=1e-9, atol=0)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(v.mean(1).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(hand.mean(1).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    # the same step addressed by timestep, and the all-steps average visits every step S/K times
    assert get_measurement(f"journey_trak=t:{t}").draws(model, ids, 5, 2, trajectory=tr).timesteps.eq(t).all()
    da = get_measurement("journey_trak").draws(model, ids, 20, 0, trajectory=tr)
    for b in range(4):
        assert sorted(da.timesteps[b].tolist()) == sorted(tr.timesteps.tolist() * 2)


# ---------------------------------------------------------------------------- generic contract checks
@pytest.mark.parametrize("name", ALL)
def test_band_decomposition_adds_up(model, images, traj, name):
    meas = get_measurement(name)
    tr = traj[0] if meas.needs_trajectory else None
    x = _images_for(name, images, traj)
    d = meas.draws(model, [0, 1, 2, 3], 12, 0, trajectory=tr)
    v = meas.per_draw(model, x, d, tr).detach()
    ts = meas.draw_timesteps(d, tr)
    assert ts.shape == v.shape
    for nb in (1, 3, 4):
        masks = band_masks(ts, timestep_bands(model.num_train_timesteps, nb))
        parts = torch.stack([(v * mk).mean(1) for mk in masks])
        assert torch.allclose(parts.sum(0), v.mean(1), rtol=1e-12, atol=1e-12)
    assert isinstance(meas.averages_over_timesteps, bool)


@pytest.mark.parametrize("name", ALL)
def test_common_random_numbers(model, images, traj, name):
    meas = get_measurement(name)
    tr = traj[0] if meas.needs_trajectory else None
    x = _images_for(name, images, traj)
    ids = [5, 3, 9, 1]
    full = measure(model, x, ids, name, num_draws=8, seed=11, trajectory=tr, batch_size=4)
    again = measure(model, x, ids, name, num_draws=8, seed=11, trajectory=tr, batch_size=1, draw_chunk=3)
    perm = [2, 0, 3, 1]
    permuted = measure(model, x[perm], [ids[i] for i in perm], name, num_draws=8, seed=11,
                       trajectory=tr.select(perm) if tr is not None else None, batch_size=3)
    assert torch.allclose(again, full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(permuted, full[perm], rtol=1e-10, atol=1e-12)
    # draws depend only on (seed, id): the same for an example alone or in a batch
    d_all = meas.draws(model, ids, 8, 11, trajectory=tr)
    d_one = meas.draws(model, [9], 8, 11, trajectory=tr)
    assert torch.equal(d_all.timesteps[2], d_one.timesteps[0]) and torch.equal(d_all.noise[2], d_one.noise[0])
    other = measure(model, x, ids, name, num_draws=8, seed=12, trajectory=tr)
    if name not in ("trajectory_logprob", "trajectory_logprob=nats"):  # exact sum: no randomness at S >= K'
        assert not torch.allclose(other, full)


@pytest.mark.parametrize("name", ALL)
def test_network_called_only_through_predict_noise_example_major(model, images, traj, name):
    meas = get_measurement(name)
    tr = traj[0] if meas.needs_trajectory else None
    x = _images_for(name, images, traj)[:3]
    tr3 = tr.select(slice(0, 3)) if tr is not None else None
    wrapped = copy.copy(model)
    shapes, unet_calls = [], []
    orig = model.predict_noise

    def spy(x_t, t):
        shapes.append(tuple(x_t.shape))
        return orig(x_t, t)

    wrapped.predict_noise = spy
    h = model.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    try:
        d = meas.draws(model, [0, 1, 2], 6, 0, trajectory=tr3)
        v = meas.per_draw(wrapped, x, d, tr3)
    finally:
        h.remove()
    assert v.shape == (3, d.num_draws)
    assert shapes and len(unet_calls) == len(shapes)
    assert all(len(s) == 5 and s[0] == 3 for s in shapes)
    # every network call is in the backward graph and receives an output gradient (what the hooks rely on)
    got_grad = []

    def fwd(module, inputs, output):
        got_grad.append(False)
        i = len(got_grad) - 1
        assert output.sample.requires_grad
        output.sample.register_hook(lambda g: got_grad.__setitem__(i, bool(torch.isfinite(g).all())))

    h = model.unet.register_forward_hook(fwd)
    try:
        meas.per_draw(model, x, d, tr3).sum().backward()
    finally:
        h.remove()
        model.unet.zero_grad(set_to_none=True)
    assert got_grad and all(got_grad)
    # no mixing of examples: example 1 alone gives the same terms as inside the batch
    d1 = NoiseDraws(d.timesteps[1:2], d.noise[1:2])
    v1 = meas.per_draw(model, x[1:2], d1, tr3.select(slice(1, 2)) if tr3 is not None else None)
    assert torch.allclose(v1[0], v[1], rtol=1e-10, atol=1e-12)


def test_registry_and_attributes():
    assert set(MEASUREMENTS) >= {"loss", "loss_at_t", "elbo_simplified", "square_norm", "elbo",
                                 "trajectory_logprob", "journey_trak"}
    for name in ALL:
        m = get_measurement(name)
        assert isinstance(m, Measurement) and m.name == name
        assert get_measurement(m) is m
    assert get_measurement("journey_trak=4").name == "journey_trak=step:4"
    assert get_measurement("trajectory_logprob").higher_is_better
    assert not any(get_measurement(n).higher_is_better for n in NON_TRAJECTORY + ["journey_trak"])
    assert get_measurement("journey_trak").averages_over_timesteps
    assert get_measurement("elbo").averages_over_timesteps and get_measurement("trajectory_logprob").averages_over_timesteps


@pytest.mark.parametrize("bad, fragment", [
    ("nonsense", "nonsense"), ("Loss", "Loss"), ("loss=3", "loss=3"), ("loss_at_t", "loss_at_t"),
    ("loss_at_t=abc", "abc"), ("loss_at_t=-3", "-3"), ("loss_at_t=2.5", "2.5"), ("elbo=furlongs", "furlongs"),
    ("journey_trak=step:x", "step:x"), ("journey_trak=bogus", "bogus"), ("journey_trak=", "journey_trak="),
    ("trajectory_logprob=meters", "meters"), ("square_norm=1", "square_norm=1"),
])
def test_bad_names_raise_clear_value_errors(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.").replace("+", r"\+")):
        get_measurement(bad)


def test_bad_arguments_raise(model, images, traj):
    with pytest.raises(TypeError):
        get_measurement(3)
    with pytest.raises(ValueError, match="trajectory"):
        measure(model, images, [0, 1, 2, 3], "trajectory_logprob")
    with pytest.raises(ValueError, match="4 examples"):
        measure(model, images[:2], [0, 1], "journey_trak", trajectory=traj[0])
    with pytest.raises(ValueError, match="step 40"):
        get_measurement("journey_trak=step:40").draws(model, [0], 2, 0, trajectory=traj[0])
    with pytest.raises(ValueError, match="timestep 501"):
        get_measurement("journey_trak=t:501").draws(model, [0], 2, 0, trajectory=traj[0])
    with pytest.raises(ValueError, match="num_bands"):
        timestep_bands(1000, 0)
    with pytest.raises(ValueError, match="cover"):
        band_masks(torch.tensor([[5, 700]]), [(0, 500)])
    desc = Trajectory(torch.tensor([1, 5]), torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="descending"):
        get_measurement("journey_trak").draws(model, [0], 2, 0, trajectory=desc)
    with pytest.raises(ValueError, match="ids"):
        measure(model, images, [0, 1], "loss")


def test_trajectory_logprob_nan_guard(model, traj):
    tr = traj[0]
    bad = copy.copy(model)
    bad.predict_noise = lambda x_t, t: torch.full_like(x_t, float("nan"))
    meas = get_measurement("trajectory_logprob")
    d = meas.draws(model, [0, 1, 2, 3], 3, 0, trajectory=tr)
    with pytest.raises(FloatingPointError, match="non-finite"):
        meas.per_draw(bad, tr.states[:, -1], d, tr)


def test_with_team_sampler(model):
    """The team's sampler: its trajectory is more likely under the model that generated it than under another."""
    sampling = pytest.importorskip("diffinfluence_widgets.diffusion.sampling")
    res = sampling.sample(model, 3, seed=0, keep_trajectory=True, num_inference_steps=8)
    tr = res.trajectory
    ids = res.ids.tolist()
    own = measure(model, res.images.to(model.dtype), ids, "trajectory_logprob", trajectory=tr)
    other_model = DiffusionModel.from_config(tiny_unet_config(), seed=5).to(dtype=torch.float64)
    other = measure(other_model, res.images.to(model.dtype), ids, "trajectory_logprob", trajectory=tr)
    assert torch.isfinite(own).all() and bool((own > other).all())
    jt = measure(model, res.images.to(model.dtype), ids, "journey_trak=step:2", trajectory=tr, num_draws=4)
    assert torch.isfinite(jt).all() and bool((jt > 0).all())


@pytest.mark.parametrize("name", ["elbo", "trajectory_logprob", "journey_trak", "journey_trak=step:2"])
def test_float32_model_and_hook_gradients_match_autograd(tiny_model, name):
    """On the float32 model, per-example gradients recovered from Conv2d/Linear hooks on one batched backward
    pass equal autograd gradients of each example's measurement alone (no mixing, every call captured)."""
    capture = pytest.importorskip("diffinfluence_widgets.influence.capture")
    sampling = pytest.importorskip("diffinfluence_widgets.diffusion.sampling")
    m = tiny_model
    m.unet.eval()
    res = sampling.sample(m, 3, seed=1, keep_trajectory=True, num_inference_steps=6)
    meas = get_measurement(name)
    tr = res.trajectory if meas.needs_trajectory else None
    x = res.images
    d = meas.draws(m, [0, 1, 2], 6, 0, trajectory=tr)
    layers = capture.tracked_layers(m.unet)
    names = list(layers)[:4] + list(layers)[-2:]
    with capture.LayerCapture(layers) as cap:
        with torch.enable_grad():
            v = meas.per_draw(m, x, d, tr)
            assert v.shape == (3, d.num_draws) and torch.isfinite(v).all()
            (v.sum() / d.num_draws).backward()
        hooked = {}
        for nm in names:
            acc = 0
            for rec in cap.calls(nm):
                k = rec.a.shape[0] // 3
                a = rec.a.reshape(3, k * rec.a.shape[1], -1)
                b = rec.b.reshape(3, k * rec.b.shape[1], -1)
                acc = acc + torch.einsum("nro,nri->noi", b, a)
            hooked[nm] = acc
    for i in range(3):
        vi = meas.per_draw(m, x[i:i + 1], d.select_examples(slice(i, i + 1)),
                           tr.select(slice(i, i + 1)) if tr is not None else None).mean(1).sum()
        for nm in names:
            L = layers[nm]
            ps = [L.weight] + ([L.bias] if L.bias is not None else [])
            gs = torch.autograd.grad(vi, ps, retain_graph=True)
            full = torch.cat([gs[0].flatten(1)] + ([gs[1][:, None]] if len(gs) > 1 else []), 1)
            assert torch.isfinite(full).all()
            assert (hooked[nm][i] - full).norm() <= 1e-4 * full.norm() + 1e-8, (name, nm, i)


def test_stratified_draws_have_uniform_marginal_so_T_times_term_is_unbiased():
    """ELBO and trajectory_logprob scale a draw's term by the number of terms; that is unbiased because every
    stratified draw's timestep is marginally uniform, also when S does not divide T."""
    from diffinfluence_widgets.diffusion.draws import draw_noise
    T, S, n = 10, 3, 4000
    d = draw_noise(range(n), S, (1, 1, 1), T, seed=0)
    freq = torch.bincount(d.timesteps.flatten(), minlength=T).double() / (n * S)
    assert torch.allclose(freq, torch.full((T,), 1 / T, dtype=torch.float64), atol=0.01)


def test_draws_follow_each_ids_own_generator_in_any_batch():
    """An id's draws are its own generator's numbers in a fixed order (stratum offsets, stratum order, then ε),
    whatever the batch around it: the batched arithmetic equals the one-example formula exactly."""
    from diffinfluence_widgets.diffusion.draws import draw_noise, example_generator
    T, S, shape = 1000, 6, (2, 3, 3)
    ids = [41, 7, 7, 123456]
    d = draw_noise(ids, S, shape, T, seed=5, dtype=torch.float64)
    for row, i in enumerate(ids):
        g = example_generator(5, i)
        u = torch.rand(S, generator=g, dtype=torch.float64)
        t = ((torch.arange(S, dtype=torch.float64) + u) * T / S).floor().long()[torch.randperm(S, generator=g)]
        eps = torch.randn((S, *shape), generator=g)
        assert torch.equal(d.timesteps[row], t) and torch.equal(d.noise[row], eps.double())
        assert sorted((t * S // T).tolist()) == list(range(S))  # one timestep per stratum
        alone = draw_noise([i], S, shape, T, seed=5)
        assert torch.equal(alone.timesteps[0], t) and torch.equal(alone.noise[0], eps)
    iid = draw_noise(ids[:1], S, shape, T, seed=5, stratified=False)
    g = example_generator(5, ids[0])
    assert torch.equal(iid.timesteps[0], torch.randint(0, T, (S,), generator=g))
    assert torch.equal(iid.noise[0], torch.randn((S, *shape), generator=g))
    fixed = draw_noise(ids, S, shape, T, seed=5, timestep=17)
    assert (fixed.timesteps == 17).all()
    assert torch.equal(fixed.noise[1], torch.randn((S, *shape), generator=example_generator(5, ids[1])))
    empty = draw_noise([], S, shape, T)
    assert empty.timesteps.shape == (0, S) and empty.noise.shape == (0, S, *shape)
