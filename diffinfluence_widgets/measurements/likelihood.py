"""Likelihood measurements: the DDPM variational bound (ELBO) and the log-probability of a sampling trajectory."""
from __future__ import annotations

import math

import torch

from ..diffusion.draws import NoiseDraws, draw_noise
from ..diffusion.model import DiffusionModel
from ..diffusion.sampling import Trajectory, posterior_mean_variance
from .base import _LOG_EPS, Measurement, _check_finite, _gather_states, _parse_units, _require_trajectory, _step_index

__all__ = ["ELBO", "TrajectoryLogProb", "elbo_terms", "prior_kl", "ddpm_step_mean_variance", "discretized_gaussian_log_prob"]


class _InUnits(Measurement):
    """A likelihood measurement reported in bits/dim (``name``) or nats per image (``name=nats``)."""

    base_name = ""

    def __init__(self, units: str = "bpd"):
        self.units_key = _parse_units(units, self.base_name)
        self.name = self.base_name if self.units_key == "bpd" else f"{self.base_name}=nats"
        self.units = "bits/dim" if self.units_key == "bpd" else "nats per image"

    @classmethod
    def from_arg(cls, arg: str) -> "_InUnits":
        return cls(arg)

def discretized_gaussian_log_prob(x: torch.Tensor, centred: torch.Tensor, sigma: float | torch.Tensor,
                                  num_bins: int = 256) -> torch.Tensor:
    """Elementwise log-probability of the bin of ``x`` under a Gaussian discretised to ``num_bins`` bins on [-1, 1].

    ``centred`` is ``x − μ`` (passed separately so callers can compute it stably). The bins have width
    ``2 / (num_bins − 1)`` and are centred on the data grid; the outermost bins extend to ±∞ (pixels with
    ``x < −0.999`` / ``x > 0.999``, Ho et al. 2020). Probabilities are floored at 1e-12 (log ≥ −27.63), so the
    result is finite for any finite input; where the floor is active the gradient is zero.
    """
    h = 1.0 / (num_bins - 1)
    upper = (centred + h) / sigma
    lower = (centred - h) / sigma
    log_cdf_upper = torch.special.log_ndtr(upper)                # log Φ(upper): bin (−∞, x + h]
    log_sf_lower = torch.special.log_ndtr(-lower)                # log (1 − Φ(lower)): bin [x − h, ∞)
    # Φ(upper) − Φ(lower), evaluated on the side of 0 where it does not cancel
    mid = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                      torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_mid = mid.clamp_min(1e-12).log()
    out = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))
    return out.clamp_min(_LOG_EPS)


def elbo_terms(model: DiffusionModel, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               eps_pred: torch.Tensor) -> torch.Tensor:
    """The per-timestep terms of the negative DDPM bound, in nats per image (float64), shape ``timesteps.shape``.

    For a draw (t, ε) with ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` and ``eps_pred = ε_θ(x_t, t)``:

    * t ≥ 1: ``KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))`` summed over pixels, with p_θ's variance σ_t² = β_t:
      ``D/2 (log(β_t/β̃_t) + β̃_t/β_t − 1) + w_t ‖ε − ε_θ‖²`` (the mean difference written in ε form, exact);
    * t = 0: the decoder NLL ``−log p_θ(x_0 | x_t)``, a Gaussian N(μ_θ(x_t, 0), β_0) discretised to 256 bins,
      with ``x_0 − μ_θ = −√(β_0/α_0) (ε − ε_θ)`` (μ_θ unclipped).
    """
    betas, alphas, abar = (model.const(n, images.device) for n in ("betas", "alphas", "alphas_cumprod"))
    D = images[0].numel()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)            # β̃_t; 0 at t = 0 (unused there)
    kl_const = torch.zeros_like(betas)
    kl_const[1:] = 0.5 * D * (torch.log(betas[1:] / post_var[1:]) + post_var[1:] / betas[1:] - 1)
    w = betas / (2 * alphas * (1 - abar))

    diff = noise.to(torch.float64) - eps_pred.to(torch.float64)          # [B, S, C, H, W]
    t = timesteps.to(images.device)
    terms = kl_const[t] + w[t] * diff.pow(2).flatten(2).sum(-1)          # [B, S]
    dec = t == 0
    if bool(dec.any()):
        x0 = images.to(torch.float64)[:, None].expand_as(diff)[dec]
        centred = -(betas[0] / alphas[0]).sqrt() * diff[dec]
        nll = -discretized_gaussian_log_prob(x0, centred, betas[0].sqrt()).flatten(1).sum(-1)
        terms = terms.index_put(tuple(dec.nonzero().t()), nll)
    return terms


