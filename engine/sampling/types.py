"""The contract shared by denoisers, samplers, schedules and noise sources.

Conventions (k-diffusion's, which A1111 and ComfyUI sample with):
- ``x`` lives in σ-space: ``x_σ = x_ᾱ · √(1 + σ²)``, where ``x_ᾱ`` is the latent a DDPM-style model sees
  scaled by √ᾱ. A txt2img start for a k-sampler is ``noise · σ₀``; an img2img start is ``init + noise · σ₀``.
- σ is a float32 tensor. A denoiser takes one σ per image (shape [B]); samplers pass ``sigmas[i] * s_in``.
- ``sigmas`` is the whole schedule, descending, usually ending in 0 (steps + 1 values).
- A sampler returns the latent that gets decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


class Denoiser(Protocol):
    """D(x, σ) → x̂₀ for a batch, with classifier-free guidance already applied."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    @property
    def uncond_denoised(self) -> torch.Tensor | None:
        """The last call's x̂₀ for the negative prompt alone (DDIM CFG++ needs it); the guided x̂₀ when CFG is off."""
        ...


class NoiseSource(Protocol):
    """Fresh noise shaped like ``x`` for the step from ``sigma`` to ``sigma_next`` (ancestral and SDE steps)."""

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step: previews, progress and cancellation all read this one record."""

    i: int  # the step just finished, 0-based
    x: torch.Tensor  # the latent after the step
    sigma: torch.Tensor  # σ at the start of the step
    sigma_hat: torch.Tensor  # σ the model was called at (differs from sigma when churn adds noise)
    denoised: torch.Tensor  # the step's x̂₀


StepCallback = Callable[[StepInfo], None]

SamplerFunction = Callable[..., torch.Tensor]
"""``(denoiser, x, sigmas, noise, callback=None, **options) -> x``; options are the sampler's own (eta, s_noise, ...)."""
