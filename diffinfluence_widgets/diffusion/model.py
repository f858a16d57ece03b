"""A diffusers ``UNet2DModel`` + ``DDPMScheduler`` pair, seen the way the influence method needs it.

The method (``method.md`` §1) works with ε-prediction DDPM models in diffusers' 0-indexed timestep convention:
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) ε`` for ``t in {0, ..., T-1}``. :class:`DiffusionModel` keeps the
schedule constants as float64 tensors, predicts noise for batches with any number of leading dimensions, and
fingerprints its weights so that caches built for another model are refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

__all__ = ["DiffusionModel", "tiny_unet_config", "demo_unet_config", "cifar10_unet_config", "resolve_device"]


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' logger while loading: without ``accelerate`` it warns on every load ("Cannot initialize
    model with low cpu memory usage…"), a message about an optional speed-up that becomes a pink error box in
    Voila. Our models are a few MB; nothing is lost. The previous verbosity is restored afterwards."""
    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" picks CUDA when present and the CPU otherwise; anything else is taken as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available on this machine")
    return dev


def tiny_unet_config(sample_size: int = 8, channels: int = 1) -> dict[str, Any]:
    """A seconds-scale UNet (≈20k parameters) with one attention block, for tests."""
    return dict(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=8,
    )


def demo_unet_config(sample_size: int = 16, channels: int = 1) -> dict[str, Any]:
    """The digits demo UNet: two resolutions, attention at the lower one; trains in minutes on 2 CPU cores."""
    return dict(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=32,
    )


def cifar10_unet_config() -> dict[str, Any]:
    """The ~36M-parameter DDPM CIFAR-10 architecture (Ho et al. 2020; diffusers' ``google/ddpm-cifar10-32``)."""
    return dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        norm_num_groups=32, dropout=0.1,
    )


@dataclass
class DiffusionModel:
    """A UNet and its DDPM noise schedule.

    Parameters
    ----------
    unet:
        Any diffusers ``UNet2DModel`` predicting ε (attention blocks included).
    scheduler:
        A ``DDPMScheduler``; only its β schedule and ``num_train_timesteps`` are used for training and
        measurements, and ``step`` for sampling.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
    _consts: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.unet, UNet2DModel):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(self.unet).__name__}")
        pred = self.scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"only ε-prediction models are supported; the scheduler has prediction_type={pred!r}")
        betas = self.scheduler.betas.to(torch.float64)
        alphas = 1.0 - betas
        self._consts = {"betas": betas, "alphas": alphas, "alphas_cumprod": torch.cumprod(alphas, 0)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, unet_config: dict[str, Any] | None = None, *, num_train_timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02, seed: int = 0) -> "DiffusionModel":
        """A freshly initialised model (seeded) with the paper's linear β schedule."""
        torch.manual_seed(seed)
        unet = UNet2DModel(**(unet_config or demo_unet_config()))
        sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule="linear", clip_sample=True, prediction_type="epsilon")
        return cls(unet, sched)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, subfolder_unet: str = "unet",
                        subfolder_scheduler: str = "scheduler", local_files_only: bool = True) -> "DiffusionModel":
        """Load a model saved with :meth:`save_pretrained` or a diffusers DDPM pipeline folder.

        ``path`` may be a local folder (the default, ``local_files_only=True``) or a hub id such as
        ``"google/ddpm-cifar10-32"`` with ``local_files_only=False`` (needs the network).
        """
        with _quiet_diffusers():
            return cls._from_pretrained(path, subfolder_unet, subfolder_scheduler, local_files_only)

    @classmethod
    def _from_pretrained(cls, path, subfolder_unet: str, subfolder_scheduler: str,
                         local_files_only: bool) -> "DiffusionModel":
        p = Path(path)
        if local_files_only and not p.is_dir():
            raise FileNotFoundError(f"model folder {str(path)!r} does not exist (pass local_files_only=False "
                                    "to download a hub model by id)")
        if local_files_only and (p / "config.json").is_file() and not (p / subfolder_unet).is_dir():
            # a bare UNet folder: no scheduler saved beside it -> the paper's default schedule
            unet = UNet2DModel.from_pretrained(p, local_files_only=True)
            sched = DDPMScheduler(num_train_timesteps=1000)
            return cls(unet, sched)
        unet = UNet2DModel.from_pretrained(path, subfolder=subfolder_unet, local_files_only=local_files_only)
        sched = DDPMScheduler.from_pretrained(path, subfolder=subfolder_scheduler, local_files_only=local_files_only)
        return cls(unet, sched)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save as ``path/unet`` and ``path/scheduler`` (diffusers' layout, loadable by ``DDPMPipeline`` too)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(p / "unet")
        self.scheduler.save_pretrained(p / "scheduler")
        return p

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)[0]
        return (int(c.in_channels), int(size), int(size))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def const(self, name: str, device: torch.device | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Schedule constant ``betas``, ``alphas`` or ``alphas_cumprod`` (length T) on a device/dtype."""
        return self._consts[name].to(device=device or self.device, dtype=dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "DiffusionModel":
        # nn.Module.to directly: diffusers' ModelMixin.to warns about dtype casts that are fine for UNet2DModel
        torch.nn.Module.to(self.unet, device=resolve_device(device) if device is not None else None, dtype=dtype)
        return self

    # ------------------------------------------------------------------ the maths
    def check_images(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        """Raise a clear error unless ``images`` is a finite float batch of shape ``[B, *image_shape]``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of shape [B, {', '.join(map(str, self.image_shape))}], "
                            f"got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"{what} have shape {tuple(images.shape)}; this model expects [B, "
                             f"{', '.join(map(str, self.image_shape))}] (channels={self.image_shape[0]})")
        if not images.is_floating_point():
            raise TypeError(f"{what} must be floating point in [-1, 1], got dtype {images.dtype}")
        if not torch.isfinite(images).all():
            bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
            raise ValueError(f"{what} contain NaN or infinite values ({bad} of {images.shape[0]} images)")
        return images

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) ε``; ``t`` broadcasts over the image dims."""
        abar = self.const("alphas_cumprod", x0.device)[t].to(x0.dtype)
        abar = abar.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t) for ``x_t`` of shape ``[..., C, H, W]`` and integer ``t`` of shape ``[...]``.

        Leading dimensions are flattened in row-major (example-major) order for the single UNet call, which
        is what the per-example gradient hooks rely on: row ``i`` of the call belongs to example ``i // k``
        when ``x_t`` is ``[B, k, C, H, W]``.
        """
        lead = x_t.shape[:-3]
        if tuple(t.shape) != tuple(lead):
            raise ValueError(f"timesteps have shape {tuple(t.shape)}, expected {tuple(lead)} to match x_t")
        out = self.unet(x_t.reshape(-1, *x_t.shape[-3:]), t.reshape(-1)).sample
        return out.reshape(*lead, *out.shape[1:])

    def fingerprint(self) -> str:
        """SHA-256 over the UNet config, the schedule and every weight: identifies the model a cache belongs to."""
        h = hashlib.sha256()
        cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        h.update(self._consts["betas"].numpy().tobytes())
        for name, tensor in sorted(self.unet.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
