"""The measurement proxies m(θ, x) of ``method.md`` §3, one named object each.

Every measurement is a Monte-Carlo average over S draws: ``m(θ, x) = mean_s term(θ, x, draw_s)``. A
measurement object therefore provides

* ``draws(model, ids, num_draws, seed, trajectory=None)`` — the seeded draws (common random numbers across
  models: they depend only on ``(seed, example id, S)`` and, for trajectory measurements, on the trajectory's
  timesteps — never on the model weights, the batch composition or the device), and
* ``per_draw(model, images, draws, trajectory=None)`` — the ``[B, S]`` tensor of terms (differentiable in θ),

so that ``m = per_draw(...).mean(1)`` and the gradient of m is the average of the per-draw gradients. The terms
of different draws are computed independently, so the draws of an example may be split into chunks
(``draws.select_draws``) and the chunk means averaged. Every network call inside ``per_draw`` goes through
``DiffusionModel.predict_noise`` on an example-major batch ``[B, k, C, H, W]`` (row i of the UNet call belongs to
example ``i // k``) and no measurement uses batch statistics, which is what lets
:mod:`diffinfluence_widgets.influence.gradients` recover per-example gradients from one backward pass.

``draws.timesteps`` always holds *diffusion* timesteps (0-indexed, ``0..T-1``), also for the trajectory
measurements (where each drawn timestep names one step of the stored trajectory). Because m is an average over
draws and influence is linear in ∇m, restricting the average to the draws whose timestep lies in a band splits
the value and the score exactly into per-band contributions (:func:`band_masks`, :meth:`Measurement.draw_timesteps`):
``m = Σ_bands mean_s(term_s · mask_band,s)``.

Summary (sign: "higher is better" tells how to read a score, see below):

================================  ==========================================  ======================  ========
name                              m(θ, x)                                     units                   better
================================  ==========================================  ======================  ========
``loss``                          E_{t,ε} mean_pix (ε − ε_θ(x_t,t))²          per pixel               lower
``loss_at_t=<t>``                 E_ε mean_pix (ε − ε_θ(x_t,t))², t fixed     per pixel               lower
``elbo_simplified``               E_t [w_t ℓ_t]                               per pixel               lower
``elbo`` / ``elbo=nats``          negative DDPM variational bound             bits/dim / nats/image   lower
``square_norm``                   E_{t,ε} mean_pix ε_θ(x_t,t)²                per pixel               (D-TRAK)
``trajectory_logprob[=nats]``     log p_θ(sampling trajectory)                bits/dim / nats/image   higher
``journey_trak``                  mean over trajectory steps of the below     per pixel               lower
``journey_trak=step:<k>``         E_ε mean_pix (ε − ε_θ(√ᾱ x̂_0 + √(1−ᾱ) ε, t_k))²   per pixel       lower
================================  ==========================================  ======================  ========

Score sign (``method.md`` §2): a positive score means removing the training example is predicted to *increase*
m. For the loss-like measurements (lower is better) that makes the example a proponent of the query; for
``trajectory_logprob`` (higher is better) a positive score means removing the example is predicted to make the
query's sampling trajectory *more* likely, i.e. the example is an opponent (negate the score to read proponents).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .diffusion.draws import NoiseDraws, draw_noise
from .diffusion.model import DiffusionModel

__all__ = [
    "Measurement", "Trajectory", "MEASUREMENTS", "get_measurement", "measure", "band_masks", "timestep_bands",
    "Loss", "LossAtTimestep", "SimplifiedELBO", "SquareNorm", "ELBO", "TrajectoryLogProb", "JourneyTRAK",
    "elbo_weights", "elbo_terms", "ddpm_step_mean_variance", "discretized_gaussian_log_prob",
]

_LOG_EPS = math.log(1e-12)  # floor of every log-probability term (Ho et al. 2020 clamp probabilities at 1e-12)


@dataclass
class Trajectory:
    """A stored DDPM sampling trajectory (needed by the trajectory measurements).

    ``timesteps`` ``[K]``: the scheduler timesteps visited, in sampling (strictly descending) order — the
    ``scheduler.timesteps`` after ``set_timesteps``; ``states`` ``[B, K + 1, C, H, W]``: ``states[:, 0]`` is x_T
    (the initial noise), ``states[:, k + 1]`` the sample after step k (the last one is the generated image).
    Step k maps ``states[:, k]`` (at diffusion timestep ``timesteps[k]``) to ``states[:, k + 1]`` (at
    ``timesteps[k + 1]``, or the clean image after the last step), exactly as ``DDPMScheduler.step`` does.
    """

    timesteps: torch.Tensor
    states: torch.Tensor

    def __post_init__(self) -> None:
        if self.states.dim() != 5 or self.states.shape[1] != self.timesteps.numel() + 1:
            raise ValueError(f"trajectory states {tuple(self.states.shape)} do not match "
                             f"{self.timesteps.numel()} timesteps (expected [B, K+1, C, H, W])")

    def select(self, idx) -> "Trajectory":
        return Trajectory(self.timesteps, self.states[idx])

    def to(self, device=None, dtype=None) -> "Trajectory":
        return Trajectory(self.timesteps.to(device), self.states.to(device=device, dtype=dtype))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def checked_timesteps(self, num_train_timesteps: int) -> torch.Tensor:
        """The timesteps as a CPU long tensor, after checking they are strictly descending and within 0..T−1."""
        ts = self.timesteps.detach().reshape(-1).to("cpu", torch.long)
        if ts.numel() == 0:
            raise ValueError("the trajectory has no steps")
        if bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"trajectory timesteps must be strictly descending (sampling order), got {ts.tolist()}")
        if int(ts.min()) < 0 or int(ts.max()) >= num_train_timesteps:
            raise ValueError(f"trajectory timesteps {ts.tolist()} are outside the model's range "
                             f"0..{num_train_timesteps - 1}")
        return ts

    def previous_timesteps(self, num_train_timesteps: int) -> torch.Tensor:
        """``[K]``: the timestep each step lands on (``timesteps[k + 1]``; −1 for the last step), as diffusers'
        ``DDPMScheduler.previous_timestep`` does after ``set_timesteps``."""
        ts = self.checked_timesteps(num_train_timesteps)
        return torch.cat([ts[1:], ts.new_tensor([-1])])


class Measurement:
    """Base class: a named proxy ``m(θ, x) = mean_s per_draw(θ, x, draw_s)``."""

    name: str = ""
    #: True when m averages over diffusion timesteps, so that per-timestep-band decomposition is meaningful
    averages_over_timesteps: bool = True
    #: True when the measurement needs the query's sampling trajectory
    needs_trajectory: bool = False
    #: default number of draws (per example) for a reliable per-example value (method.md §1: K ≥ 64)
    default_num_draws: int = 64
    #: False for losses (lower = better); True for log-likelihoods. A positive influence score always means
    #: "removing the training example increases m" (method.md §2).
    higher_is_better: bool = False
    #: units of m, for labels
    units: str = "per pixel"

    def draws(self, model: DiffusionModel, ids: Sequence[int] | torch.Tensor, num_draws: int,
              seed: int = 0, *, trajectory: Trajectory | None = None) -> NoiseDraws:
        """Seeded draws of (t, ε) for each example id; ``trajectory`` is used only by trajectory measurements."""
        return draw_noise(ids, num_draws, model.image_shape, model.num_train_timesteps, seed)

    def per_draw(self, model: DiffusionModel, images: torch.Tensor, draws: NoiseDraws,
                 trajectory: Trajectory | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def draw_timesteps(self, draws: NoiseDraws, trajectory: Trajectory | None = None) -> torch.Tensor:
        """The diffusion timestep each draw is attached to (``[B, S]``), used for band decomposition."""
        return draws.timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _sq_error(model: DiffusionModel, images: torch.Tensor, draws: NoiseDraws, target_zero: bool) -> torch.Tensor:
    noise = draws.noise.to(device=images.device, dtype=images.dtype)
    t = draws.timesteps.to(images.device)
    x_t = model.add_noise(images[:, None], noise, t)
    pred = model.predict_noise(x_t, t)
    target = torch.zeros_like(noise) if target_zero else noise
    return (target - pred).pow(2).flatten(2).mean(-1)  # mean over pixels (method.md §1), shape [B, S]


class Loss(Measurement):
    """The training loss E_{t,ε} mean_pixels (ε − ε_θ(x_t, t))² — the recommended measurement (lower = better)."""

    name = "loss"

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=False)


class LossAtTimestep(Measurement):
    """The loss at one fixed timestep t: E_ε mean_pixels (ε − ε_θ(x_t, t))² (lower = better).

    Written ``"loss_at_t=<t>"``; t is a diffusers 0-indexed timestep in ``0..T−1`` (checked when drawing).
    """

    averages_over_timesteps = False

    def __init__(self, timestep: int):
        if isinstance(timestep, bool) or int(timestep) != timestep or int(timestep) < 0:
            raise ValueError(f"loss_at_t: timestep must be a non-negative integer, got {timestep!r}")
        self.timestep = int(timestep)
        self.name = f"loss_at_t={self.timestep}"

    def draws(self, model, ids, num_draws, seed=0, *, trajectory=None):
        if self.timestep >= model.num_train_timesteps:
            raise ValueError(f"{self.name}: timestep {self.timestep} is outside the model's range "
                             f"0..{model.num_train_timesteps - 1}")
        return draw_noise(ids, num_draws, model.image_shape, model.num_train_timesteps, seed,
                          timestep=self.timestep)

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=False)


def elbo_weights(model: DiffusionModel) -> torch.Tensor:
    """w_t = β_t / (2 α_t (1 − ᾱ_t)) for t = 0..T−1 (float64): the simplified-ELBO weighting of ℓ_t.

    With σ_t² = β_t, ``w_t · D · ℓ_t`` is the mean-dependent part of the KL term at t (DDPM eq. 12 with the
    per-pixel mean ℓ_t instead of a sum).
    """
    betas, alphas, abar = (model.const(n, torch.device("cpu")) for n in ("betas", "alphas", "alphas_cumprod"))
    return betas / (2 * alphas * (1 - abar))


class SimplifiedELBO(Measurement):
    """ELBO* = E_t [w_t ℓ_t] with w_t = β_t / (2 α_t (1 − ᾱ_t)) — a loss (lower is better), per pixel."""

    name = "elbo_simplified"

    def per_draw(self, model, images, draws, trajectory=None):
        w = elbo_weights(model).to(images.device)[draws.timesteps.to(images.device)].to(images.dtype)
        return w * _sq_error(model, images, draws, target_zero=False)


class SquareNorm(Measurement):
    """D-TRAK's square norm E_{t,ε} mean_pixels ε_θ(x_t, t)² — the loss with targets set to zero."""

    name = "square_norm"

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=True)


