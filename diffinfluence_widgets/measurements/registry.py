"""The named measurements, :func:`get_measurement` / :func:`measure`, and the timestep bands."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..diffusion.model import DiffusionModel
from ..diffusion.sampling import Trajectory
from .base import Measurement, _require_trajectory
from .journey import JourneyTRAK
from .likelihood import ELBO, TrajectoryLogProb
from .losses import Loss, LossAtTimestep, SimplifiedELBO, SquareNorm

__all__ = ["MEASUREMENTS", "get_measurement", "measure", "timestep_bands", "band_masks"]

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
