"""The measurement proxies m(θ, x) of ``method.md`` §3, one named object each.

Every measurement is a Monte-Carlo average over S draws: ``m(θ, x) = mean_s term(θ, x, draw_s)``. A
measurement object therefore provides

* ``draws(model, ids, num_draws, seed)`` — the seeded draws (common random numbers across models), and
* ``per_draw(model, images, draws, trajectory=None)`` — the ``[B, S]`` tensor of terms (differentiable in θ),

so that ``m = per_draw(...).mean(1)`` and the gradient of m is the average of the per-draw gradients. Every
network call inside ``per_draw`` is on an example-major batch (``DiffusionModel.predict_noise`` on
``[B, k, C, H, W]``), which is what lets :mod:`diffinfluence_widgets.influence.gradients` recover per-example
gradients from one backward pass.

Because m is an average over draws and influence is linear in ∇m, restricting the average to the draws whose
timestep lies in a band splits the score exactly into per-band contributions (:func:`band_masks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .diffusion.draws import NoiseDraws, draw_noise
from .diffusion.model import DiffusionModel

__all__ = [
    "Measurement", "Trajectory", "MEASUREMENTS", "get_measurement", "measure", "band_masks", "timestep_bands",
    "Loss", "LossAtTimestep", "SimplifiedELBO", "SquareNorm", "elbo_weights",
]


@dataclass
class Trajectory:
    """A stored DDPM sampling trajectory (needed by the trajectory measurements).

    ``timesteps`` ``[K]``: the scheduler timesteps visited, in sampling (descending) order;
    ``states`` ``[B, K + 1, C, H, W]``: ``states[:, 0]`` is x_T (the initial noise), ``states[:, k + 1]`` the
    sample after step k (the last one is the generated image).
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


class Measurement:
    """Base class: a named proxy ``m(θ, x) = mean_s per_draw(θ, x, draw_s)``."""

    name: str = ""
    #: True when m averages over diffusion timesteps, so that per-timestep-band decomposition is meaningful
    averages_over_timesteps: bool = True
    #: True when the measurement needs the query's sampling trajectory
    needs_trajectory: bool = False
    #: default number of draws (per example) for a reliable per-example value (method.md §1: K ≥ 64)
    default_num_draws: int = 64

    def draws(self, model: DiffusionModel, ids: Sequence[int] | torch.Tensor, num_draws: int,
              seed: int = 0) -> NoiseDraws:
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
    """The training loss E_{t,ε} mean_pixels (ε − ε_θ(x_t, t))² — the recommended measurement."""

    name = "loss"

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=False)


class LossAtTimestep(Measurement):
    """The loss at one fixed timestep t: E_ε mean_pixels (ε − ε_θ(x_t, t))²."""

    averages_over_timesteps = False

    def __init__(self, timestep: int):
        if int(timestep) < 0:
            raise ValueError(f"timestep must be a non-negative integer, got {timestep!r}")
        self.timestep = int(timestep)
        self.name = f"loss_at_t={self.timestep}"

    def draws(self, model, ids, num_draws, seed=0):
        return draw_noise(ids, num_draws, model.image_shape, model.num_train_timesteps, seed,
                          timestep=self.timestep)

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=False)


def elbo_weights(model: DiffusionModel) -> torch.Tensor:
    """w_t = β_t / (2 α_t (1 − ᾱ_t)) for t = 0..T−1 (float64): the simplified-ELBO weighting of ℓ_t."""
    betas, alphas, abar = (model.const(n, torch.device("cpu")) for n in ("betas", "alphas", "alphas_cumprod"))
    return betas / (2 * alphas * (1 - abar))


class SimplifiedELBO(Measurement):
    """ELBO* = E_t [w_t ℓ_t] with w_t = β_t / (2 α_t (1 − ᾱ_t)) — a loss (lower is better)."""

    name = "elbo_simplified"

    def per_draw(self, model, images, draws, trajectory=None):
        w = elbo_weights(model).to(images.device)[draws.timesteps.to(images.device)].to(images.dtype)
        return w * _sq_error(model, images, draws, target_zero=False)


class SquareNorm(Measurement):
    """D-TRAK's square norm E_{t,ε} mean_pixels ε_θ(x_t, t)² — the loss with targets set to zero."""

    name = "square_norm"

    def per_draw(self, model, images, draws, trajectory=None):
        return _sq_error(model, images, draws, target_zero=True)


#: name -> factory; measurements taking a parameter are written ``"loss_at_t=500"``.
MEASUREMENTS: dict[str, Callable[..., Measurement]] = {
    "loss": Loss,
    "elbo_simplified": SimplifiedELBO,
    "square_norm": SquareNorm,
    "loss_at_t": LossAtTimestep,
}


def get_measurement(name: str | Measurement) -> Measurement:
    """Look a measurement up by name (``"loss"``, ``"loss_at_t=500"``, ...) or pass an instance through."""
    if isinstance(name, Measurement):
        return name
    if not isinstance(name, str):
        raise TypeError(f"measurement must be a name or a Measurement, got {type(name).__name__}")
    key, _, arg = name.partition("=")
    if key not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}; expected one of {sorted(MEASUREMENTS)} "
                         "(parameterised ones as e.g. 'loss_at_t=500')")
    factory = MEASUREMENTS[key]
    if arg:
        try:
            return factory(int(arg))
        except (TypeError, ValueError) as e:
            raise ValueError(f"measurement {name!r}: bad parameter {arg!r} ({e})") from None
    try:
        return factory()
    except TypeError:
        raise ValueError(f"measurement {key!r} needs a parameter, e.g. '{key}=500'") from None


@torch.no_grad()
def measure(model: DiffusionModel, images: torch.Tensor, ids: Sequence[int] | torch.Tensor,
            measurement: str | Measurement = "loss", *, num_draws: int | None = None, seed: int = 0,
            trajectory: Trajectory | None = None, batch_size: int = 64) -> torch.Tensor:
    """Values of a measurement for each image (``[B]``, float64), with seeded draws (common random numbers)."""
    meas = get_measurement(measurement)
    model.check_images(images)
    S = int(num_draws or meas.default_num_draws)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        ids_b = list(ids[sl]) if not isinstance(ids, torch.Tensor) else ids[sl]
        d = meas.draws(model, ids_b, S, seed).to(model.device)
        tr = trajectory.select(sl).to(model.device, model.dtype) if trajectory is not None else None
        out.append(meas.per_draw(model, images[sl].to(model.device, model.dtype), d, tr).mean(1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def timestep_bands(num_train_timesteps: int, num_bands: int) -> list[tuple[int, int]]:
    """``num_bands`` contiguous half-open bands [lo, hi) covering 0..T−1."""
    if int(num_bands) < 1:
        raise ValueError(f"num_bands must be a positive integer, got {num_bands!r}")
    edges = torch.linspace(0, num_train_timesteps, int(num_bands) + 1).round().long().tolist()
    return [(edges[i], edges[i + 1]) for i in range(int(num_bands))]


def band_masks(timesteps: torch.Tensor, bands: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[num_bands, *timesteps.shape]`` boolean masks; the bands must partition the timesteps they cover."""
    masks = torch.stack([(timesteps >= lo) & (timesteps < hi) for lo, hi in bands])
    if not bool((masks.sum(0) == 1).all()):
        raise ValueError(f"timestep bands {list(bands)} do not cover every drawn timestep exactly once")
    return masks