# ---------------------------------------------------------------------------------------------- full ELBO
def _parse_units(arg: str, who: str) -> str:
    u = str(arg).strip().lower()
    aliases = {"bpd": "bpd", "bits/dim": "bpd", "bits_per_dim": "bpd", "nats": "nats", "nats/image": "nats"}
    if u not in aliases:
        raise ValueError(f"{who}: unknown units {arg!r}; expected 'bpd' (bits per dimension) or 'nats' "
                         "(nats per image)")
    return aliases[u]


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


def _check_finite(value: torch.Tensor, timesteps: torch.Tensor, who: str) -> torch.Tensor:
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()
        ts = sorted(set(timesteps.detach()[bad].cpu().tolist()))
        raise FloatingPointError(
            f"{who}: non-finite value for {len(rows)} example(s) (batch rows {rows[:10]}, timesteps {ts[:10]}). "
            "Log-probabilities are already clamped, so the network output itself is NaN/inf (diverged weights or "
            "non-finite inputs); refusing to return a non-finite measurement")
    return value


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


class ELBO(Measurement):
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

    def __init__(self, units: str = "bpd"):
        self.units_key = _parse_units(units, "elbo")
        self.name = "elbo" if self.units_key == "bpd" else "elbo=nats"
        self.units = "bits/dim" if self.units_key == "bpd" else "nats per image"

    @classmethod
    def from_arg(cls, arg: str) -> "ELBO":
        return cls(arg)

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
    from .diffusion.sampling import posterior_mean_variance  # lazy: sampling imports Trajectory from here

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


