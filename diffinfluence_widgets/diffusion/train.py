"""Training a DDPM (ε-prediction) with an EMA of the weights, deterministic and resumable.

The loss is the method's training loss (``method.md`` §1): for each image a uniform timestep t and Gaussian ε,
``mean_pixels (ε − ε_θ(x_t, t))²``, averaged over the batch. The model returned is the **EMA** model, which is the
one to sample from, measure and attribute (``method.md`` §9, trap 3); retrained models must be treated the same.

Every random choice of step k (batch order, t, ε, dropout) comes from generators seeded by ``(seed, k)`` or
``(seed, epoch)``, so a run resumed from a checkpoint follows exactly the path of an uninterrupted one: the step
counter is the whole random state. Checkpoints hold the weights, the EMA, the optimizer and the step, written
atomically.

With ``data_parallel=True`` under ``torchrun`` (an initialised process group) training is data-parallel: every
rank draws the same batch,
computes the loss terms of its contiguous share of it (:func:`~diffinfluence_widgets.distributed.shard_slice`),
and the ranks sum their gradients (one all-reduce per step) before the identical optimizer step, so every rank
holds the same weights and the result is the single-process run's up to the order of floating-point sums. (With
dropout > 0 a rank's masks are drawn for its share only, so they differ from a single process's.) Rank 0 alone
writes checkpoints; every rank resumes from them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..data.dataset import ImageDataset
from .._io import CorruptArtifactError, atomic_write, remove_stale_temporaries, state_digest
from .draws import example_generator
from .model import DiffusionModel, resolve_device

__all__ = ["TrainConfig", "train_model", "TrainingInterrupted", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "train_checkpoint.pt"
_BATCH_STREAM, _NOISE_STREAM, _DROPOUT_STREAM = 101, 102, 103


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_model`. Use the presets :meth:`demo` and :meth:`tiny` as starting points."""

    steps: int = _f(3000, "optimizer steps in total")
    batch_size: int = _f(64, "images per step (capped at the dataset size)")
    lr: float = _f(2e-3, "peak AdamW learning rate")
    lr_schedule: str = _f("cosine", "'constant' or 'cosine' (decays to 10% of lr) after the warm-up")
    warmup: int = _f(100, "linear learning-rate warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    ema_decay: float = _f(0.999, "EMA decay; the effective decay is min(ema_decay, (1+k)/(10+k)) at step k")
    grad_clip: float | None = _f(1.0, "clip the global gradient norm to this value (None: no clipping)")
    stratified: bool = _f(True, "stratify the batch's timesteps over [0, T) (lower-variance gradient)")
    seed: int = _f(0, "seeds batch order, timesteps, noise and dropout")
    checkpoint_every: int = _f(500, "steps between checkpoints when a checkpoint_dir is given")

    def __post_init__(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")

        for name in ("steps", "batch_size", "checkpoint_every"):
            positive_int(name)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup must be a non-negative integer, got {self.warmup!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r} "
                             "(0 means no averaging: the EMA equals the raw weights)")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be a positive number or None, got {self.grad_clip!r}")

    @classmethod
    def demo(cls, **overrides) -> "TrainConfig":
        """Recognisable 16×16 digits with ``demo_unet_config()`` in a few CPU minutes.

        Measured on the 1438 training digits at 16×16: ≈0.10 CPU-s per step on one thread, 1500 steps in
        157 CPU-s (final loss ≈ 0.026); sampling 16 images with all 1000 DDPM steps took ≈1 min.
        """
        return cls(**{**dict(steps=1500, batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995,
                             checkpoint_every=500), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        """Seconds on one core with ``tiny_unet_config()``: for tests."""
        return cls(**{**dict(steps=20, batch_size=16, lr=2e-3, warmup=2, ema_decay=0.9, checkpoint_every=10),
                      **overrides})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after`` ends a run early (the checkpoint is saved first)."""


# ---------------------------------------------------------------------- the pieces of one step
def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_positions(n: int, cfg: TrainConfig, step: int) -> torch.Tensor:
    """Epoch-wise shuffling: each epoch is a seeded permutation; a batch may straddle two epochs."""
    b = min(cfg.batch_size, n)
    start = step * b
    out, cache = [], {}
    for pos in range(start, start + b):
        epoch, k = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=example_generator(cfg.seed, epoch, _BATCH_STREAM))
        out.append(cache[epoch][k])
    return torch.stack(out)


def _draw_t_eps(b: int, shape, T: int, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = example_generator(cfg.seed, step, _NOISE_STREAM)
    if cfg.stratified:
        u = torch.rand(b, generator=g, dtype=torch.float64)
        t = ((torch.arange(b, dtype=torch.float64) + u) * T / b).floor().long().clamp_(0, T - 1)
        t = t[torch.randperm(b, generator=g)]
    else:
        t = torch.randint(0, T, (b,), generator=g)
    return t, torch.randn((b, *shape), generator=g)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load_checkpoint(path: Path, dev) -> dict:
    """Read a training checkpoint; a truncated, unreadable or altered one raises :class:`CorruptArtifactError`."""
    try:
        state = torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # torch reports a torn zip as RuntimeError, a wrong file as UnpicklingError, ...
        raise CorruptArtifactError(f"training checkpoint {path} cannot be read ({type(e).__name__}: "
                                   f"{str(e)[:200]}); delete it to start over", path) from None
    if not isinstance(state, dict) or state.get("version") != 2:
        raise CorruptArtifactError(f"training checkpoint {path} is not a version-2 checkpoint of train_model; "
                                   "delete it to start over", path)
    body = {k: state.get(k) for k in ("unet", "ema", "optimizer")}
    if state.get("state_sha256") != state_digest({**body, "step": state.get("step")}):
        raise CorruptArtifactError(f"training checkpoint {path} fails its SHA-256 checksum (corrupt or altered); "
                                   "delete it to start over", path)
    return state


def _data_parallel_backward(work: DiffusionModel, images: torch.Tensor, pos: torch.Tensor, t: torch.Tensor,
                            eps: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """This rank's share of the batch loss (its terms / batch size), backpropagated; then the gradients and the loss
    are summed over ranks, so every rank ends with the whole batch's mean loss and its gradient."""
    b = pos.numel()
    sl = dist_utils.shard_slice(b)
    if sl.stop > sl.start:
        x_t = work.add_noise(images[pos[sl]], eps[sl], t[sl])
        part = (work.predict_noise(x_t, t[sl]) - eps[sl]).pow(2).flatten(1).mean(1).sum() / b
        part.backward()
        value = part.detach().reshape(1)
    else:  # more ranks than images in the batch: nothing to add
        value = torch.zeros(1, device=images.device, dtype=images.dtype)
    flat = torch.cat([value] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in params])
    dist_utils.all_reduce_sum_(flat)
    off = 1
    for p in params:
        p.grad = flat[off:off + p.numel()].view_as(p).clone()
        off += p.numel()
    return flat[0]


def _as_dataset(dataset) -> ImageDataset:
    if isinstance(dataset, ImageDataset):
        return dataset
    if isinstance(dataset, torch.Tensor):
        return ImageDataset(dataset, torch.arange(dataset.shape[0]), name="tensor")
    raise TypeError(f"dataset must be an ImageDataset (use dataset.subset(ids) to train on a subset) or an "
                    f"image tensor [N, C, H, W], got {type(dataset).__name__}")


# ---------------------------------------------------------------------- entry point
def train_model(model: DiffusionModel, dataset: ImageDataset | torch.Tensor, config: TrainConfig | None = None, *,
                device: str | torch.device | None = None, progress: bool = True,
                checkpoint_dir: str | Path | None = None, return_raw: bool = False,
                callback: Callable[[int, float], None] | None = None, stop_after: int | None = None,
                data_parallel: bool = False) -> DiffusionModel | tuple[DiffusionModel, DiffusionModel]:
    """Train a copy of ``model`` on ``dataset`` and return the EMA model (``model`` itself is left untouched).

    Parameters
    ----------
    dataset:
        An :class:`ImageDataset` (``dataset.subset(ids)`` for retraining on a subset). Examples are ordered by
        id internally, so the result does not depend on the order of the ids.
    config:
        :class:`TrainConfig`; default ``TrainConfig()``.
    checkpoint_dir:
        Save ``train_checkpoint.pt`` here every ``config.checkpoint_every`` steps and at the end; if a checkpoint is
        already there (same config, data and initial model), training resumes from it and ends with the same
        weights an uninterrupted run would have.
    return_raw:
        Also return the raw (non-averaged) weights: ``(ema_model, raw_model)``.
    callback:
        ``callback(step, loss)`` after every step (``step`` counts completed steps, from 1).
    stop_after:
        Stop once this many steps are done (saving a checkpoint first) by raising :class:`TrainingInterrupted`;
        call again with the same ``checkpoint_dir`` to continue.
    data_parallel:
        Every rank of the initialised process group calls this together and they share each batch (see the module
        docs); ``False`` (default) trains in this process alone, e.g. one retraining job per rank.
    """

    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    data = _as_dataset(dataset)
    if len(data) == 0:
        raise ValueError(f"cannot train on an empty dataset ({data.name!r} has 0 images)")
    model.check_images(data.images[:1], what=f"dataset {data.name!r} images")
    order = torch.argsort(data.ids)
    dev = resolve_device(device)

    init_fingerprint = model.fingerprint()
    net = copy.deepcopy(model.unet).to(dev).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    work = DiffusionModel(net, model.scheduler)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = data.images[order].to(dev, model.dtype)
    n, T = images.shape[0], model.num_train_timesteps
    identity = {"config": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
                "dataset_fingerprint": data.fingerprint(), "init_fingerprint": init_fingerprint}

    start = 0
    ckpt_path = None
    if checkpoint_dir is not None:
        ckpt_dir = Path(checkpoint_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = ckpt_dir / CHECKPOINT_NAME
        remove_stale_temporaries(ckpt_dir, CHECKPOINT_NAME)  # left by a run killed mid-write
        if ckpt_path.is_file():
            state = _load_checkpoint(ckpt_path, dev)
            for key, want in identity.items():
                if state.get(key) != want:
                    raise ValueError(f"checkpoint {str(ckpt_path)!r} belongs to another run ({key} differs: "
                                     f"saved {state.get(key)!r}, now {want!r}); use another checkpoint_dir")
            net.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])

    rank, world = dist_utils.rank_and_world() if data_parallel else (0, 1)
    params = list(net.parameters())

    def save(step: int) -> None:
        if ckpt_path is not None and rank == 0:  # one writer; the others' weights are the same
            state = {"unet": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
            # one file, one atomic write: identity, step and the state (with its checksum) always agree
            _atomic_save({**identity, "step": step, **state, "state_sha256": state_digest({**state, "step": step}),
                          "version": 2}, ckpt_path)

    if stop_after is not None and stop_after <= start < cfg.steps:
        raise TrainingInterrupted(f"the checkpoint is already at step {start} >= stop_after={stop_after}")
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    smooth = None
    # dropout uses the global generator: seed it per step (so resuming is exact) without disturbing the caller
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
        for step in range(start, cfg.steps):
            torch.manual_seed((cfg.seed * 1_000_003 + step * 7919 + _DROPOUT_STREAM) % (2**63 - 1))
            pos = _batch_positions(n, cfg, step).to(dev)
            t, eps = _draw_t_eps(pos.numel(), images.shape[1:], T, cfg, step)
            t, eps = t.to(dev), eps.to(dev, images.dtype)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            if world == 1:
                x_t = work.add_noise(images[pos], eps, t)
                loss = (work.predict_noise(x_t, t) - eps).pow(2).flatten(1).mean(1).mean()
                loss.backward()
            else:
                loss = _data_parallel_backward(work, images, pos, t, eps, params)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            _ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
            done = step + 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {done}; lower TrainConfig.lr "
                                         f"(now {cfg.lr}) or set grad_clip")
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_after:
                save(done)
            if callback is not None:
                callback(done, value)
            if stop_after is not None and done >= stop_after and done < cfg.steps:
                bar.close()
                raise TrainingInterrupted(f"stopped after step {done} of {cfg.steps} (stop_after={stop_after})"
                                          + (f"; resume from {str(ckpt_path)!r}" if ckpt_path else ""))
    bar.close()

    # parameters stay differentiable: gradients w.r.t. the EMA weights are what influence needs
    ema_model = DiffusionModel(ema.eval().requires_grad_(True), copy.deepcopy(model.scheduler))
    if return_raw:
        return ema_model, DiffusionModel(net.eval(), copy.deepcopy(model.scheduler))
    return ema_model
