"""A half-precision model must not change the sampler's arithmetic: a seed gives the CPU's picture on a GPU.

Measured on an H200 (scripts/check_on_cuda.py): before, Euler a on the demo model in float16 differed from the
CPU picture by up to 244/255; with the sampler in float32 around the half-precision model, by at most 4/255.
This machine has no GPU, so the test runs the model in bfloat16 on the CPU and checks what the sampler sees and
what the model is given.
"""
from __future__ import annotations

import pytest
import torch

from engine import Engine, GenerationRequest, ModelRegistry
from engine.sampling import samplers as sampler_functions


@pytest.mark.parametrize("sampler, function_name", [("Euler a", "sample_euler_ancestral"), ("DPM++ 2M", "sample_dpmpp_2m")])
def test_the_sampler_steps_in_float32_around_a_half_precision_model(tiny_models_dir, monkeypatch, sampler, function_name):
    sampler_sees: list[tuple[torch.dtype, torch.dtype]] = []
    model_gets: list[torch.dtype] = []
    original = getattr(sampler_functions, function_name)

    def recording_sampler(denoiser, x, sigmas, noise=None, callback=None, **options):
        def recording_denoiser(x_now, sigma):
            denoised = denoiser(x_now, sigma)
            sampler_sees.append((x_now.dtype, denoised.dtype))
            return denoised

        return original(recording_denoiser, x, sigmas, noise, callback=callback, **options)

    monkeypatch.setattr(sampler_functions, function_name, recording_sampler)
    engine = Engine(ModelRegistry(tiny_models_dir, builtin_dir=None, device="cpu", dtype="bfloat16"))
    unet = engine.registry.load("tiny-sd1").pipeline.unet
    hook = unet.register_forward_pre_hook(lambda module, args: model_gets.append(args[0].dtype))
    try:
        request = GenerationRequest(prompt="a red circle", model="tiny-sd1", sampler=sampler, steps=4, width=64, height=64, seed=3)
        result = engine.generate(request)
    finally:
        hook.remove()
    assert len(result.images) == 1 and len(sampler_sees) == 4
    assert set(sampler_sees) == {(torch.float32, torch.float32)}, f"the sampler was given {set(sampler_sees)}"
    assert set(model_gets) == {torch.bfloat16}