def _step_index(trajectory: Trajectory, timesteps: torch.Tensor, T: int, who: str) -> torch.Tensor:
    """Position k in the trajectory of each drawn diffusion timestep (``[B, S]`` long)."""
    ts = trajectory.checked_timesteps(T)
    pos = torch.full((T,), -1, dtype=torch.long)
    pos[ts] = torch.arange(ts.numel())
    t = timesteps.detach().to("cpu", torch.long)
    if bool(((t < 0) | (t >= T)).any()) or bool((pos[t.clamp(0, T - 1)] < 0).any()):
        raise ValueError(f"{who}: drawn timesteps {sorted(set(t.flatten().tolist()))[:10]} are not steps of the "
                         f"trajectory (timesteps {ts.tolist()[:10]}...); draw with trajectory=...")
    return pos[t]


def _require_trajectory(trajectory: Trajectory | None, images: torch.Tensor | None, who: str) -> Trajectory:
    if trajectory is None:
        raise ValueError(f"{who} needs the sampling trajectory of each query (pass trajectory=Trajectory(...), "
                         "e.g. from sample(..., keep_trajectory=True))")
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"{who}: trajectory must be a Trajectory, got {type(trajectory).__name__}")
    if images is not None and trajectory.states.shape[0] != images.shape[0]:
        raise ValueError(f"{who}: trajectory has {trajectory.states.shape[0]} examples but images has "
                         f"{images.shape[0]}; select the matching trajectories (trajectory.select(...))")
    return trajectory