def prior_kl(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """``KL(q(x_{T−1} | x_0) ‖ N(0, I))`` in nats per image (float64, ``[B]``); independent of θ."""
    abar = model.const("alphas_cumprod", images.device)[-1]
    x = images.to(torch.float64)
    per_pix = 0.5 * (abar * x.pow(2) + (1 - abar) - 1 - torch.log1p(-abar))
    return per_pix.flatten(1).sum(-1)


class ELBO(_InUnits):
    """The full negative DDPM variational bound (a loss: lower = better), in bits/dim (default) or nats/image.

    ``−ELBO(x_0) = Σ_{t=1}^{T−1} KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) − log p_θ(x_0|x_{t=0}) + KL(q(x_{T−1}|x_0) ‖ N(0,I))``

    in diffusers' 0-indexed timesteps, with reverse variance σ_t² = β_t (``method.md`` §3), a discretised-Gaussian
    decoder on 256 bins over [-1, 1] (exact for 8-bit data; other values are scored by the bin centred on them)
    and the θ-independent prior KL. The T terms (T−1 KLs + decoder) are estimated as ``T · E_t[term_t]`` over the
    stratified draws: ``per_draw = T · term_{t_s} + prior_kl``, so ``mean_s per_draw`` is an unbiased estimate
    of −ELBO, exact when S = T (stratified draws then visit every t once). ``bpd`` divides by ``D · ln 2``.

    NaN guard (our choice): everything is computed in float64 from ε − ε_θ (no cancellation), the decoder's bin
    probabilities are floored at 1e-12, so any finite network output gives a finite value; a NaN/inf network
    output raises :class:`FloatingPointError` naming the batch rows (never a silent NaN, never a made-up value).
    ``per_draw`` returns float64.
    """

    default_num_draws = 256

    base_name = "elbo"

    def per_draw(self, model, images, draws, trajectory=None):
        noise = draws.noise.to(device=images.device, dtype=images.dtype)
        t = draws.timesteps.to(images.device)
        pred = model.predict_noise(model.add_noise(images[:, None], noise, t), t)
        T = model.num_train_timesteps
        value = T * elbo_terms(model, images, noise, t, pred) + prior_kl(model, images)[:, None]
        if self.units_key == "bpd":
            value = value / (images[0].numel() * math.log(2))
        return _check_finite(value, t, self.name)


# ------------------------------------------------------------------------------------ trajectory measures
_SUPPORTED_VARIANCE = ("fixed_small", "fixed_small_log", "fixed_large")


def _scheduler_abar(model: DiffusionModel, device) -> torch.Tensor:
    """ᾱ exactly as the scheduler's ``step`` uses it (its own float32 cumprod), as float64."""
    return model.scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)


def _check_scheduler(model: DiffusionModel, who: str) -> None:
    cfg = model.scheduler.config
    vt = cfg.get("variance_type", "fixed_small")
    if vt not in _SUPPORTED_VARIANCE:
        raise ValueError(f"{who}: scheduler variance_type={vt!r} is not supported; expected one of "
                         f"{list(_SUPPORTED_VARIANCE)}")


