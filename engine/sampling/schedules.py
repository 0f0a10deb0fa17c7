"""Noise schedules: which σs a sampler steps through, as plain functions of a model's noise table.

Each function is ``(table, steps) -> σs``: a float32 CPU tensor, descending, that the sampler walks from the first
σ to the last. They reproduce A1111 1.10's schedule list value for value, quirks included, so a seed and its
infotext give the same σs here as there:
- σ_min / σ_max are the model's own training range (``table.sigma_min`` / ``table.sigma_max``);
- most end with an appended 0 (steps + 1 values), but KL Optimal ends at σ_min, and DDIM can return more
  than steps + 1 values when 1000 is not a multiple of the step count;
- Align Your Steps ignores the model's range and interpolates the family's published list.

``SCHEDULES`` is the table front-ends list, in A1111's dropdown order; ``find_schedule`` resolves a name from a
request, a preset or an infotext. "Automatic" is not a schedule: the sampler table resolves it to the sampler's
own default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

from ..errors import ValidationError
from .noise_table import AYS_SD15, NoiseTable

ScheduleFunction = Callable[..., torch.Tensor]
"""``(table: NoiseTable, steps: int, **options) -> σs`` (float32, CPU, descending)."""


def _with_final_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """The σs followed by 0, the clean end most schedules step to."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _as_sigmas(values) -> torch.Tensor:
    """A list or array of σs as the float32 CPU tensor every schedule returns."""
    return torch.tensor(np.array(values, dtype=np.float64), dtype=torch.float32)