def _gather_states(trajectory: Trajectory, k: torch.Tensor, device, dtype) -> torch.Tensor:
    states = trajectory.states.to(device=device, dtype=dtype)
    rows = torch.arange(states.shape[0], device=device)[:, None]
    return states[rows, k.to(device)]  # [B, S, C, H, W]


class TrajectoryLogProb(Measurement):
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

    def __init__(self, units: str = "bpd"):
        self.units_key = _parse_units(units, "trajectory_logprob")
        self.name = "trajectory_logprob" if self.units_key == "bpd" else "trajectory_logprob=nats"
        self.units = "bits/dim" if self.units_key == "bpd" else "nats per image"

    @classmethod
    def from_arg(cls, arg: str) -> "TrajectoryLogProb":
        return cls(arg)

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


class JourneyTRAK(Measurement):
    """Journey-TRAK's per-step trajectory loss (lower = better, per pixel), for one step or averaged over steps.

    For sampling step k (diffusion timestep t = t_k) of the stored trajectory:
    ``m_k = E_ε mean_pixels (ε − ε_θ(√ᾱ_t x̂_0^{(k)} + √(1−ᾱ_t) ε, t))²`` where
    ``x̂_0^{(k)} = (x_{t_k} − √(1−ᾱ_t) ε_θ(x_{t_k}, t))/√ᾱ_t`` is the model's x_0 prediction at that step,
    computed *with the model being measured* from the stored state and **detached** (no gradient flows through
    it; clipped to ±clip_sample_range, or thresholded, as the sampler's scheduler does).

    * ``"journey_trak=step:<k>"`` (or ``=<k>``): one step, k indexing ``trajectory.timesteps`` (negative k counts
      from the end); ``"journey_trak=t:<t>"``: the step at diffusion timestep t. Draws: S noises ε at that t.
    * ``"journey_trak"``: the average over all K steps, ``(1/K) Σ_k m_k``; draws are S (step, ε) pairs with steps
      stratified over the K steps (each step exactly S/K times when K divides S).

    Network calls: ``per_draw`` calls ``predict_noise`` twice on example-major batches — first for x̂_0, then for
    the loss. x̂_0 enters as ``x̂_0.detach() + 0 · x̂_0``: its value is x̂_0, its gradient exactly zero, and the
    first call stays in the backward graph so that every captured call receives an (all-zero) output gradient,
    as :mod:`diffinfluence_widgets.influence.capture` requires. Gradients are those of the detached definition.
    """

    needs_trajectory = True

    def __init__(self, step: int | None = None, *, timestep: int | None = None):
        if step is not None and timestep is not None:
            raise ValueError("journey_trak: give a step index or a timestep, not both")
        for what, v in (("step", step), ("timestep", timestep)):
            if v is not None and (isinstance(v, bool) or int(v) != v):
                raise ValueError(f"journey_trak: {what} must be an integer, got {v!r}")
        if timestep is not None and int(timestep) < 0:
            raise ValueError(f"journey_trak: timestep must be non-negative, got {timestep!r}")
        self.step = None if step is None else int(step)
        self.timestep = None if timestep is None else int(timestep)
        if self.step is not None:
            self.name, self.averages_over_timesteps = f"journey_trak=step:{self.step}", False
        elif self.timestep is not None:
            self.name, self.averages_over_timesteps = f"journey_trak=t:{self.timestep}", False
        else:
            self.name, self.averages_over_timesteps = "journey_trak", True
            self.default_num_draws = 1000

    @classmethod
    def from_arg(cls, arg: str) -> "JourneyTRAK":
        a = str(arg).strip()
        key, sep, val = a.partition(":")
        try:
            if not sep:
                return cls(int(a))
            if key == "step":
                return cls(int(val))
            if key in ("t", "timestep"):
                return cls(timestep=int(val))
        except ValueError:
            raise ValueError(f"journey_trak: bad parameter {arg!r}; expected 'step:<int>' or 't:<int>'") from None
        raise ValueError(f"journey_trak: bad parameter {arg!r}; expected 'step:<int>' or 't:<int>'")

    def _fixed_timestep(self, ts: torch.Tensor) -> int | None:
        if self.step is not None:
            if not -ts.numel() <= self.step < ts.numel():
                raise ValueError(f"{self.name}: step {self.step} is outside the trajectory's {ts.numel()} steps")
            return int(ts[self.step])
        if self.timestep is not None:
            if not bool((ts == self.timestep).any()):
                raise ValueError(f"{self.name}: timestep {self.timestep} is not a step of the trajectory "
                                 f"(timesteps {ts.tolist()[:10]}...)")
            return self.timestep
        return None

    def draws(self, model, ids, num_draws, seed=0, *, trajectory=None):
        tr = _require_trajectory(trajectory, None, self.name)
        T = model.num_train_timesteps
        ts = tr.checked_timesteps(T)
        fixed = self._fixed_timestep(ts)
        if fixed is not None:
            return draw_noise(ids, num_draws, model.image_shape, T, seed, timestep=fixed)
        d = draw_noise(ids, num_draws, model.image_shape, ts.numel(), seed)
        return NoiseDraws(ts[d.timesteps], d.noise)

    def per_draw(self, model, images, draws, trajectory=None):
        tr = _require_trajectory(trajectory, images, self.name)
        T = model.num_train_timesteps
        device, dtype = images.device, images.dtype
        k = _step_index(tr, draws.timesteps, T, self.name)
        t = draws.timesteps.to(device)
        noise = draws.noise.to(device=device, dtype=dtype)
        fixed = self.step is not None or self.timestep is not None
        kk, tt = (k[:, :1], t[:, :1]) if fixed else (k, t)      # per-step: one x̂_0 per example
        x_t = _gather_states(tr, kk, device, dtype)
        abar = model.const("alphas_cumprod", device)[tt].to(dtype).reshape(*tt.shape, 1, 1, 1)
        eps_hat = model.predict_noise(x_t, tt)
        x0_hat = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        cfg = model.scheduler.config
        if cfg.get("thresholding", False):  # per-sample dynamic thresholding, as the sampler does
            x0_hat = model.scheduler._threshold_sample(x0_hat.reshape(-1, *x0_hat.shape[-3:])).reshape(x0_hat.shape)
        elif cfg.get("clip_sample", False):
            r = float(cfg.get("clip_sample_range", 1.0))
            x0_hat = x0_hat.clamp(-r, r)
        # detached, but kept in the graph with an exactly zero gradient: the hook-based per-example gradients
        # expect every captured network call to receive an output gradient
        x0_hat = (x0_hat.detach() + 0 * x0_hat) if x0_hat.requires_grad else x0_hat
        x0_hat = x0_hat.expand_as(noise)
        x_noisy = model.add_noise(x0_hat, noise, t)
        pred = model.predict_noise(x_noisy, t)
        return (noise - pred).pow(2).flatten(2).mean(-1)


