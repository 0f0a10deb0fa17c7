"""A model's training noise table: σ_t for every training timestep t, and the maps between σ and t.

A DDPM-style model is trained at discrete timesteps t = 0 … T−1 with cumulative signal fractions
ᾱ_t (Ho et al. 2020). In k-diffusion's σ-space (Karras et al. 2022) timestep t has noise level
σ_t = √((1 − ᾱ_t) / ᾱ_t). Every noise schedule picks its σs from this one table, so the table is built once per
model family and handed to the schedule functions in ``schedules.py``.

The arithmetic follows the reference implementations A1111 1.10 samples with, so σs agree to the float:
- ᾱ as the original latent-diffusion code builds it: βs and their cumulative product in float64, then
  stored as float32;
- σ from that float32 ᾱ, as k-diffusion's ``CompVisDenoiser`` computes it;
- ``sigma_to_t`` / ``t_to_sigma`` interpolate linearly in log σ, as k-diffusion's ``DiscreteSchedule`` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Align Your Steps (Sabour, Fidler & Kreis, 2024): NVIDIA's published 10-step σ schedules, 11 values from σ_max
# down to σ_min, for Stable Diffusion 1.5 and SDXL.
# Source: https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_SD15: tuple[float, ...] = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL: tuple[float, ...] = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

# What A1111's "Zero Terminal SNR" option writes into the last ᾱ after the rescale: the rescale makes it exactly 0
# (σ = ∞), and this keeps σ_T finite (≈ 4519) so the first step has a noise level to scale by.
ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ rescaled to zero terminal SNR: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
    Flawed", Algorithm 1, applied to ᾱ as A1111's "Zero Terminal SNR" noise schedule does.

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged; the last ᾱ is then set to
    ``ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD`` instead of 0. Computed in the dtype given (A1111 rescales the model's
    float32 buffer).
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    rescaled = root**2
    rescaled[-1] = ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD
    return rescaled


def _betas(beta_start: float, beta_end: float, beta_schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """Training βs in float64, as latent-diffusion's ``make_beta_schedule`` builds them (its "linear" is
    diffusers' "scaled_linear")."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; expected 'scaled_linear' or 'linear'")


def flow_shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = shift·t / (1 + (shift − 1)·t): Esser et al. 2024's timestep shift (§5.3.2) of a rectified-flow time t."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True, eq=False)
class NoiseTable:
    """σ_t for each training timestep t (float32, ascending: index 0 is the least noisy), plus the family's
    Align Your Steps list (None: the Align Your Steps schedule falls back to ``AYS_SD15``, as A1111 does for
    every model that is not SDXL).

    ``flow``: the model was trained on the rectified-flow path x_σ = (1 − σ)·x₀ + σ·ε (σ ≤ 1) rather than
    the variance-exploding x_σ = x₀ + σ·ε that k-diffusion's σ-space gives an ᾱ-trained model."""

    sigmas: torch.Tensor
    align_your_steps: tuple[float, ...] | None = None
    flow: bool = False
    shift: float = 1.0  # flow tables: the shift their σs were built with (``for_flow``)
    log_sigmas: torch.Tensor = field(init=False, repr=False)
    _alphas_cumprod: torch.Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        sigmas = torch.as_tensor(self.sigmas).detach().to(device="cpu", dtype=torch.float32)
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("a noise table needs a 1-D list of at least two σs")
        if not bool((sigmas[1:] >= sigmas[:-1]).all()) or not bool((sigmas > 0).all()):
            raise ValueError("noise table σs must be positive and ascending (index = training timestep)")
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())
        if self.align_your_steps is not None:
            object.__setattr__(self, "align_your_steps", tuple(float(s) for s in self.align_your_steps))

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: torch.Tensor, align_your_steps: tuple[float, ...] | None = None
    ) -> "NoiseTable":
        """The table for cumulative signal fractions ᾱ_t; σ is computed from ᾱ in float32, as k-diffusion's
        ``CompVisDenoiser`` does with a model's float32 ``alphas_cumprod`` buffer."""
        alphas = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float32)
        table = cls(((1 - alphas) / alphas) ** 0.5, align_your_steps)
        object.__setattr__(table, "_alphas_cumprod", alphas)  # kept exact rather than recomputed from σ
        return table

    @classmethod
    def for_betas(
        cls,
        beta_start: float,
        beta_end: float,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        align_your_steps: tuple[float, ...] | None = None,
    ) -> "NoiseTable":
        """The table of a model trained with a linear or scaled-linear β schedule (Ho et al. 2020; Rombach et al.
        2022), built as latent-diffusion builds it: βs and ᾱ = ∏(1 − β) in float64, stored as float32.
        ``zero_terminal_snr`` rescales the float32 ᾱ (``rescale_zero_terminal_snr``)."""
        betas = _betas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls.from_alphas_cumprod(alphas_cumprod, align_your_steps)

    @classmethod
    def for_flow(cls, shift: float = 1.0, num_train_timesteps: int = 1000) -> "NoiseTable":
        """The table of a rectified-flow model (Esser et al. 2024, "Scaling Rectified Flow Transformers", §5.3.2):
        t = 1/T … 1, shifted to σ = shift·t / (1 + (shift − 1)·t), as diffusers' ``FlowMatchEulerDiscreteScheduler``
        and ComfyUI's ``ModelSamplingDiscreteFlow`` build it (float64, stored as float32)."""
        t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        return cls(flow_shifted(t, shift).to(torch.float32), flow=True, shift=float(shift))

    def flow_sigma(self, t: float) -> float:
        """A flow table's σ at time t ∈ [0, 1] (unquantized): shift·t / (1 + (shift − 1)·t)."""
        return float(flow_shifted(torch.tensor(t, dtype=torch.float64), self.shift))

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``latents`` noised to σ along the model's training path: x₀ + σ·ε, or (1 − σ)·x₀ + σ·ε for flow."""
        if self.flow:
            return latents * (1 - sigma) + noise * sigma
        return latents + noise * sigma

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t (float32): as given when the table was built from ᾱ, else 1 / (1 + σ_t²)."""
        if self._alphas_cumprod is not None:
            return self._alphas_cumprod
        return (1 / (1 + self.sigmas.double() ** 2)).float()

    @property
    def sigma_min(self) -> float:
        """The smallest training σ (t = 0), as a Python float the way A1111 hands it to schedules."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest training σ (t = T − 1)."""
        return float(self.sigmas[-1])

    def __len__(self) -> int:
        return self.sigmas.numel()

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep for σ: linear interpolation in log σ between the two neighbouring table entries,
        clamped to [0, T − 1] (k-diffusion's ``DiscreteSchedule.sigma_to_t``, not quantized)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigma = sigma.log()
        above = log_sigma - self.log_sigmas[:, None] >= 0
        # The last table entry at or below σ: the running count of "at or below" peaks there first.
        low = above.cumsum(dim=0).argmax(dim=0).clamp(max=len(self) - 2)
        high = low + 1
        log_low, log_high = self.log_sigmas[low], self.log_sigmas[high]
        weight = ((log_low - log_sigma) / (log_low - log_high)).clamp(0, 1)
        return ((1 - weight) * low + weight * high).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ at fractional timestep t: log σ interpolated linearly between the neighbouring integer timesteps
        (k-diffusion's ``DiscreteSchedule.t_to_sigma``)."""
        t = torch.as_tensor(t).float()
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()
