"""Loss-like measurements: the training loss, the loss at one timestep, the simplified ELBO and the square norm."""
from __future__ import annotations

import torch

from ..diffusion.draws import NoiseDraws, draw_noise
from ..diffusion.model import DiffusionModel
from .base import Measurement

__all__ = ["Loss", "LossAtTimestep", "SimplifiedELBO", "SquareNorm", "elbo_weights"]

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
