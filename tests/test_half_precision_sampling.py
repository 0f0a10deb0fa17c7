"""A half-precision model must not change the sampler's arithmetic: a seed gives the CPU's picture on a GPU.

Measured on an H200 (scripts/check_on_cuda.py): before, Euler a on the demo model in float16 differed from the
CPU picture by up to 244/255; with the sampler in float32 around the half-precision model, by at most 4/255.
This machine has no GPU, so the test runs the model in bfloat16 on the CPU and checks what the sampler is given.
"""
from __future__ import annotations

import diffusers
import pytest
import torch

from engine import Engine, GenerationRequest, ModelRegistry


@pytest.mark.parametrize("sampler, scheduler_class", [("Euler a", diffusers.EulerAncestralDiscreteScheduler),
                                                       ("DPM++ 2M", diffusers.DPMSolverMultistepScheduler)])
def test_the_sampler_steps_in_float32_around_a_half_precision_model(tiny_models_dir, monkeypatch, sampler, scheduler_class):
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    original_step = scheduler_class.step

    def recording_step(self, model_output, timestep, sample, *args, **kwargs):
        seen.append((model_output.dtype, sample.dtype))
        return original_step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(scheduler_class, "step", recording_step)
    engine = Engine(ModelRegistry(tiny_models_dir, builtin_dir=None, device="cpu", dtype="bfloat16"))
    request = GenerationRequest(prompt="a red circle", model="tiny-sd1", sampler=sampler, steps=4, width=64, height=64, seed=3)
    result = engine.generate(request)
    assert len(result.images) == 1 and len(seen) == 4
    assert set(seen) == {(torch.float32, torch.float32)}, f"the sampler was given {set(seen)}"
