"""Diffusion models: the diffusers UNet + DDPM adapter, seeded draws, training and sampling."""
from .draws import NoiseDraws, draw_noise
from .model import DiffusionModel, cifar10_unet_config, demo_unet_config, resolve_device, tiny_unet_config

__all__ = ["DiffusionModel", "NoiseDraws", "draw_noise", "tiny_unet_config", "demo_unet_config",
           "cifar10_unet_config", "resolve_device"]
from .sampling import SampleResult, posterior_mean_variance, previous_timesteps, sample
from .train import TrainConfig, TrainingInterrupted, train_model

__all__ += ["SampleResult", "sample", "posterior_mean_variance", "previous_timesteps", "TrainConfig",
            "TrainingInterrupted", "train_model"]