#: name -> factory; measurements taking a parameter are written ``"loss_at_t=500"``, ``"elbo=nats"``,
#: ``"journey_trak=step:5"``. A factory with a ``from_arg(str)`` classmethod parses its own parameter; the others
#: take one integer.
MEASUREMENTS: dict[str, Callable[..., Measurement]] = {
    "loss": Loss,
    "elbo_simplified": SimplifiedELBO,
    "square_norm": SquareNorm,
    "loss_at_t": LossAtTimestep,
    "elbo": ELBO,
    "trajectory_logprob": TrajectoryLogProb,
    "journey_trak": JourneyTRAK,
}

_NO_PARAMETER = {"loss", "elbo_simplified", "square_norm"}


def get_measurement(name: str | Measurement) -> Measurement:
    """Look a measurement up by name (``"loss"``, ``"loss_at_t=500"``, ...) or pass an instance through.

    Raises ``ValueError`` naming the value for unknown names, a missing or unexpected parameter, or a bad one.
    """
    if isinstance(name, Measurement):
        return name
    if not isinstance(name, str):
        raise TypeError(f"measurement must be a name or a Measurement, got {type(name).__name__}")
    key, eq, arg = name.strip().partition("=")
    key = key.strip()
    if key not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}; expected one of {sorted(MEASUREMENTS)} "
                         "(parameterised ones as e.g. 'loss_at_t=500', 'journey_trak=step:5', 'elbo=nats')")
    factory = MEASUREMENTS[key]
    if eq:
        if key in _NO_PARAMETER:
            raise ValueError(f"measurement {key!r} takes no parameter, got {name!r}")
        if not arg.strip():
            raise ValueError(f"measurement {name!r}: empty parameter after '='")
        try:
            from_arg = getattr(factory, "from_arg", None)
            return from_arg(arg) if from_arg is not None else factory(int(arg))
        except (TypeError, ValueError) as e:
            raise ValueError(f"measurement {name!r}: bad parameter {arg!r} ({e})") from None
    try:
        return factory()
    except TypeError:
        raise ValueError(f"measurement {key!r} needs a parameter, e.g. '{key}=500'") from None


