"""Shared pieces for the sampler-parity tests: a noise table, model functions in A1111's coordinates, and a
σ-contract denoiser over them that mirrors what the engine's denoiser does (k-diffusion's CompVis wrappers).

The model functions take (x_ᾱ, t) — the latent as the UNet sees it and a possibly fractional timestep — and give
(uncond output, cond output). References in the tests call them in ᾱ-space with A1111's timesteps; the samplers
under test reach them only through :class:`SigmaDenoiser`.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEMO_MODEL = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
CFG_SCALE = 3.0


class StandInNoiseTable:
    """Minimal stand-in for engine.sampling.noise_table.NoiseTable (same names), SD's scaled-linear betas."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def for_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                  num_train_timesteps: int = 1000) -> "StandInNoiseTable":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, dim=0))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """k-diffusion's DiscreteSchedule.sigma_to_t: linear in log σ between integer timesteps."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


def noise_table():
    try:
        from engine.sampling.noise_table import NoiseTable
    except ImportError:
        return StandInNoiseTable.for_betas()
    return NoiseTable.for_betas(0.00085, 0.012)


def _toy_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """A smooth ᾱ(t) close to SD's scaled-linear schedule: exp(−∫₀ᵗ β), β(k) = (√β₀ + k(√β₁ − √β₀)/999)²."""
    a, d = 0.00085 ** 0.5, (0.012 ** 0.5 - 0.00085 ** 0.5) / 999
    return torch.exp(-((a + d * t) ** 3 - a ** 3) / (3 * d))


def toy_eps_model(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An analytic ε(x_ᾱ, t) for the unconditional and the conditional prompt.

    The exact ε for Gaussian data N(m, 0.5²) (a different mean m per prompt), plus a small smooth nonlinear term
    in x and t, so that samples stay of order one and every step's arithmetic matters.
    """
    t = t.reshape(-1, 1, 1, 1).to(torch.float32)
    a = _toy_alpha_bar(t)
    pattern = torch.linspace(-1, 1, x.numel() // x.shape[0]).reshape(x.shape[1:])

    def eps(mean):
        gaussian = (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * 0.25 + 1 - a)
        return gaussian + 0.05 * torch.tanh(x) * torch.sin(t / 150)

    return eps(0.2 * pattern), eps(0.8 * pattern.flip(-1))


def demo_unet_model():
    """The demo model's UNet (v-prediction) with fixed random prompt embeddings, batched uncond+cond."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(DEMO_MODEL / "unet").eval()
    generator = torch.Generator().manual_seed(7)
    embeds = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)

    @torch.no_grad()
    def model(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.reshape(-1).to(torch.float32).expand(x.shape[0])
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=embeds.repeat_interleave(x.shape[0], 0)).sample
        return out[: x.shape[0]], out[x.shape[0]:]

    return model


def a1111_eps(model, prediction: str, alphas_cumprod: torch.Tensor):
    """A1111's CFGDenoiserTimesteps over CompVisTimesteps(V)Denoiser: guided ε and the unconditional ε.

    A v-model's output becomes ε with ᾱ at the timestep truncated to an integer, as A1111 does.
    """
    def eps(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uncond, cond = model(x, t)
        if prediction == "v":
            a = alphas_cumprod[t.reshape(-1).to(torch.int)].reshape(-1, 1, 1, 1)
            uncond, cond = a.sqrt() * uncond + (1 - a).sqrt() * x, a.sqrt() * cond + (1 - a).sqrt() * x
        return uncond + CFG_SCALE * (cond - uncond), uncond

    return eps


class SigmaDenoiser:
    """D(x_σ, σ) → x̂₀ as the engine's denoiser computes it: t = sigma_to_t(σ), input x/√(σ²+1), CFG on x̂₀."""

    def __init__(self, model, prediction: str, table):
        self.model, self.prediction, self.table = model, prediction, table
        self.uncond_denoised = None
        self.timesteps: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = self.table.sigma_to_t(sigma)
        self.timesteps.append(float(t[0]))
        s = sigma.reshape(-1, 1, 1, 1)
        x_in = x / (s ** 2 + 1) ** 0.5
        outputs = self.model(x_in, t)
        if self.prediction == "v":  # k-diffusion CompVisVDenoiser
            uncond, cond = (x / (s ** 2 + 1) - o * s / (s ** 2 + 1) ** 0.5 for o in outputs)
        else:  # CompVisDenoiser
            uncond, cond = (x - s * o for o in outputs)
        self.uncond_denoised = uncond
        return uncond + CFG_SCALE * (cond - uncond)


class ListedNoise:
    """A NoiseSource handing out a fixed list of tensors in order, recording the σ pairs it was asked for."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self.calls = list(tensors), []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.tensors[len(self.calls) - 1]


def noises(count: int, shape=(1, 4, 8, 8), seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def model_for(name: str, demo_unet):
    """(model, parameterization) for a test id: the analytic toy ε-model ("toy") or the demo UNet (v)."""
    return (toy_eps_model, "eps") if name == "toy" else (demo_unet, "v")
