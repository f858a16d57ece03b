"""The measurement base class and helpers shared by the measurement families (see the package docstring)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..diffusion.draws import NoiseDraws, draw_noise
from ..diffusion.model import DiffusionModel
from ..diffusion.sampling import Trajectory

__all__ = ["Measurement"]

_LOG_EPS = math.log(1e-12)  # floor of every log-probability term (Ho et al. 2020 clamp probabilities at 1e-12)


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


# ---------------------------------------------------------------------------------------------- full ELBO
def _parse_units(arg: str, who: str) -> str:
    u = str(arg).strip().lower()
    aliases = {"bpd": "bpd", "bits/dim": "bpd", "bits_per_dim": "bpd", "nats": "nats", "nats/image": "nats"}
    if u not in aliases:
        raise ValueError(f"{who}: unknown units {arg!r}; expected 'bpd' (bits per dimension) or 'nats' "
                         "(nats per image)")
    return aliases[u]


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
