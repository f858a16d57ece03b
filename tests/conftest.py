"""Shared fixtures. Tests run on shared 2-core machines: one thread each."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """A freshly initialised ≈20k-parameter UNet for 1×8×8 images (float32, CPU, seed 0)."""
    from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config

    return DiffusionModel.from_config(tiny_unet_config(), seed=0).to("cpu", torch.float32)


@pytest.fixture
def tiny_digits():
    """64 training digits at 8×8 (ids are scikit-learn row indices), labels included."""
    from diffinfluence_widgets.data import load_digits

    return load_digits(size=8, split="train", limit=64)
