"""The DDPM noise table as LDM and SGM compute it, and the σs k-diffusion derives from it.

LDM's ``make_beta_schedule("linear", ...)`` squares a float64 linspace between √β_start and √β_end
(what diffusers calls "scaled_linear"), takes the cumulative product of 1 − β in float64, and
registers ᾱ as float32 (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"). SDXL's
``LegacyDDPMDiscretization`` does the same. k-diffusion's ``DiscreteSchedule`` then works with
σ = √((1 − ᾱ)/ᾱ) computed in float32 from that float32 ᾱ.
"""
from __future__ import annotations

import numpy as np
import torch


def ldm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                       schedule: str = "scaled_linear") -> torch.Tensor:
    """ᾱ_t for t = 0..steps−1, float64 arithmetic, stored as float32 as LDM registers it."""
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        raise ValueError(f"no LDM equivalent for beta schedule {schedule!r}")
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
    return torch.tensor(alphas_cumprod, dtype=torch.float32)


def table_for(scheduler_config) -> torch.Tensor:
    """ᾱ for a diffusers scheduler config (the keys every SD 1.x/2.x/XL folder carries)."""
    return ldm_alphas_cumprod(scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012),
                              scheduler_config.get("num_train_timesteps", 1000), scheduler_config.get("beta_schedule", "scaled_linear"))
