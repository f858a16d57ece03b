"""Journey-TRAK's measurement: the per-step trajectory loss of a generated query."""
from __future__ import annotations

import torch

from ..diffusion.draws import NoiseDraws, draw_noise
from .base import Measurement, _gather_states, _require_trajectory, _step_index

__all__ = ["JourneyTRAK"]

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
