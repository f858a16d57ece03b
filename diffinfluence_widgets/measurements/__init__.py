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

from ..diffusion.sampling import Trajectory
from .base import Measurement
from .journey import JourneyTRAK
from .likelihood import ELBO, TrajectoryLogProb, ddpm_step_mean_variance, discretized_gaussian_log_prob, elbo_terms
from .losses import Loss, LossAtTimestep, SimplifiedELBO, SquareNorm, elbo_weights
from .registry import MEASUREMENTS, band_masks, get_measurement, measure, timestep_bands

__all__ = [
    "Measurement", "Trajectory", "MEASUREMENTS", "get_measurement", "measure", "band_masks", "timestep_bands",
    "Loss", "LossAtTimestep", "SimplifiedELBO", "SquareNorm", "ELBO", "TrajectoryLogProb", "JourneyTRAK",
    "elbo_weights", "elbo_terms", "ddpm_step_mean_variance", "discretized_gaussian_log_prob",
]
