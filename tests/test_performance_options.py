"""Speed/memory options apply cleanly and, where they promise to, leave the pixels alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, ModelRegistry
from engine.performance import PerformanceOptions


def generate(models_dir, options):
    engine = Engine(ModelRegistry(models_dir, builtin_dir=None, performance=options))
    request = GenerationRequest(prompt="a red circle", model="Stable-diffusion/tiny-sd1", steps=3, width=64, height=64, seed=9)
    return engine, np.asarray(engine.generate(request).images[0].image)


def test_channels_last_is_off_on_cpu_by_default_and_changes_no_pixels_when_forced(tiny_models_dir):
    default_engine, default = generate(tiny_models_dir, PerformanceOptions())
    unet = default_engine.registry.load("Stable-diffusion/tiny-sd1").pipeline.unet
    assert not unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) or unet.conv_in.weight.shape[-1] == 1
    forced_engine, forced = generate(tiny_models_dir, PerformanceOptions(channels_last=True))
    assert forced_engine.registry.load("Stable-diffusion/tiny-sd1").pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(default.astype(int) - forced.astype(int)).max() <= 1


def test_vae_tiling_is_opt_in(tiny_models_dir):
    engine, _ = generate(tiny_models_dir, PerformanceOptions(vae_tiling=True))
    assert engine.registry.load("Stable-diffusion/tiny-sd1").pipeline.vae.use_tiling


def test_unknown_memory_mode_is_refused():
    with pytest.raises(ValueError, match="memory mode"):
        PerformanceOptions(memory_mode="ultravram")