def ddpm_step_mean_variance(model: DiffusionModel, x_t: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor,
                            prev_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``DDPMScheduler.step``: ``x_prev = μ + √var · z`` (``var = 0`` where t = 0).

    ``x_t``/``eps_pred`` are ``[..., C, H, W]``, ``t`` and ``prev_t`` have the leading shape (``prev_t = −1`` after
    the last step). Delegates to :func:`diffinfluence_widgets.diffusion.sampling.posterior_mean_variance`, the
    sampler's own formula (the scheduler's float32 coefficients in its order; x̂_0 clipped or thresholded as
    the scheduler does; variance β̃_t floored at 1e-20 for "fixed_small", β'_t for "fixed_large"), applied to
    float64 states so that the residual x_prev − μ keeps full precision. Returns the mean (float64,
    differentiable in ``eps_pred``) and the variance (float64, leading shape).
    """

    _check_scheduler(model, "ddpm_step_mean_variance")
    lead = x_t.shape[:-3]
    if tuple(eps_pred.shape) != tuple(x_t.shape) or tuple(t.shape) != tuple(lead) or tuple(prev_t.shape) != tuple(lead):
        raise ValueError(f"ddpm_step_mean_variance: x_t {tuple(x_t.shape)}, eps_pred {tuple(eps_pred.shape)}, "
                         f"t {tuple(t.shape)} and prev_t {tuple(prev_t.shape)} disagree")
    flat = (-1, *x_t.shape[-3:])
    mean, var = posterior_mean_variance(model, x_t.reshape(flat).to(torch.float64),
                                        eps_pred.reshape(flat).to(torch.float64),
                                        t.reshape(-1).long().cpu(), prev_t.reshape(-1).long().cpu())
    return mean.reshape(x_t.shape), var.reshape(lead).to(torch.float64)


class TrajectoryLogProb(_InUnits):
    """Log-likelihood of the query's stored DDPM sampling trajectory (higher = better; bits/dim or nats/image).

    ``log p_θ(τ) = log N(x_T; 0, I) + Σ_k log N(x_{k+1}; μ_θ(x_k, t_k), σ_k² I)`` over the stochastic steps of the
    trajectory, with μ_θ and σ_k² exactly those of ``DDPMScheduler.step`` (:func:`ddpm_step_mean_variance`:
    clipped x̂_0 when the scheduler clips, variance β̃ for "fixed_small"). Steps to which the scheduler adds no
    noise (t = 0, or a zero variance) are deterministic — the generated image is a function of the previous
    state — and are left out (their density would be infinite). ``bpd`` divides by ``D · ln 2`` (per dimension of
    one image, even though a trajectory has K+1 images).

    Draws are steps: S steps stratified over the K' stochastic steps (the exact sum, every step once, when
    S ≥ K'); ``draws.timesteps`` holds each step's diffusion timestep and ``per_draw = K' · log N(step) +
    log N(x_T; 0, I)``, so ``mean_s per_draw`` is an unbiased estimate of log p_θ(τ). The draws' noise is unused.

    Sign: a **positive** influence score (removing the training example increases m) means the example makes the
    query's trajectory *less* likely — an opponent; proponents have negative scores. Returns float64; a NaN/inf
    network output raises :class:`FloatingPointError`.
    """

    needs_trajectory = True
    higher_is_better = True
    default_num_draws = 1000

    base_name = "trajectory_logprob"

    @staticmethod
    def stochastic_steps(model: DiffusionModel, trajectory: Trajectory) -> torch.Tensor:
        """Indices k of the steps to which ``DDPMScheduler.step`` adds noise (t > 0 and a positive variance)."""
        _check_scheduler(model, "trajectory_logprob")
        T = model.num_train_timesteps
        ts = trajectory.checked_timesteps(T)
        prev = trajectory.previous_timesteps(T)
        abar = _scheduler_abar(model, "cpu")
        a_prev = torch.where(prev >= 0, abar[prev.clamp_min(0)], torch.ones(ts.shape, dtype=torch.float64))
        cur_beta = 1 - abar[ts] / a_prev
        if model.scheduler.config.get("variance_type", "fixed_small") == "fixed_large":
            var = cur_beta
        else:
            var = (1 - a_prev) / (1 - abar[ts]) * cur_beta
        return ((ts > 0) & (var > 0)).nonzero().flatten()

    def draws(self, model, ids, num_draws, seed=0, *, trajectory=None):
        tr = _require_trajectory(trajectory, None, self.name)
        steps = self.stochastic_steps(model, tr)
        if steps.numel() == 0:
            raise ValueError(f"{self.name}: the trajectory has no stochastic step")
        if int(num_draws) < 1:
            raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
        K = int(steps.numel())
        d = draw_noise(ids, min(int(num_draws), K), model.image_shape, K, seed)
        ts = tr.checked_timesteps(model.num_train_timesteps)
        return NoiseDraws(ts[steps[d.timesteps]], d.noise)

    def per_draw(self, model, images, draws, trajectory=None):
        tr = _require_trajectory(trajectory, images, self.name)
        T = model.num_train_timesteps
        device, dtype = images.device, images.dtype
        K = int(self.stochastic_steps(model, tr).numel())
        k = _step_index(tr, draws.timesteps, T, self.name)
        stochastic = torch.zeros(tr.num_steps, dtype=torch.bool)
        stochastic[self.stochastic_steps(model, tr)] = True
        if not bool(stochastic[k].all()):
            raise ValueError(f"{self.name}: drawn timesteps {sorted(set(draws.timesteps[~stochastic[k]].tolist()))} "
                             "are deterministic steps (no noise added); draw with this measurement's draws()")
        prev = tr.previous_timesteps(T)[k]
        t = draws.timesteps.to(device)
        x_t = _gather_states(tr, k, device, dtype)
        x_next = _gather_states(tr, k + 1, device, dtype)
        eps = model.predict_noise(x_t, t)
        mean, var = ddpm_step_mean_variance(model, x_t, eps, t, prev.to(device))
        D = images[0].numel()
        var = var.reshape(*var.shape, 1)
        resid = (x_next.to(torch.float64) - mean).flatten(2)
        step_lp = -0.5 * (resid.pow(2) / var + torch.log(2 * math.pi * var)).sum(-1)      # [B, S]
        x_T = tr.states[:, 0].to(device=device, dtype=torch.float64).flatten(1)
        prior_lp = -0.5 * (x_T.pow(2) + math.log(2 * math.pi)).sum(-1)                  # [B]
        value = K * step_lp + prior_lp[:, None]
        if self.units_key == "bpd":
            value = value / (D * math.log(2))
        return _check_finite(value, t, self.name)
