"""DDPM ancestral sampling with per-sample seeds and optional stored trajectories.

Sample i drawn with seed s uses its own generator, seeded by ``(s, i)``, for its initial noise x_T and for every
step's noise, so it is the same image whatever the batch size or the other samples: a generated query can be
regenerated alone, with its trajectory, from ``(seed, id)``. Each step is diffusers' ``DDPMScheduler.step`` on a
private copy of the model's scheduler. :func:`posterior_mean_variance` gives the mean and variance of the
Gaussian ``p_θ(x_prev | x_t)`` that ``step`` samples from, differentiably in ε_θ, for the trajectory log-prob.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .draws import example_generator
from .model import DiffusionModel, resolve_device

__all__ = ["Trajectory", "SampleResult", "sample", "posterior_mean_variance", "previous_timesteps", "SAMPLING_STREAM"]

#: stream number of :func:`example_generator` used for sampling noise (distinct from the measurement draws)
SAMPLING_STREAM = 7



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


@dataclass
class SampleResult:
    """Generated images ``[n, C, H, W]`` (CPU), their ids and generator seeds, and optionally trajectories.

    ``ids[i]`` is the sample's index: ``sample(model, ids=[ids[i]], seed=seed)`` regenerates it.
    ``seeds[i]`` is the seed of its ``torch.Generator``.
    """

    images: torch.Tensor
    trajectory: Trajectory | None
    seeds: torch.Tensor
    ids: torch.Tensor
    seed: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _sample_generator(seed: int, sample_id: int) -> torch.Generator:
    return example_generator(seed, sample_id, SAMPLING_STREAM)


@torch.no_grad()
def sample(model: DiffusionModel, num_samples: int | None = None, *, seed: int = 0,
           ids: Sequence[int] | torch.Tensor | None = None, num_inference_steps: int | None = None,
           keep_trajectory: bool = False, device: str | torch.device | None = None, batch_size: int = 64,
           progress: bool = False) -> SampleResult:
    """Generate images by DDPM ancestral sampling.

    Parameters
    ----------
    num_samples:
        Generate samples with ids ``0..num_samples-1``; or give ``ids`` to (re)generate particular samples.
    num_inference_steps:
        Number of denoising steps (default: all ``T`` training timesteps, the DDPM sampler proper).
    keep_trajectory:
        Keep x_T and every intermediate x_{t-1} (``result.trajectory``, on the CPU, in the model's dtype).
    """

    if ids is None:
        if num_samples is None or isinstance(num_samples, bool) or int(num_samples) < 0:
            raise ValueError(f"num_samples must be a non-negative integer (or pass ids=...), got {num_samples!r}")
        id_list = list(range(int(num_samples)))
    else:
        id_list = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if num_samples is not None and int(num_samples) != len(id_list):
            raise ValueError(f"num_samples={num_samples} disagrees with len(ids)={len(id_list)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    T = model.num_train_timesteps
    steps = T if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= steps <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps!r}")

    dev = resolve_device(device) if device is not None else model.device
    if dev != model.device:
        model.to(dev)
    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(steps, device="cpu")
    timesteps = sched.timesteps.clone()
    shape, dtype = model.image_shape, model.dtype
    was_training = model.unet.training
    model.unet.eval()
    images, states = [], []
    bar = tqdm(total=len(id_list) * len(timesteps), disable=not progress, desc="sample", dynamic_ncols=True)
    try:
        for lo in range(0, len(id_list), int(batch_size)):
            chunk = id_list[lo:lo + int(batch_size)]
            gens = [_sample_generator(seed, i) for i in chunk]
            x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(dev, dtype)
            traj = [x.cpu()] if keep_trajectory else None
            for t in timesteps:
                eps = model.unet(x, t.to(dev)).sample
                # one CPU generator per sample (diffusers draws each row from its own generator, then moves it)
                x = sched.step(eps, t, x, generator=gens).prev_sample
                if traj is not None:
                    traj.append(x.cpu())
                bar.update(len(chunk))
            images.append(x.cpu())
            if traj is not None:
                states.append(torch.stack(traj, dim=1))
    finally:
        bar.close()
        model.unet.train(was_training)
    C, H, W = shape
    out = torch.cat(images) if images else torch.zeros(0, C, H, W, dtype=dtype)
    trajectory = None
    if keep_trajectory:
        st = torch.cat(states) if states else torch.zeros(0, len(timesteps) + 1, C, H, W, dtype=dtype)
        trajectory = Trajectory(timesteps=timesteps.long(), states=st)
    seeds = torch.tensor([_sample_generator(seed, i).initial_seed() for i in id_list], dtype=torch.long)
    return SampleResult(images=out, trajectory=trajectory, seeds=seeds, ids=torch.tensor(id_list, dtype=torch.long),
                        seed=int(seed))


def previous_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """For sampling timesteps in visiting order (e.g. ``trajectory.timesteps``), the timestep each step goes to
    (the next one; ``-1`` after the last), as ``DDPMScheduler.previous_timestep`` defines it."""
    ts = torch.as_tensor(timesteps).long().flatten()
    return torch.cat([ts[1:], torch.full((min(ts.numel(), 1),), -1, dtype=torch.long)])


def _mean_var(sched, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = sched.config
    vt = sched.variance_type if hasattr(sched, "variance_type") else cfg.variance_type
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise NotImplementedError(f"variance_type={vt!r} is not supported (ε-only models with fixed variance: "
                                  "'fixed_small', 'fixed_small_log', 'fixed_large')")
    acp = sched.alphas_cumprod.to(x_t.device)
    one = sched.one.to(x_t.device)
    t = t.to(x_t.device)
    prev_t = prev_t.to(x_t.device)
    view = (-1,) + (1,) * (x_t.dim() - 1)
    # the scheduler's float32 arithmetic, in its order, one value per example
    alpha_prod_t = acp[t]
    alpha_prod_t_prev = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], one)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = (x_t - (beta_prod_t ** 0.5).reshape(view) * eps) / (alpha_prod_t ** 0.5).reshape(view)
    if cfg.thresholding:
        x0 = sched._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    x0_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
    xt_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
    mean = x0_coeff.reshape(view) * x0 + xt_coeff.reshape(view) * x_t
    if vt == "fixed_large":
        var = current_beta_t
    else:
        var = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    var = torch.where(t > 0, var, torch.zeros_like(var))  # step() adds no noise at t = 0
    return mean, var.reshape(view).to(mean.dtype)


def posterior_mean_variance(model: DiffusionModel, x_t: torch.Tensor, eps_pred: torch.Tensor,
                            t: int | torch.Tensor, prev_t: int | torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the reverse step ``p_θ(x_prev | x_t) = N(mean, variance · I)`` that
    ``DDPMScheduler.step`` samples from (the model's scheduler config: clipping / thresholding of the predicted
    x_0 and ``variance_type`` included).

    ``x_t`` and ``eps_pred`` are ``[B, C, H, W]``; ``t`` an int or a ``[B]`` tensor; ``prev_t`` the timestep the
    step goes to (default ``t - 1``, the full-schedule sampler; for strided sampling take it from
    :func:`previous_timesteps`, with ``-1`` after the last step). Returns ``mean`` ``[B, C, H, W]``
    (differentiable in ``eps_pred``) and ``variance`` ``[B, 1, 1, 1]`` (0 where t = 0: that step is
    deterministic). ``step`` returns ``mean + sqrt(variance) · z`` with z ~ N(0, I).
    """
    if x_t.shape != eps_pred.shape or x_t.dim() != 4:
        raise ValueError(f"x_t {tuple(x_t.shape)} and eps_pred {tuple(eps_pred.shape)} must both be [B, C, H, W]")
    B = x_t.shape[0]
    t = torch.as_tensor(t).long().flatten()
    t = t.expand(B) if t.numel() == 1 else t
    prev = t - 1 if prev_t is None else torch.as_tensor(prev_t, device=t.device).long().flatten()
    prev = prev.expand(B) if prev.numel() == 1 else prev
    if t.numel() != B or prev.numel() != B:
        raise ValueError(f"t / prev_t must be scalars or have one entry per example ({B})")
    T = model.num_train_timesteps
    if int(t.min()) < 0 or int(t.max()) >= T or bool((prev >= t).any()) or int(prev.min()) < -1:
        raise ValueError(f"need 0 <= t < {T} and -1 <= prev_t < t; got t={t.tolist()}, prev_t={prev.tolist()}")
    return _mean_var(model.scheduler, x_t, eps_pred, t, prev)
