"""The engine's pictures equal a reference built from k-diffusion (the functions A1111 1.10 samples with).

The reference here is assembled in the test from A1111's recipe, not from our sampling code: k-diffusion's
``CompVisDenoiser`` / ``CompVisVDenoiser`` around the demo UNet, CFG on x̂₀, k-diffusion's schedules and sampler
functions, ``torch.randn`` from a CPU generator seeded with the seed for the first noise and (continuing the same
generator) for ancestral steps, and k-diffusion's Brownian tree seeded with the seed for SDE samplers. Only the
prompt encoding and the VAE decode are shared with the engine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from tests._kdiffusion import load

STEPS = 8
SEED = 3
PROMPT = "a large yellow square, blue background"

# sampler → (k-diffusion function, A1111's "Automatic" schedule, noise kind, discards the next-to-last σ, options)
REFERENCE = {
    "Euler": ("sample_euler", "uniform", None, False, {}),
    "Euler a": ("sample_euler_ancestral", "uniform", "ancestral", False, {"eta": 1.0}),
    "Heun": ("sample_heun", "uniform", None, False, {}),
    "LMS": ("sample_lms", "uniform", None, False, {}),
    "DPM2": ("sample_dpm_2", "karras", None, True, {}),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", "ancestral", True, {"eta": 1.0}),
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", None, False, {}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", "ancestral", False, {"eta": 1.0}),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", "brownian", False, {"eta": 1.0}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", "brownian", False, {"eta": 1.0}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "exponential", "brownian", False, {"eta": 1.0, "solver_type": "heun"}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", "brownian", True, {"eta": 1.0}),
    # A1111 runs these two over the model's own σ range in txt2img, with eta 1 and n = steps
    "DPM fast": ("sample_dpm_fast", "model range", "ancestral", False, {"eta": 1.0}),
    "DPM adaptive": ("sample_dpm_adaptive", "model range", "ancestral", False, {"eta": 1.0}),
}


class _UNetAsCompVis:
    """What k-diffusion's CompVis wrappers expect: ``alphas_cumprod`` and ``apply_model(x, t, cond)``."""

    def __init__(self, unet, alphas_cumprod):
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0].float()


def _alphas_cumprod(config) -> torch.Tensor:
    """ᾱ as latent-diffusion builds it: scaled-linear βs in float64, cumulative product, stored as float32."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(torch.float32)


def _reference_latents(model, sampler: str, cfg_scale: float) -> torch.Tensor:
    k_sampling, k_external = load()
    function, schedule, noise_kind, discard, options = REFERENCE[sampler]
    config = model.pipeline.scheduler.config
    wrapper = _UNetAsCompVis(model.pipeline.unet, _alphas_cumprod(config))
    wrapped = (k_external.CompVisVDenoiser if config.prediction_type == "v_prediction" else k_external.CompVisDenoiser)(wrapper)
    conditioning = model.prompt_encoder.encode(PROMPT, "")
    embeds = torch.cat([conditioning.negative_embeds, conditioning.prompt_embeds])

    def guided(x, sigma):
        uncond, cond = wrapped(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=embeds).chunk(2)
        return uncond + (cond - uncond) * cfg_scale

    n = STEPS + 1 if discard else STEPS
    sigma_min, sigma_max = float(wrapped.sigmas[0]), float(wrapped.sigmas[-1])
    if schedule == "karras":
        sigmas = k_sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    elif schedule == "exponential":
        sigmas = k_sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    else:
        sigmas = wrapped.get_sigmas(n)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    if schedule == "model range":
        sigmas = wrapped.get_sigmas(n)  # the start latent still takes the (Automatic = Uniform) schedule's σ₀
    generator = torch.Generator().manual_seed(SEED)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=generator) * sigmas[0]
    kwargs = dict(options)
    if noise_kind == "ancestral":
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(shape, generator=generator)
    elif noise_kind == "brownian":
        kwargs["noise_sampler"] = k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[SEED])
    with torch.no_grad():
        if schedule == "model range":
            if function == "sample_dpm_fast":
                kwargs["n"] = STEPS
            return getattr(k_sampling, function)(guided, x, sigma_min, sigma_max, disable=True, **kwargs)
        return getattr(k_sampling, function)(guided, x, sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_the_engine_draws_the_k_diffusion_reference_picture(demo_engine, sampler):
    model = demo_engine.registry.load("sfumato-demo")
    cfg_scale = 5.0
    engine_image = demo_engine.generate(GenerationRequest(prompt=PROMPT, model="sfumato-demo", sampler=sampler, steps=STEPS,
                                                          cfg_scale=cfg_scale, seed=SEED, preview_every=0)).images[0].image
    reference = demo_engine._decode(model, _reference_latents(model, sampler, cfg_scale))[0]
    difference = np.abs(np.asarray(engine_image).astype(int) - np.asarray(reference).astype(int)).max()
    assert difference <= 2, f"{sampler}: max pixel difference {difference}/255"