@torch.no_grad()
def measure(model: DiffusionModel, images: torch.Tensor, ids: Sequence[int] | torch.Tensor,
            measurement: str | Measurement = "loss", *, num_draws: int | None = None, seed: int = 0,
            trajectory: Trajectory | None = None, batch_size: int = 64, draw_chunk: int = 64) -> torch.Tensor:
    """Values of a measurement for each image (``[B]``, float64), with seeded draws (common random numbers).

    Images are processed ``batch_size`` at a time and their draws ``draw_chunk`` at a time (the result does not
    depend on either). ``trajectory`` (``[B, K+1, ...]`` states, aligned with ``images``) is required by the
    trajectory measurements.
    """
    meas = get_measurement(measurement)
    model.check_images(images)
    if len(ids) != images.shape[0]:
        raise ValueError(f"got {len(ids)} ids for {images.shape[0]} images")
    if meas.needs_trajectory:
        _require_trajectory(trajectory, images, meas.name)
    S = int(num_draws or meas.default_num_draws)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        ids_b = list(ids[sl]) if not isinstance(ids, torch.Tensor) else ids[sl]
        tr = trajectory.select(sl).to(model.device, model.dtype) if trajectory is not None else None
        d = meas.draws(model, ids_b, S, seed, trajectory=tr).to(model.device)
        x = images[sl].to(model.device, model.dtype)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=model.device)
        for c in range(0, d.num_draws, draw_chunk):
            total += meas.per_draw(model, x, d.select_draws(slice(c, c + draw_chunk)), tr).double().sum(1)
        out.append((total / d.num_draws).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def timestep_bands(num_train_timesteps: int, num_bands: int) -> list[tuple[int, int]]:
    """``num_bands`` contiguous half-open bands [lo, hi) covering 0..T−1."""
    if isinstance(num_bands, bool) or int(num_bands) != num_bands or int(num_bands) < 1:
        raise ValueError(f"num_bands must be a positive integer, got {num_bands!r}")
    if int(num_bands) > int(num_train_timesteps):
        raise ValueError(f"num_bands={num_bands!r} exceeds the {num_train_timesteps} timesteps")
    edges = torch.linspace(0, num_train_timesteps, int(num_bands) + 1).round().long().tolist()
    return [(edges[i], edges[i + 1]) for i in range(int(num_bands))]


def band_masks(timesteps: torch.Tensor, bands: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[num_bands, *timesteps.shape]`` boolean masks; the bands must partition the timesteps they cover.

    With ``timesteps = measurement.draw_timesteps(draws, trajectory)`` and ``v = per_draw(...)``,
    ``Σ_b (v * masks[b]).mean(1) == v.mean(1)``: the per-band contributions add up to the measurement.
    """
    masks = torch.stack([(timesteps >= lo) & (timesteps < hi) for lo, hi in bands])
    if not bool((masks.sum(0) == 1).all()):
        raise ValueError(f"timestep bands {list(bands)} do not cover every drawn timestep exactly once")
    return masks