def uniform(table: NoiseTable, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T−1 down to 0, σ read from the table in log space, then 0
    (k-diffusion's ``DiscreteSchedule.get_sigmas``; the timestep grid of Ho et al. 2020)."""
    timesteps = torch.linspace(len(table) - 1, 0, steps)
    return _with_final_zero(table.t_to_sigma(timesteps))


def karras(table: NoiseTable, steps: int, *, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 over the model's whole σ range (see ``karras_sigmas``)."""
    return karras_sigmas(steps, table.sigma_min, table.sigma_max, rho=rho)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5:
    σ_i = (σ_max^(1/ρ) + i/(N−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ with ρ = 7, then 0.

    Takes the range itself because Restart also walks Karras schedules over parts of it."""
    ramp = torch.linspace(0, 1, steps)
    low = sigma_min ** (1 / rho)
    high = sigma_max ** (1 / rho)
    return _with_final_zero((high + ramp * (low - high)) ** rho)


def exponential(table: NoiseTable, steps: int) -> torch.Tensor:
    """σ evenly spaced in log σ from σ_max to σ_min, then 0 (k-diffusion's exponential schedule; the
    constant-log-step spacing of DPM-Solver, Lu et al. 2022)."""
    log_sigmas = torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), steps)
    return _with_final_zero(log_sigmas.exp())


def polyexponential(table: NoiseTable, steps: int, *, rho: float = 1.0) -> torch.Tensor:
    """log σ = log σ_min + r^ρ · (log σ_max − log σ_min), r going linearly from 1 to 0, then 0
    (k-diffusion's polynomial-in-log-σ schedule; ρ = 1 is the exponential schedule)."""
    ramp = torch.linspace(1, 0, steps) ** rho
    log_min = math.log(table.sigma_min)
    return _with_final_zero(torch.exp(ramp * (math.log(table.sigma_max) - log_min) + log_min))


def _timestep_range(table: NoiseTable) -> tuple[float, float]:
    """The fractional timesteps of σ_max and σ_min."""
    return float(table.sigma_to_t(table.sigma_max)), float(table.sigma_to_t(table.sigma_min))


def sgm_uniform(table: NoiseTable, steps: int) -> torch.Tensor:
    """steps + 1 timesteps evenly spaced from σ_max's to σ_min's, the last dropped, then 0: Stability's
    generative-models (SGM) uniform discretization, which starts at the last training timestep as the "trailing"
    spacing of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed") does."""
    start, end = _timestep_range(table)
    timesteps = torch.linspace(start, end, steps + 1)[:-1]
    return _with_final_zero(table.t_to_sigma(timesteps))


def kl_optimal(table: NoiseTable, steps: int) -> torch.Tensor:
    """σ_i = tan((1 − i/N) · atan σ_max + i/N · atan σ_min) for i = 0 … N: the KL-divergence-optimal schedule
    derived in Sabour, Fidler & Kreis 2024, "Align Your Steps". Ends at σ_min, not 0, as A1111's does."""
    arctan_min = torch.arctan(torch.tensor(table.sigma_min))
    arctan_max = torch.arctan(torch.tensor(table.sigma_max))
    fraction = torch.arange(steps + 1) / steps
    return torch.tan(fraction * arctan_min + (1.0 - fraction) * arctan_max)


def _log_linear_resample(sigmas: tuple[float, ...], count: int) -> np.ndarray:
    """``count`` values through a descending list, interpolated linearly in log σ over an even grid."""
    ascending_logs = np.log(np.asarray(sigmas[::-1], dtype=np.float64))
    grid = np.linspace(0, 1, len(sigmas))
    resampled = np.interp(np.linspace(0, 1, count), grid, ascending_logs)
    return np.exp(resampled)[::-1]


def align_your_steps(table: NoiseTable, steps: int) -> torch.Tensor:
    """Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models":
    the family's published list (``table.align_your_steps``, else the SD 1.5 list), then 0. At another step
    count the list is resampled to ``steps`` values in log σ, as NVIDIA's how-to page suggests. Ignores the
    model's own σ range. NVIDIA publishes no list for flow models: on a flow table the SD 1.5 list is taken at equal
    signal-to-noise ratio, σ_flow = s/(1 + s) for each published s (a flow latent at σ is (1 − σ)·(x₀ + s·ε))."""
    published = table.align_your_steps or AYS_SD15
    if table.flow:
        published = tuple(s / (1 + s) for s in published)
    chosen = published if steps == len(published) else _log_linear_resample(published, steps)
    return _with_final_zero(_as_sigmas(chosen))


def simple(table: NoiseTable, steps: int) -> torch.Tensor:
    """Every (T/steps)-th table σ counting down from the top, then 0 (ComfyUI's "simple" schedule)."""
    stride = len(table) / steps
    picked = [float(table.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return _with_final_zero(_as_sigmas(picked))


def normal(table: NoiseTable, steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from σ_max's to σ_min's (both ends included), then 0
    (ComfyUI's "normal" schedule)."""
    start, end = _timestep_range(table)
    return _with_final_zero(table.t_to_sigma(torch.linspace(start, end, steps)))


def ddim(table: NoiseTable, steps: int) -> torch.Tensor:
    """DDIM's uniform timestep skip (Song et al. 2021, "Denoising Diffusion Implicit Models"): table σs at
    t = 1, 1 + k, 1 + 2k, … below T with k = T // steps, descending, then 0. When T is not a multiple of the step
    count this yields more than steps + 1 values, as in A1111."""
    stride = max(len(table) // steps, 1)
    return _with_final_zero(table.sigmas[1::stride].flip(0).clone())


def beta(table: NoiseTable, steps: int, *, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024, "Beta Sampling is All You Need" (arXiv:2407.12173):
    σ = σ_min + F⁻¹(u) · (σ_max − σ_min) with F the Beta(α, β) CDF and u going linearly from 1 to 0, then 0."""
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    sigma_min, sigma_max = table.sigma_min, table.sigma_max
    return _with_final_zero(_as_sigmas(sigma_min + quantiles * (sigma_max - sigma_min)))


def _no_infotext_extras(**options) -> dict[str, object]:
    return {}


def _beta_infotext_extras(alpha: float = 0.6, beta: float = 0.6, **_) -> dict[str, object]:
    """A1111 records the Beta distribution's parameters beside "Schedule type: Beta"."""
    return {"Beta schedule alpha": alpha, "Beta schedule beta": beta}


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule as front-ends and infotexts name it.

    ``name`` is A1111's label (dropdown and infotext "Schedule type"), ``a1111_name`` its internal name;
    ``aliases`` are further names accepted on input. ``default_rho`` is set for the schedules A1111's "rho"
    setting overrides. ``infotext_extras(**options)`` gives the extra infotext fields the schedule writes for the
    options it was run with.
    """

    name: str
    function: ScheduleFunction
    a1111_name: str
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None
    infotext_extras: Callable[..., dict[str, object]] = _no_infotext_extras


SCHEDULES: tuple[ScheduleSpec, ...] = (
    ScheduleSpec(name="Uniform", function=uniform, a1111_name="uniform"),
    ScheduleSpec(name="Karras", function=karras, a1111_name="karras", default_rho=7.0),
    ScheduleSpec(name="Exponential", function=exponential, a1111_name="exponential"),
    ScheduleSpec(name="Polyexponential", function=polyexponential, a1111_name="polyexponential", default_rho=1.0),
    ScheduleSpec(
        name="SGM Uniform", function=sgm_uniform, a1111_name="sgm_uniform", aliases=("SGMUniform", "sgm-uniform")
    ),
    ScheduleSpec(name="KL Optimal", function=kl_optimal, a1111_name="kl_optimal", aliases=("kl-optimal",)),
    ScheduleSpec(
        name="Align Your Steps",
        function=align_your_steps,
        a1111_name="align_your_steps",
        aliases=("align-your-steps", "AlignYourSteps"),
    ),
    ScheduleSpec(name="Simple", function=simple, a1111_name="simple"),
    ScheduleSpec(name="Normal", function=normal, a1111_name="normal"),
    ScheduleSpec(name="DDIM", function=ddim, a1111_name="ddim"),
    ScheduleSpec(name="Beta", function=beta, a1111_name="beta", infotext_extras=_beta_infotext_extras),
)


def _name_key(name: str) -> str:
    """Names compare case-insensitively, with spaces, hyphens and underscores alike."""
    return name.strip().casefold().replace(" ", "_").replace("-", "_")


_BY_NAME: dict[str, ScheduleSpec] = {
    _name_key(known): spec for spec in SCHEDULES for known in (spec.name, spec.a1111_name, *spec.aliases)
}


def find_schedule(name: str) -> ScheduleSpec:
    """The schedule called ``name``: its label, A1111's internal name or an alias, in any case."""
    spec = _BY_NAME.get(_name_key(name)) if isinstance(name, str) else None
    if spec is None:
        choices = ", ".join(spec.name for spec in SCHEDULES)
        raise ValidationError("schedule", f"unknown schedule {name!r}; choose one of: {choices}")
    return spec
