"""A1111's "LCM" sampler: latent consistency model steps (Luo et al. 2023, "Latent Consistency Models").

A consistency model maps any noisy latent straight to x̂₀; sampling alternates that jump with re-noising to the
next σ. LCM was distilled on 50 of the 1000 training timesteps (t = 19, 39, …, 999), so A1111 snaps every σ to
the nearest of those (in log σ) before calling the model, and blends the result with the input by the LCM
boundary-condition scalings c_skip, c_out of that timestep.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .types import Denoiser, NoiseSource, StepCallback, StepInfo

__all__ = ["LCM_ORIGINAL_STEPS", "lcm_timesteps", "lcm_sigmas", "lcm_sigma_range", "sample_lcm"]

LCM_ORIGINAL_STEPS = 50  # the timesteps LCM was distilled on
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def lcm_timesteps(num_train_timesteps: int = 1000) -> torch.Tensor:
    """The integer timesteps LCM knows, ascending: t_j = j·s + s − 1 with s = N/50 (19, 39, …, 999)."""
    skip = num_train_timesteps // LCM_ORIGINAL_STEPS
    return torch.arange(LCM_ORIGINAL_STEPS) * skip + (skip - 1)


def _lcm_log_sigmas(table: Any) -> torch.Tensor:
    return table.sigmas[lcm_timesteps(len(table.sigmas))].to(torch.float32).log()


def lcm_sigma_range(table: Any) -> tuple[float, float]:
    """(σ_min, σ_max) of LCM's timesteps: what A1111 hands the other schedule types (Karras, …) with LCM."""
    sigmas = table.sigmas[lcm_timesteps(len(table.sigmas))]
    return float(sigmas[0]), float(sigmas[-1])


def lcm_sigmas(table: Any, steps: int) -> torch.Tensor:
    """LCM's own schedule, what A1111's "Automatic" gives it: ``steps`` σs then 0.

    Uniform in timestep from 999 to 19, each read by log-σ interpolation between LCM's 50 timesteps.
    """
    timesteps = lcm_timesteps(len(table.sigmas))
    skip = int(timesteps[1] - timesteps[0])
    t = torch.linspace(float(timesteps[-1]), float(timesteps[0]), steps)
    position = ((t - (skip - 1)) / skip).clamp(0, LCM_ORIGINAL_STEPS - 1)
    log_sigmas = _lcm_log_sigmas(table)
    low, high, w = position.floor().long(), position.ceil().long(), position.frac()
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
               callback: StepCallback | None = None, *, table: Any, output_as_eps: bool = False) -> torch.Tensor:
    """LCM multistep sampling (Luo et al. 2023, Algorithm 1) as A1111 runs it.

    Start: noise·σ₀ (a k-sampler; A1111's "Automatic" schedule for it is :func:`lcm_sigmas`).
    Per step: snap σ to the nearest LCM timestep t (in log σ), run the model at t on the input scaled for the
    unsnapped σ, form ε from the model's x̂₀ and x̂ = x − σ·ε, blend
    ``c_out(t)·x̂ + c_skip(t)·x`` and re-noise with σ_next·z (z from ``noise``) unless σ_next = 0.
    The denoiser is called at ``table.sigmas[t]`` (an exact integer timestep) with x rescaled to match.

    A1111 takes every model's raw output as ε, so on a v-prediction model it paints noise; ``output_as_eps=True``
    reproduces that for v-models (the tests compare with A1111 that way). By default the model's own
    parameterization is honoured, and LCM on a v-model draws the picture (the README lists this exception).
    """
    log_lcm_sigmas = _lcm_log_sigmas(table)
    lcm_t = lcm_timesteps(len(table.sigmas))
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        index = int(torch.argmin((math.log(sigma) - log_lcm_sigmas).abs()))
        t = int(lcm_t[index])
        sigma_t = float(table.sigmas[t])
        # The model must see x/√(σ²+1); the denoiser divides by √(σ_t²+1), so hand it x scaled by the ratio.
        x_model = x * (math.sqrt(1.0 + sigma_t ** 2) / math.sqrt(1.0 + sigma ** 2))
        guided = denoiser(x_model, torch.full((x.shape[0],), sigma_t, dtype=torch.float32, device=x.device))
        if output_as_eps:
            # Undo a v-model's v → x̂₀ conversion to get the raw output, which A1111 then takes as ε.
            eps = (x_model / (1.0 + sigma_t ** 2) - guided) * (math.sqrt(1.0 + sigma_t ** 2) / sigma_t)
        else:
            eps = (x_model - guided) / sigma_t
        scaled_t = t * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA ** 2 / (scaled_t ** 2 + LCM_SIGMA_DATA ** 2)
        c_out = scaled_t / math.sqrt(scaled_t ** 2 + LCM_SIGMA_DATA ** 2)
        denoised = c_out * (x - sigma * eps) + c_skip * x
        x = denoised
        if float(sigmas[i + 1]) > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(StepInfo(i=i, x=x, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised))
    return x
