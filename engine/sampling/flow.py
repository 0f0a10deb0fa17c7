"""Samplers on a rectified-flow model (SD 3.5, Flux): the path x_σ = (1 − σ)·x₀ + σ·ε with σ ∈ [0, 1].

The denoiser already gives x̂₀ = x − σ·v, so what changes on flow is only how a sampler *adds* noise or reads ᾱ.
Each sampler runs in one of three ways (its row's ``on_flow`` in ``table``):

- ``FLOW_AS_IS``, the ODE samplers on σ (Euler, Heun, LMS, DPM2, DPM++ 2M, and PLMS on its own grid's σs): the
  probability-flow ODE of the flow path is dx/dσ = (x − x̂₀)/σ = v, the same equation k-diffusion integrates, so
  they run unchanged (Euler is then exactly diffusers' ``FlowMatchEulerDiscreteScheduler`` step). PLMS combines
  dx/dσ across steps; on the view below its first step would combine ε = (y − x̂₀)/s at s ≈ 3·10⁴ and divide the
  model's inconsistencies by √ᾱ ≈ 3·10⁻⁵ (wrong colours on the flow demo at 20 steps).
- ``FLOW_STEP``, the samplers that add noise as they go down a σ schedule (Euler a, DPM2 a, DPM++ 2S a, DPM fast
  and adaptive, Restart): their deterministic part steps in σ as before; the re-noise keeps the (1 − σ) scale of
  the signal (:func:`ancestral_step`, :func:`renoise`), as ComfyUI's ``*_RF`` ancestral samplers do. DPM fast
  and adaptive then solve over the flow σ range (log σ from 0), not over s up to 3·10⁴, where half their steps
  fell above σ = 0.99; Restart's Heun steps stay on flow σs and its interval (0.1 → 2 in A1111's σ) is read as
  the flow σs of those levels, 1/11 → 2/3.
- ``FLOW_VARIANCE_EXPLODING``, every other sampler (the SDE samplers and A1111's ᾱ-stepping DDIM, UniPC, LCM,
  DDPM): a flow latent is a scaled variance-exploding one,
  x_σ = (1 − σ)·(x₀ + s·ε) with s = σ/(1 − σ) (Karras et al. 2022, §2: any α(t), σ(t) path is a scaled VE path),
  so the sampler runs unchanged on x/(1 − σ) at noise level s with the denoiser, noise source and σs translated
  (:class:`VarianceExplodingView`). The results are the flow forms the peers publish: DPM-Solver++ SDE steps in
  the half-log-SNR λ = log((1 − σ)/σ) with α = 1 − σ (ComfyUI's ``sigma_to_half_log_snr`` for CONST models),
  DDIM η = 0 is Euler in σ, DDIM η = 1 is DDPM's posterior, and LCM re-noises as (1 − σ_next)·x̂₀ + σ_next·ε.
  σ = 1 would be s = ∞, so σs are capped at σ(t = 1 − 10⁻⁴) as ComfyUI's ``offset_first_sigma_for_snr`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .types import Denoiser, NoiseSource, StepCallback, StepInfo

FLOW_AS_IS = "as is"
FLOW_STEP = "flow noise step"
FLOW_VARIANCE_EXPLODING = "variance-exploding view"

# ComfyUI's percent offset for the first σ of a flow schedule: σ(t = 1 − 10⁻⁴) stands in for σ = 1 (infinite λ).
TOP_PERCENT_OFFSET = 1e-4


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rectified-flow ancestral split of a step σ → σ_next: (σ_down, scale, noise_std).

    σ_down = σ_next·(1 + (σ_next/σ − 1)·η) (ComfyUI's "downstep ratio"; η = 0 gives σ_down = σ_next, plain Euler);
    after the deterministic step to σ_down the latent is brought to σ_next by :func:`renoise`.
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    scale, noise_std = renoise(sigma_down, sigma_next)
    return sigma_down, scale, noise_std


def renoise(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, noise_std) taking a flow latent at σ_from up to σ_to ≥ σ_from: x ← scale·x + noise_std·z.

    x = (1 − σ_from)·x₀ + σ_from·ε becomes (1 − σ_to)·x₀ + σ_to·ε' with scale = (1 − σ_to)/(1 − σ_from) and
    noise_std = √(σ_to² − σ_from²·scale²) (ComfyUI's "renoise coefficient"): the signal keeps the path's
    (1 − σ) scale and the noise totals σ_to.
    """
    scale = (1 - sigma_to) / (1 - sigma_from)
    return scale, (sigma_to ** 2 - sigma_from ** 2 * scale ** 2).clamp(min=0) ** 0.5


def top_sigma(table: Any) -> float:
    """The largest σ a variance-exploding view can take: σ at t = 1 − 10⁻⁴ on the table's shifted curve."""
    return float(table.flow_sigma(1 - TOP_PERCENT_OFFSET))


def to_variance_exploding(sigma: torch.Tensor) -> torch.Tensor:
    """s = σ/(1 − σ): the VE noise level of flow σ (s/(1 + s) gives σ back)."""
    return sigma / (1 - sigma)


def to_flow(s: torch.Tensor) -> torch.Tensor:
    return s / (1 + s)


def capped(sigmas: torch.Tensor, table: Any) -> torch.Tensor:
    """Flow σs with σ = 1 (and anything above the cap) replaced by :func:`top_sigma`."""
    return sigmas.clamp(max=top_sigma(table))


def variance_exploding_table(table: Any):
    """The flow table seen as a VE model's: every σ as s = σ/(1 − σ), the top one capped first. Its ᾱ is
    1/(1 + s²), which is what A1111's timestep samplers step on."""
    from .noise_table import NoiseTable

    return NoiseTable(to_variance_exploding(capped(table.sigmas.double(), table)).float(), table.align_your_steps)


@dataclass
class VarianceExplodingView:
    """A flow denoiser seen as a VE one: D_VE(y, s) = D(y·(1 − σ), σ) with σ = s/(1 + s) (x = (1 − σ)·y)."""

    denoiser: Denoiser

    def __call__(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sigma = to_flow(s.to(torch.float32))
        return self.denoiser(y * (1 - sigma).reshape([-1] + [1] * (y.ndim - 1)), sigma)

    @property
    def uncond_denoised(self) -> torch.Tensor | None:
        return self.denoiser.uncond_denoised

    def noise(self, noise: NoiseSource | None) -> NoiseSource | None:
        """The pass's noise source asked with flow σs (a Brownian tree spans the flow σs)."""
        if noise is None:
            return None
        return lambda s, s_next: noise(to_flow(torch.as_tensor(s)), to_flow(torch.as_tensor(s_next)))

    @staticmethod
    def callback(callback: StepCallback | None) -> StepCallback | None:
        """Step reports with flow σs. x̂₀ is the same on both views; x after the last step (σ = 0) is too."""
        if callback is None:
            return None

        def report(info: StepInfo) -> None:
            callback(StepInfo(i=info.i, x=info.x, sigma=to_flow(torch.as_tensor(info.sigma)),
                              sigma_hat=to_flow(torch.as_tensor(info.sigma_hat)), denoised=info.denoised))
        return report


def from_variance_exploding(y: torch.Tensor, s_end: torch.Tensor | float) -> torch.Tensor:
    """The flow latent x = (1 − σ)·y for a VE latent y at noise level s_end."""
    return y * (1 - float(to_flow(torch.as_tensor(float(s_end)))))
