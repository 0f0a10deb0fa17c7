"""A1111 1.10's schedule types (modules/sd_schedulers.py), each written here from its published formula.

Every function takes (n, sigma_min, sigma_max, wrap) and returns float32 σs, descending. ``wrap`` is
k-diffusion's ``CompVisDenoiser`` (or A1111's LCM variant), whose ``sigmas``, ``sigma_to_t`` and
``t_to_sigma`` the table-based schedules read; sigma_min and sigma_max are its first and last σ.

- Uniform: k-diffusion's ``get_sigmas``: n fractional t evenly from 999 to 0, then 0.
- SGM Uniform: n fractional t evenly from t(σ_max) to t(σ_min) over n+1 points, the last dropped, then 0.
- Karras: Karras et al. 2022 ("Elucidating the Design Space..."), eq. 5, ρ = 7, then 0.
- Exponential: σ evenly spaced in log σ, then 0.
- Polyexponential: log σ interpolated by a ramp raised to ρ = 1, then 0.
- KL Optimal: Sabour et al. 2024 ("Align Your Steps", appendix): tan of a linear blend of arctan σ;
  A1111's version returns n+1 values ending at σ_min, not 0.
- Align Your Steps: NVIDIA's published 10-step σs for SD 1.5 and SDXL, log-linearly resampled to n, then 0.
- Simple: every (1000/n)-th σ of the table from the top, then 0.
- Normal: n fractional t evenly from t(σ_max) to t(σ_min) inclusive, then 0.
- DDIM: the table σ at t = 1, 1+k, 1+2k, ... (k = 1000 // n), reversed, then 0.
- Beta: Lee et al. 2024 ("Beta Sampling is All You Need"), Beta(0.6, 0.6) quantiles spread over [σ_min, σ_max], then 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BETA_ALPHA = 0.6  # A1111's defaults for its beta_dist_alpha / beta_dist_beta settings
BETA_BETA = 0.6
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0
AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def _then_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def uniform(n, sigma_min, sigma_max, wrap, is_sdxl=False):
    return wrap.get_sigmas(n)


def sgm_uniform(n, sigma_min, sigma_max, wrap, is_sdxl=False):
    start, end = wrap.sigma_to_t(torch.tensor(sigma_max)), wrap.sigma_to_t(torch.tensor(sigma_min))
    ts = torch.linspace(start, end, n + 1)[:-1]
    return torch.FloatTensor([float(wrap.t_to_sigma(t)) for t in ts] + [0.0])


def karras(n, sigma_min, sigma_max, wrap=None, is_sdxl=False, rho=KARRAS_RHO):
    ramp = torch.linspace(0, 1, n)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _then_zero((high + ramp * (low - high)) ** rho)


def exponential(n, sigma_min, sigma_max, wrap=None, is_sdxl=False):
    return _then_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n, sigma_min, sigma_max, wrap=None, is_sdxl=False, rho=POLYEXPONENTIAL_RHO):
    ramp = torch.linspace(1, 0, n) ** rho
    return _then_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def kl_optimal(n, sigma_min, sigma_max, wrap=None, is_sdxl=False):
    low, high = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    fraction = torch.arange(n + 1) / n
    return torch.tan(fraction * low + (1.0 - fraction) * high)


def align_your_steps(n, sigma_min, sigma_max, wrap=None, is_sdxl=False):
    published = list(AYS_SDXL if is_sdxl else AYS_SD1)
    if n == len(published):
        return torch.FloatTensor(published + [0.0])
    # log-linear resampling of the decreasing list onto n points
    xs = np.linspace(0, 1, len(published))
    ys = np.log(published[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.FloatTensor(np.append(resampled, [0.0]))


def simple(n, sigma_min, sigma_max, wrap, is_sdxl=False):
    stride = len(wrap.sigmas) / n
    return torch.FloatTensor([float(wrap.sigmas[-(1 + int(i * stride))]) for i in range(n)] + [0.0])


def normal(n, sigma_min, sigma_max, wrap, is_sdxl=False):
    start, end = wrap.sigma_to_t(torch.tensor(sigma_max)), wrap.sigma_to_t(torch.tensor(sigma_min))
    return torch.FloatTensor([float(wrap.t_to_sigma(t)) for t in torch.linspace(start, end, n)] + [0.0])


def ddim(n, sigma_min, sigma_max, wrap, is_sdxl=False):
    stride = max(len(wrap.sigmas) // n, 1)
    picked = [float(wrap.sigmas[t]) for t in range(1, len(wrap.sigmas), stride)]
    return torch.FloatTensor(picked[::-1] + [0.0])


def beta(n, sigma_min, sigma_max, wrap=None, is_sdxl=False):
    from scipy import stats

    quantiles = [stats.beta.ppf(q, BETA_ALPHA, BETA_BETA) for q in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0])


SCHEDULES = {
    "Uniform": uniform,
    "Karras": karras,
    "Exponential": exponential,
    "Polyexponential": polyexponential,
    "SGM Uniform": sgm_uniform,
    "KL Optimal": kl_optimal,
    "Align Your Steps": align_your_steps,
    "Simple": simple,
    "Normal": normal,
    "DDIM": ddim,
    "Beta": beta,
}
SCHEDULE_TYPES = ("Automatic", *SCHEDULES)  # A1111 1.10's "Schedule type" list, in its order
