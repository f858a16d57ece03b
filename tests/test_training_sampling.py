"""Training (EMA, determinism, resume), sampling (seeds, trajectories, the reverse-step Gaussian), save/load."""
from __future__ import annotations

import copy

import pytest
import torch

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import (DiffusionModel, TrainConfig, TrainingInterrupted, posterior_mean_variance,
                                             previous_timesteps, sample, train_model)
from diffinfluence_widgets.diffusion.draws import example_generator
from diffinfluence_widgets.diffusion.sampling import SAMPLING_STREAM
from diffinfluence_widgets.diffusion.train import CHECKPOINT_NAME
from diffinfluence_widgets.measurements import measure


def _same_weights(a: DiffusionModel, b: DiffusionModel) -> bool:
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- TrainConfig
def test_train_config_validation_and_presets():
    assert TrainConfig.tiny().steps < TrainConfig.demo().steps
    assert TrainConfig.demo(steps=7).steps == 7 and TrainConfig.tiny().replace(lr=1e-3).lr == 1e-3
    for bad, match in [(dict(steps=0), "steps must be a positive integer, got 0"),
                       (dict(batch_size=2.5), "batch_size"), (dict(lr=-1.0), "lr must be a positive"),
                       (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"), (dict(warmup=-1), "warmup"),
                       (dict(grad_clip=0), "grad_clip"), (dict(lr_schedule="linear"), "lr_schedule")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


# ---------------------------------------------------------------------- training
def test_training_is_deterministic_order_free_and_leaves_the_input_alone(tiny_model, tiny_digits):
    cfg = TrainConfig.tiny(steps=8)
    before = tiny_model.fingerprint()
    a = train_model(tiny_model, tiny_digits, cfg, progress=False)
    assert tiny_model.fingerprint() == before  # trains a copy
    b = train_model(tiny_model, tiny_digits.subset(tiny_digits.ids.flip(0)), cfg, progress=False)
    assert _same_weights(a, b)  # same seed, same ids in another order -> identical weights
    c = train_model(tiny_model, tiny_digits, cfg.replace(seed=1), progress=False)
    assert not _same_weights(a, c)
    assert all(p.requires_grad for p in a.unet.parameters()) and not a.unet.training


def test_returns_ema_weights(tiny_model, tiny_digits):
    # constant lr and no warm-up, so a shorter run is a prefix of a longer one
    cfg = TrainConfig.tiny(steps=3, lr_schedule="constant", warmup=0, ema_decay=0.5)
    raws = [tiny_model.unet.state_dict()]
    for k in (1, 2, 3):
        ema, raw = train_model(tiny_model, tiny_digits, cfg.replace(steps=k), progress=False, return_raw=True)
        raws.append(raw.unet.state_dict())
    assert not _same_weights(ema, raw)
    expect = {n: v.clone() for n, v in raws[0].items()}
    for k in (1, 2, 3):  # effective decay min(0.5, k / (k + 9)) at step k - 1
        d = min(0.5, k / (k + 9))
        expect = {n: d * expect[n] + (1 - d) * raws[k][n] for n in expect}
    got = ema.unet.state_dict()
    assert all(torch.allclose(got[n], expect[n], atol=1e-6) for n in got)
    no_avg_ema, no_avg_raw = train_model(tiny_model, tiny_digits, cfg.replace(ema_decay=0.0), progress=False,
                                         return_raw=True)
    assert _same_weights(no_avg_ema, no_avg_raw)  # decay 0: the EMA is the raw model
    assert _same_weights(no_avg_raw, raw)  # the EMA never feeds back into training


def test_training_lowers_the_loss(tiny_model, tiny_digits):
    ids = tiny_digits.ids[:16]
    before = measure(tiny_model, tiny_digits.by_ids(ids), ids, num_draws=16).mean()
    trained = train_model(tiny_model, tiny_digits, TrainConfig.tiny(steps=60, lr=5e-3), progress=False)
    after = measure(trained, tiny_digits.by_ids(ids), ids, num_draws=16).mean()
    assert after < 0.8 * before


def test_resume_equals_uninterrupted(tiny_model, tiny_digits, tmp_path):
    cfg = TrainConfig.tiny(steps=12, checkpoint_every=4)
    full, full_raw = train_model(tiny_model, tiny_digits, cfg, progress=False, return_raw=True)

    class Boom(Exception):
        pass

    def crash(step, loss):
        if step == 7:
            raise Boom

    with pytest.raises(Boom):
        train_model(tiny_model, tiny_digits, cfg, progress=False, checkpoint_dir=tmp_path, callback=crash)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 4
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files
    with pytest.raises(TrainingInterrupted, match="after step 10"):
        train_model(tiny_model, tiny_digits, cfg, progress=False, checkpoint_dir=tmp_path, stop_after=10)
    with pytest.raises(TrainingInterrupted, match="already at step 10"):
        train_model(tiny_model, tiny_digits, cfg, progress=False, checkpoint_dir=tmp_path, stop_after=10)
    steps_seen = []
    resumed, resumed_raw = train_model(tiny_model, tiny_digits, cfg, progress=False, checkpoint_dir=tmp_path,
                                       return_raw=True, callback=lambda s, l: steps_seen.append(s))
    assert steps_seen == [11, 12]
    assert _same_weights(full, resumed) and _same_weights(full_raw, resumed_raw)
    # a finished checkpoint returns at once; another run's settings are refused
    assert _same_weights(full, train_model(tiny_model, tiny_digits, cfg, progress=False, checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="belongs to another run.*config"):
        train_model(tiny_model, tiny_digits, cfg.replace(lr=1e-3), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        train_model(tiny_model, tiny_digits.subset(tiny_digits.ids[:10]), cfg, progress=False,
                    checkpoint_dir=tmp_path)


def test_training_input_errors(tiny_model, tiny_digits):
    with pytest.raises(ValueError, match=r"this model expects \[B, 1, 8, 8\]"):
        train_model(tiny_model, load_digits(size=16, limit=4), TrainConfig.tiny(), progress=False)
    with pytest.raises(TypeError, match="ImageDataset"):
        train_model(tiny_model, [1, 2, 3], TrainConfig.tiny(), progress=False)


# ---------------------------------------------------------------------- sampling
def test_sampling_seeds_batches_and_trajectory(tiny_model):
    r = sample(tiny_model, 5, seed=3, num_inference_steps=10, keep_trajectory=True, batch_size=2)
    assert r.images.shape == (5, 1, 8, 8) and r.ids.tolist() == [0, 1, 2, 3, 4] and r.seeds.shape == (5,)
    tr = r.trajectory
    assert tr.states.shape == (5, 11, 1, 8, 8) and tr.timesteps.tolist() == sorted(tr.timesteps.tolist())[::-1]
    assert torch.equal(tr.states[:, -1], r.images)
    # x_T is the first draw of the sample's own generator
    g = example_generator(3, 4, SAMPLING_STREAM)
    assert torch.equal(tr.states[4, 0], torch.randn((1, 1, 8, 8), generator=g)[0])
    assert r.seeds[4] == g.initial_seed()
    # reproducible, independent of the batch size (up to the network's float rounding) and of the other samples
    again = sample(tiny_model, seed=3, ids=[4, 1], num_inference_steps=10)
    assert torch.allclose(again.images, r.images[[4, 1]], atol=1e-5)
    assert torch.equal(sample(tiny_model, 5, seed=3, num_inference_steps=10, batch_size=2).images, r.images)
    assert not torch.allclose(sample(tiny_model, 2, seed=4, num_inference_steps=10).images, r.images[:2])
    assert r.images.abs().max() <= 1.0 + 1e-6  # clip_sample: the last step returns the clipped x0
    with pytest.raises(ValueError, match="num_inference_steps must be in 1..1000"):
        sample(tiny_model, 1, num_inference_steps=0)


def test_trajectory_steps_are_the_posterior_gaussian(tiny_model):
    """Each stored x_{prev} = mean + sqrt(variance) z, z the sample's next generator draw."""
    r = sample(tiny_model, 2, seed=1, num_inference_steps=25, keep_trajectory=True)
    ts, prev = r.trajectory.timesteps, previous_timesteps(r.trajectory.timesteps)
    gens = [example_generator(1, i, SAMPLING_STREAM) for i in range(2)]
    for g in gens:
        torch.randn((1, 1, 8, 8), generator=g)  # x_T
    assert ts[-1] == 0 and prev[-1] == -1 and torch.equal(prev[:-1], ts[1:])
    for k in range(len(ts)):
        z = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in gens]) if ts[k] > 0 else 0
        x = r.trajectory.states[:, k]
        with torch.no_grad():
            eps = tiny_model.predict_noise(x, ts[k].expand(2))
        mean, var = posterior_mean_variance(tiny_model, x, eps, ts[k], prev[k])
        assert torch.allclose(mean + var.sqrt() * z, r.trajectory.states[:, k + 1], atol=1e-5)


def test_posterior_mean_variance_matches_scheduler_step(tiny_model):
    sched = copy.deepcopy(tiny_model.scheduler)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 1, 8, 8, generator=g) * 1.5, torch.randn(3, 1, 8, 8, generator=g)
    abar = tiny_model.const("alphas_cumprod", torch.device("cpu"))
    for num_steps in (None, 20):
        s = copy.deepcopy(sched)
        if num_steps:
            s.set_timesteps(num_steps)
        ts = s.timesteps if num_steps else torch.tensor([999, 500, 3, 1, 0])
        prev = previous_timesteps(ts) if num_steps else ts - 1
        for t, p in zip(ts, prev):
            mean, var = posterior_mean_variance(tiny_model, x, eps, t, p if num_steps else None)
            # exact mean: scheduler.step with its noise switched off
            s._get_variance = lambda *a, **k: torch.tensor(0.0)
            assert torch.equal(s.step(eps, t, x).prev_sample, mean)
            # variance: beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev); none at t = 0
            a_t, a_p = abar[int(t)], abar[int(p)] if p >= 0 else torch.tensor(1.0, dtype=torch.float64)
            expect = 0.0 if t == 0 else float((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            # rtol: the scheduler forms 1 - abar_t / abar_prev in float32 (cancellation near t = 0)
            assert var.shape == (3, 1, 1, 1) and torch.allclose(var.double(), torch.full_like(var.double(), expect),
                                                                rtol=2e-3, atol=1e-12)
            del s._get_variance
            # with noise: step = mean + sqrt(var) z for the generator's draw z
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
            out = s.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
            assert torch.allclose(out, mean + var.sqrt() * z, atol=1e-6)
    # per-example timesteps and gradients through eps
    e = eps.clone().requires_grad_(True)
    mean, var = posterior_mean_variance(tiny_model, x, e, torch.tensor([10, 500, 999]))
    mean.sum().backward()
    assert e.grad is not None and var.flatten().unique().numel() == 3
    with pytest.raises(ValueError, match="prev_t < t"):
        posterior_mean_variance(tiny_model, x, eps, 5, 5)


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    back = DiffusionModel.from_pretrained(tmp_path / "m")
    assert back.fingerprint() == tiny_model.fingerprint()
    x, t = torch.randn(2, 3, 1, 8, 8), torch.tensor([[0, 10, 999], [5, 500, 998]])
    with torch.no_grad():
        assert torch.equal(back.predict_noise(x, t), tiny_model.predict_noise(x, t))
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.scheduler.config) == public(tiny_model.scheduler.config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusionModel.from_pretrained(tmp_path / "missing")


def test_load_local_ddpm_pipeline_folder(tiny_model, tmp_path):
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=tiny_model.unet, scheduler=tiny_model.scheduler).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    back = DiffusionModel.from_pretrained(tmp_path / "pipe")
    assert back.fingerprint() == tiny_model.fingerprint()
    a = sample(back, 2, num_inference_steps=5).images
    assert torch.equal(a, sample(tiny_model, 2, num_inference_steps=5).images)
