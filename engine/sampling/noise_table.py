"""Placeholder noise table (the `schedules` branch replaces this file): σ(t) for a DDPM β schedule.

σ_t = √((1 − ᾱ_t) / ᾱ_t) (Karras et al. 2022, "Elucidating the Design Space", table 1, VP); t ↔ σ by
linear interpolation in log σ, as k-diffusion's DiscreteSchedule does.
"""
from __future__ import annotations

import torch


class NoiseTable:
    def __init__(self, sigmas: torch.Tensor, align_your_steps=None):
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self.log_sigmas = self.sigmas.log()
        self.align_your_steps = align_your_steps

    @classmethod
    def for_betas(cls, beta_start: float, beta_end: float, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                  zero_terminal_snr: bool = False, align_your_steps=None) -> "NoiseTable":
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_alphas_cumprod(torch.cumprod(1 - betas, 0), align_your_steps)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, align_your_steps=None) -> "NoiseTable":
        table = cls(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, align_your_steps)
        table.alphas_cumprod = alphas_cumprod.to(torch.float32)
        return table

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        low_value, high_value = self.log_sigmas[low], self.log_sigmas[high]
        w = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
